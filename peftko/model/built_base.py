"""The bases peftko builds into its cache (builtin:gemma-3-270m, builtin:tiny-llama), verified on use.

A build ends by writing peftko-built.json (atomically, last) with each file's size and SHA-256.
Every later use checks the folder against it in two steps. At once, before anything reads the
weights: the record is there, each file it names is there with its size, each safetensors header
reads (a build cut short, a truncated or a corrupted file). Then every byte is hashed on a
background thread while the command loads the base (the loader reads the pages the hash read), and
`confirm` compares the hashes before the weights are used: a file with other bytes (a damaged disk,
an edit) makes peftko build the base again, with a line saying so, and the caller load it again,
rather than train on it. The hashes are computed once per process (peftko.core.hashing), so the
run's own base fingerprint reuses them instead of reading the weights twice. A rebuild replaces only
the files peftko's records name: whatever else is in the folder stays.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from peftko.core.atomic import publish, read_json_object, staging_dir, write_json_atomic
from peftko.core.errors import UserError
from peftko.core.hashing import hash_later
from peftko.core.paths import peftko_home, shown
from peftko.core.progress import say
from peftko.model.header import read_safetensors_header

RECORD = "peftko-built.json"
FORMAT = 1
T = TypeVar("T")


class Rebuilt(Exception):
    """A built base was found damaged after it was handed out, and has been built again: load it again."""


@dataclass(frozen=True)
class _Builder:
    what: str
    build: Callable[[Path], None]
    takes: str
    can_build: Callable[[], None]


_unconfirmed: dict[Path, _Builder] = {}  # built bases handed out whose hashes are not compared yet
_lock = threading.Lock()


def recorded_files(folder: Path) -> dict[str, dict]:
    """name -> {"size", "sha256"} of the files the build wrote, from its record ({} without one)."""
    data = read_json_object(Path(folder) / RECORD)
    files = data.get("files") if data.get("format") == FORMAT else None
    if not isinstance(files, dict):
        return {}
    return {n: e for n, e in files.items()
            if isinstance(n, str) and "/" not in n and isinstance(e, dict)
            and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)}


def damage(folder: Path) -> str | None:
    """What is wrong with a built base (the first file that differs from its record), or None:
    both steps, waiting for the hashes."""
    return quick_damage(folder) or _hash_damage(folder)


def quick_damage(folder: Path) -> str | None:
    """What the record, the files' sizes and the safetensors headers show at once, or None."""
    files = recorded_files(folder)
    if not files:
        return f"no {RECORD}: its build did not finish, or an older peftko built it"
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file() or path.is_symlink():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size:,} bytes, not {entry['size']:,}"
        if name.endswith(".safetensors"):
            try:
                read_safetensors_header(path)
            except UserError:
                return f"{name}'s header is damaged"
    return None


def _hash_damage(folder: Path) -> str | None:
    files = recorded_files(folder)
    hashes = hash_later([folder / n for n in sorted(files)])  # the ones built_base started, if it did
    for name in sorted(files):
        try:
            if hashes[folder / name].result() != files[name]["sha256"]:
                return f"{name} differs from what was built"
        except OSError as e:
            return f"{name} cannot be read: {e.strerror or e}"
    return None


def builtin_folder(name: str) -> Path:
    """Where the base `builtin:NAME` is built."""
    return peftko_home() / "bases" / name.split(":", 1)[1]


def built_base(target: Path, what: str, build: Callable[[Path], None], takes: str,
               can_build: Callable[[], None] = lambda: None) -> Path:
    """`target`, built (again) by `build(folder)` when it is absent, unrecorded or visibly damaged;
    otherwise handed out at once while its bytes are hashed, for `confirm` to compare before the
    weights are used. `can_build()` refuses first, before anything is written, what the build would
    lack; `takes` says how long a build takes."""
    builder = _Builder(what, build, takes, can_build)
    if not target.exists():
        can_build()
        say(f"building {what} into {shown(target)} (once; {takes})")
        _build(target, builder)
    elif problem := quick_damage(target):
        _rebuild(target, builder, problem)
    else:
        hash_later([target / n for n in sorted(recorded_files(target))])  # every byte, from now, beside the load
        with _lock:
            _unconfirmed[target] = builder
    return target


def confirm(path: Path) -> None:
    """Before the weights of `path` are used: when it is a built base handed out unconfirmed, wait
    for its hashes; bytes other than the build's are built again and Rebuilt raised, so the caller
    loads the new files. Any other folder: nothing."""
    with _lock:
        builder = _unconfirmed.pop(Path(path), None)
    if builder is not None and (problem := _hash_damage(Path(path))):
        _rebuild(Path(path), builder, problem)
        raise Rebuilt(problem)


def load_confirmed(path: Path, load: Callable[[], T]) -> T:
    """`load()`, with the built base's hashes compared before the result is used (they run while it
    loads); a damaged base is built again and loaded again."""
    result = load()
    try:
        confirm(path)
    except Rebuilt:
        return load()
    return result


def _rebuild(target: Path, builder: _Builder, problem: str) -> None:
    builder.can_build()
    say(f"the built base in {shown(target)} was damaged ({problem}); building it again")
    _build(target, builder)


def _build(target: Path, builder: _Builder) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(target.parent, ".building-") as tmp:
        stage = tmp / "base"
        builder.build(stage)
        publish(stage)
        install(stage, target)


def install(stage: Path, target: Path) -> None:
    """Put a finished build in place: the record goes first (a cut-short install reads as damaged
    and is built again), then each file the build wrote, then the new record, last."""
    names = sorted(p.name for p in stage.iterdir() if p.is_file())
    hashes = hash_later([stage / n for n in names])
    files = {n: {"size": (stage / n).stat().st_size, "sha256": hashes[stage / n].result()} for n in names}
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage, target)
    else:
        old = recorded_files(target)
        (target / RECORD).unlink(missing_ok=True)
        for name in names:
            os.replace(stage / name, target / name)
        for name in sorted(set(old) - set(names)):  # peftko's own, from an earlier build
            (target / name).unlink(missing_ok=True)
    write_json_atomic(target / RECORD, {"format": FORMAT, "files": files})
