"""What an --output may be, and what peftko may remove from it: only what peftko wrote itself.

One set of rules for `peftko lora-train` and `peftko merge`:
- place: an output is never, never holds, and never lies inside one of the command's inputs (the
  corpus, the base model, the adapter being merged), and is never the current or the home
  directory or a folder above them. No flag overrides this.
- owner: a non-empty output is replaced only when it carries peftko's mark (a run's peftko.json,
  run.json or checkpoints; a merged model's peftko-merge.json), only with --force, and only when
  every entry in it is one peftko wrote. Anything else is named and the output refused, so a
  file the user put there is never deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peftko.core.atomic import remove_dir
from peftko.core.errors import UserError


@dataclass(frozen=True)
class OutputKind:
    """What peftko writes into one kind of output directory."""

    what: str  # "a training run", "a merged model"
    marked: Callable[[Path], bool]  # does this directory carry peftko's mark?
    ours: Callable[[Path], Callable[[str], bool]]  # name -> did peftko write it?
    keep: tuple[str, ...] = ()  # entries --force leaves in place (the lock of the running command)


def check_place(output: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output that is, holds or lies inside an input, or holds the cwd or home."""
    out = Path(output).expanduser().resolve()
    for label, path in inputs.items():
        p = Path(path).expanduser().resolve()
        if out == p or out.is_relative_to(p) or p.is_relative_to(out):
            where = "is" if out == p else ("lies inside" if out.is_relative_to(p) else "holds")
            raise UserError(f"--output {output} {where} {label} ({p}); peftko never writes there. "
                            "Choose a directory outside it.")
    for label, path in (("the current directory", Path.cwd()), ("your home directory", Path.home())):
        p = path.resolve()
        if p.is_relative_to(out):
            raise UserError(f"--output {output} is {label} or a folder above it ({p}); "
                            "peftko never replaces it. Choose a new directory for the output.")


def entries_to_replace(output: Path, kind: OutputKind, force: bool, refusal: str) -> list[Path]:
    """The entries --force will remove; refuses (exit 2) what peftko may not replace.

    `refusal` is the message for a peftko output met without --force (it says what to pass).
    """
    output = Path(output)
    entries = sorted(e for e in output.iterdir() if e.name not in kind.keep) if output.is_dir() else []
    if not entries:
        return []
    if not kind.marked(output):
        raise UserError(f"--output {output} holds files peftko did not write ({_names(entries)}), so "
                        f"it is not {kind.what} peftko may replace, even with --force. "
                        "Choose a new or empty directory.")
    if not force:
        raise UserError(refusal)
    ours = kind.ours(output)
    foreign = [e for e in entries if not ours(e.name)]
    if foreign:
        raise UserError(f"--output {output} is {kind.what}, but it also holds {_names(foreign)}, which "
                        "peftko did not write; --force never deletes those. Move them away, or choose "
                        "another directory.")
    return entries


def remove_entries(entries: list[Path], first: str) -> None:
    """Remove what entries_to_replace returned; `first` goes first, so a half-removed output
    never looks complete. Folders are renamed away before they are deleted."""
    for e in sorted(entries, key=lambda e: e.name != first):
        if e.is_dir() and not e.is_symlink():
            remove_dir(e)
        else:
            e.unlink(missing_ok=True)


def _names(entries: list[Path], shown: int = 5) -> str:
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:shown]]
    more = f" and {len(entries) - shown} more" if len(entries) > shown else ""
    return ", ".join(names) + more
