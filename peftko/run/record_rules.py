"""What a value in a record must be: the rules peftko.run.records checks each file's keys against."""

from __future__ import annotations

from collections.abc import Callable


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_ints(x) -> bool:
    return isinstance(x, list) and all(is_int(i) for i in x)


def is_names(x) -> bool:
    return isinstance(x, list) and all(isinstance(n, str) for n in x)


def is_seal(x) -> bool:
    """{file name: 64 hex digits of its SHA-256}."""
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, str) and len(v) == 64
                                       for k, v in x.items())


INTEGER, NUMBER, TEXT = (is_int, "an integer"), (is_number, "a number"), (lambda x: isinstance(x, str), "a string")
FLAG, OBJECT = (lambda x: isinstance(x, bool), "true or false"), (lambda x: isinstance(x, dict), "a dict")
INTEGERS, NAMES = (is_ints, "a list of integers"), (is_names, "a list of names")
SEAL = (is_seal, "an object of file names and their SHA-256")
Rules = dict[str, tuple[Callable[[object], bool], str]]


def check(data: dict, rules: Rules, prefix: str = "") -> list[str]:
    """One problem for each key present whose value is not what it must be; null reads as not recorded."""
    return [f"'{prefix}{k}' must be {what}" for k, (ok, what) in rules.items()
            if data.get(k) is not None and not ok(data[k])]


def present(d: dict) -> dict:
    """Without the keys a run did not record (older runs, optional parts), as the files have them."""
    return {k: v for k, v in d.items() if v is not None}
