"""Where peftko keeps and finds things: its home directory and the --data entries as paths."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from peftko.core.config import BUILTIN_DATA


def peftko_home() -> Path:
    """Caches and the built-in base: $PEFTKO_HOME, else ~/.cache/peftko."""
    return Path(os.environ.get("PEFTKO_HOME") or Path.home() / ".cache" / "peftko")


def shown(path) -> str:
    """A path as messages show it: under the home folder as `~/...`, so the same line reads the same on
    every machine (the README quotes them) and a long home prefix does not hide the part that matters."""
    text, home = str(path), str(Path.home())
    if home not in ("", "/") and (text == home or text.startswith(home + os.sep)):
        return "~" + text[len(home):]
    return text


def sample_corpus_dir() -> Path:
    """The bundled Korean sample corpus (builtin:sample)."""
    return Path(str(resources.files("peftko") / "sample_corpus"))


def resolve_data_paths(data) -> list[Path]:
    """--data entries as paths; builtin:sample is the bundled corpus."""
    return [sample_corpus_dir() if str(d) == BUILTIN_DATA else Path(d).expanduser() for d in data]
