"""What peftko keeps in its home ($PEFTKO_HOME, else ~/.cache/peftko), measured and removable.

- datasets/KEY/: a corpus's packed token blocks (peftko.data.packing), one folder per corpus,
  tokenizer and block settings, known by its stats.json; datasets/.build-HOST-PID-*: a build that
  a killed run left (the next run removes it too).
- bases/NAME/: a base peftko built (builtin:tiny-llama, builtin:gemma-3-270m), whose files are
  listed in its peftko-built.json (peftko.model.built_base).

Clearing removes only these: a token folder whole (peftko's layout: its key, its stats.json), of
a built base only the files its record names, then the folder if nothing else is left. Anything
else under the home is listed as not peftko's and left alone.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from peftko.core.atomic import process_alive, remove_dir
from peftko.core.paths import peftko_home
from peftko.data.packing import BUILD_PREFIX
from peftko.model.built_base import RECORD, recorded_files

TOKENS, BASES, ALL = "tokens", "bases", "all"
KINDS = (TOKENS, BASES, ALL)
_KEY = re.compile(r"[0-9a-f]{20}")
LARGE_TOKEN_CACHE = 100 << 20  # a run that writes more says where it went


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # TOKENS, BASES, or "other" (not peftko's: listed, never removed)
    path: Path
    size: int
    note: str = ""


def folder_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def list_caches(home: Path | None = None) -> list[CacheEntry]:
    home = Path(home or peftko_home())
    entries: list[CacheEntry] = []
    for folder, kind in ((home / "datasets", TOKENS), (home / "bases", BASES)):
        if folder.is_dir():
            entries += [_entry(p, kind) for p in sorted(folder.iterdir())]
    if home.is_dir():
        entries += [CacheEntry("other", p, folder_size(p) if p.is_dir() else p.lstat().st_size, "not peftko's")
                    for p in sorted(home.iterdir()) if p.name not in ("datasets", "bases")]
    return entries


def _entry(path: Path, kind: str) -> CacheEntry:
    if path.is_symlink() or not path.is_dir():
        return CacheEntry("other", path, path.lstat().st_size, "not peftko's")
    if kind == TOKENS:
        if _KEY.fullmatch(path.name) and (path / "stats.json").is_file():
            return CacheEntry(TOKENS, path, folder_size(path), "token blocks of one corpus and tokenizer")
        if path.name.startswith(BUILD_PREFIX):
            return CacheEntry(TOKENS, path, folder_size(path), "a token build a stopped run left"
                              if not _building(path) else "a token build in progress (kept)")
        return CacheEntry("other", path, folder_size(path), "not peftko's")
    files = recorded_files(path)
    if not files:
        return CacheEntry("other", path, folder_size(path), f"no {RECORD}: left alone (an older peftko "
                          "built it, or not peftko; using the base builds it again with a record)")
    size = sum((path / n).stat().st_size for n in files if (path / n).is_file())
    return CacheEntry(BASES, path, size, f"a built base ({len(files)} files)")


def _building(path: Path) -> bool:
    """A build of a process still running, or of another host sharing the cache (not judged here)."""
    mine = f"{BUILD_PREFIX}{socket.gethostname()}-"
    pid = path.name[len(mine):].split("-", 1)[0] if path.name.startswith(mine) else ""
    return not pid.isdigit() or process_alive(int(pid))


def clear_caches(what: str = ALL, home: Path | None = None) -> list[CacheEntry]:
    """Remove peftko's caches of kind `what` (tokens, bases or all); return what was removed."""
    removed = []
    for e in list_caches(home):
        if e.kind == "other" or (what != ALL and e.kind != what) or "in progress" in e.note:
            continue
        if e.kind == TOKENS:
            # renamed like this process's build first: a delete cut short is removed by the next run
            remove_dir(e.path, f"{BUILD_PREFIX}{socket.gethostname()}-{os.getpid()}-")
        else:
            _remove_built_base(e.path)
        removed.append(e)
    return removed


def _remove_built_base(path: Path) -> None:
    """The record first (a cut-short removal reads as damaged and is built again), then its files."""
    files = recorded_files(path)
    (path / RECORD).unlink()
    for name in files:
        (path / name).unlink(missing_ok=True)
    if not any(path.iterdir()):
        path.rmdir()


def token_cache_note(cache_dir: Path) -> str | None:
    """One line for a run that has just written a large token cache: where, how large, how to clear it."""
    size = folder_size(cache_dir)
    if size < LARGE_TOKEN_CACHE:
        return None
    return f"token cache: {human_size(size)} written to {cache_dir} (`peftko cache` lists peftko's caches; " \
           "`peftko cache --clear tokens` removes them)"


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"

