"""Every path the studio reads or writes lies under --root: no `..`, no symlink out of it."""

from __future__ import annotations

from pathlib import Path

from peftko.core.config import BUILTIN_DATA
from peftko.core.errors import UserError
from peftko.core.paths import sample_corpus_dir


class Root:
    """The folder the studio may touch, and the one question it asks of every path."""

    def __init__(self, folder: str | Path):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise UserError(f"--root {folder}: not a folder")
        self.path = folder.resolve()

    def inside(self, given: str, must_exist: bool = True) -> Path:
        """GIVEN (relative to the root, or absolute) resolved, symlinks followed; refused unless it is
        the root or lies below it, and (must_exist) unless it exists."""
        text = (given or "").strip()
        if not text:
            raise UserError("no path given")
        if "\x00" in text:
            raise UserError(f"{text!r}: not a path")
        path = Path(text).expanduser()
        resolved = (path if path.is_absolute() else self.path / path).resolve()
        if resolved != self.path and self.path not in resolved.parents:
            raise UserError(f"{text}: outside the studio's root {self.path}")
        if must_exist and not resolved.exists():
            raise UserError(f"{text}: no such file or folder under {self.path}")
        return resolved

    def corpus(self, given: str) -> Path:
        """A corpus folder or file under the root, or the bundled sample (builtin:sample, read only)."""
        if (given or "").strip() == BUILTIN_DATA:
            return sample_corpus_dir()
        return self.inside(given)

    def shown(self, path: Path) -> str:
        """PATH as the page names it: relative to the root where it lies below it."""
        try:
            rel = Path(path).resolve().relative_to(self.path)
        except ValueError:
            return str(path)
        return str(rel) if str(rel) != "." else "."

    def folders(self, depth: int = 3, limit: int = 400) -> list[str]:
        """Folders under the root (hidden ones and symlinks left out), for the pickers."""
        found: list[str] = []
        level = [self.path]
        for _ in range(depth):
            nxt = []
            for folder in level:
                try:
                    entries = sorted(folder.iterdir())
                except OSError:
                    continue
                for e in entries:
                    if e.name.startswith(".") or e.is_symlink() or not e.is_dir() or e.name.startswith("checkpoint-"):
                        continue
                    found.append(self.shown(e))
                    nxt.append(e)
                    if len(found) >= limit:
                        return found
            level = nxt
        return found
