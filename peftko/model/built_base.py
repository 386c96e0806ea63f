"""The bases peftko builds into its cache (builtin:gemma-3-270m, builtin:tiny-llama), verified on use.

A build ends by writing peftko-built.json (atomically, last) with each file's size and SHA-256.
Every later use checks the folder against it before anything reads the weights: a file missing,
of another size or with other bytes (a damaged disk, an edit, a build cut short, which has no
record) makes peftko build the base again, with a line saying so, rather than train on it. The
hashes are computed once per process (peftko.core.hashing), so the run's own base fingerprint
reuses them instead of reading the weights twice. A rebuild replaces only the files peftko's
records name: whatever else is in the folder stays.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from peftko.core.atomic import publish, read_json_object, staging_dir, write_json_atomic
from peftko.core.hashing import hash_later
from peftko.core.paths import shown
from peftko.core.progress import say

RECORD = "peftko-built.json"
FORMAT = 1


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
    """What is wrong with a built base (the first file that differs from its record), or None."""
    files = recorded_files(folder)
    if not files:
        return f"no {RECORD}: its build did not finish, or an older peftko built it"
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file() or path.is_symlink():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size:,} bytes, not {entry['size']:,}"
    hashes = hash_later([folder / n for n in sorted(files)])
    for name in sorted(files):
        try:
            if hashes[folder / name].result() != files[name]["sha256"]:
                return f"{name} differs from what was built"
        except OSError as e:
            return f"{name} cannot be read: {e.strerror or e}"
    return None


def built_base(target: Path, what: str, build: Callable[[Path], None], takes: str,
               can_build: Callable[[], None] = lambda: None) -> Path:
    """`target`, verified against its record; built (again) by `build(folder)` when it is absent,
    unrecorded or damaged. `can_build()` refuses first, before anything is written, what the
    build would lack; `takes` says how long a build takes."""
    if target.exists():
        problem = damage(target)
        if problem is None:
            return target
        can_build()
        say(f"the built base in {shown(target)} was damaged ({problem}); building it again")
    else:
        can_build()
        say(f"building {what} into {shown(target)} (once; {takes})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(target.parent, ".building-") as tmp:
        stage = tmp / "base"
        build(stage)
        publish(stage)
        install(stage, target)
    return target


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
