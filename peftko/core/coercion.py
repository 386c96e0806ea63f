"""Reading a config value as a type: the YAML value, or a `--set` string, as the int, float, bool,
list or Literal a setting has. Knows types, not settings: peftko.core.config says which type each
TrainConfig key has, and peftko.core.aliases reads other tools' values with the same rules.
"""

from __future__ import annotations

import math

import types
import typing
from typing import Literal


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def to_type(tp, value, from_string: bool):
    """`value` as type `tp`, or ValueError saying what it must be. A string from the command line
    (`from_string`) may spell a number, a boolean or a comma-separated list; a YAML value must
    already be one."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"must be one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _first_arm(typing.get_args(tp), value, from_string)
    if origin is list:
        return _to_list(value, from_string)
    converter = _SCALARS.get(tp)
    if converter is None:
        raise ValueError(f"unsupported type {_type_name(tp)}")
    return converter(value, from_string)


def _first_arm(arms, value, from_string: bool):
    errors = []
    for arm in arms:
        try:
            return to_type(arm, value, from_string)
        except ValueError as e:
            errors.append(str(e))
    raise ValueError(" or ".join(errors))


def _to_list(value, from_string: bool) -> list[str]:
    # A comma-separated string from the command line means a list, except for the keywords the
    # string arm of `list[str] | str` exists for (auto, all-linear).
    if isinstance(value, str):
        if not from_string or value in ("auto", "all-linear"):
            raise ValueError("must be a list")
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ValueError("must be a list of strings")
    return [str(v) for v in value]


def _to_bool(value, from_string: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_string and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError("must be true or false")


def _to_int(value, from_string: bool) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if from_string and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError("must be an integer")


def _to_float(value, from_string: bool) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        number = float(value)  # YAML reads 2e-4 (no dot) as a string
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None
    # YAML's .inf and .nan are floats: an infinite epoch count overflows the step count, and a NaN
    # weight decay or clipping norm passes every comparison and poisons the run later
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _to_str(value, from_string: bool) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError("must be a string")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
