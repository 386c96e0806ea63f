"""`peftko cache`: list peftko's caches with their sizes; `--clear [tokens|bases|all]` removes them
(only what peftko wrote, peftko.train.caches) and prints each removed folder."""

from __future__ import annotations

from peftko.core.paths import peftko_home
from peftko.core.progress import Result, emit, say
from peftko.train.caches import ALL, clear_caches, human_size, list_caches


def run_cache(clear: str | None = None) -> None:
    home = peftko_home()
    if clear:
        removed = clear_caches(clear)
        for e in removed:
            say(f"removed {e.path} ({human_size(e.size)}, {e.kind})")
        freed = sum(e.size for e in removed)
        say(f"{len(removed)} removed, {human_size(freed)} freed" if removed
            else f"nothing to remove in {home}" + ("" if clear == ALL else f" ({clear})"))
        emit(Result("cache", {"removed": [str(e.path) for e in removed], "freed_bytes": freed}))
        return
    entries = list_caches()
    emit(Result("cache", {"home": str(home), "entries": [
        {"kind": e.kind, "path": str(e.path), "bytes": e.size, "note": e.note} for e in entries]}))
    if not entries:
        say(f"{home}: no caches")
        return
    say(f"{home}:")
    width = max(len(str(e.path.relative_to(home))) for e in entries)
    for e in entries:
        say(f"  {str(e.path.relative_to(home)):<{width}}  {human_size(e.size):>9}  {e.kind:<6}  {e.note}")
    ours = sum(e.size for e in entries if e.kind != "other")
    say(f"peftko's: {human_size(ours)}; `peftko cache --clear [tokens|bases|all]` removes them")
