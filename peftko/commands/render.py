"""The engine's events (peftko.core.progress) made visible: the one place peftko prints.

- terminal (the default): each Message as a line (warnings in yellow), each Advanced event that
  carries a line (a training log) as that line; on a terminal a bar per long phase, off one (a
  file, a pipe) no bar, so `peftko lora-train ... > train.log` holds plain lines only.
- json (`--progress json`): every event as one JSON object a line on stdout, for scripts and the
  studio (docs/en/progress.md); nothing else is written to stdout.
"""

from __future__ import annotations

import json
import sys

import click
from tqdm.auto import tqdm

from peftko.core.progress import Advanced, Event, Finished, Message, Started, to_json

MODES = ("text", "json")


class Renderer:
    """The sink the command line installs; `mode` may switch once the command's options are read."""

    def __init__(self, mode: str = "text"):
        self.mode = mode
        self.bars: dict[str, object] = {}

    def __call__(self, event: Event) -> None:
        if self.mode == "json":
            sys.stdout.write(json.dumps(to_json(event), ensure_ascii=False) + "\n")
            sys.stdout.flush()
        else:
            self.on_terminal(event)

    def on_terminal(self, event: Event) -> None:
        if isinstance(event, Message):
            self.line(event.text, err=event.err, warning=event.level == "warning", end=event.end)
        elif isinstance(event, Started) and _bars_shown():
            self.open_bar(event)
        elif isinstance(event, Advanced):
            bar = self.bars.get(event.phase)
            if bar is not None:
                bar.total = event.total
                bar.update(event.done - bar.n)
            if event.text is not None:
                self.line(event.text)
        elif isinstance(event, Finished):
            bar = self.bars.pop(event.phase, None)
            if bar is not None:
                bar.close()

    def line(self, text: str, err: bool = False, warning: bool = False, end: str = "\n") -> None:
        if self.bars and end == "\n":  # a bar is drawn on stderr: tqdm writes the line above it, keeping it whole
            tqdm.write(click.style(text, fg="yellow") if warning else text,
                       file=sys.stderr if err else sys.stdout)
            return
        click.secho(text + end, fg="yellow" if warning else None, err=err, nl=False)

    def open_bar(self, event: Started) -> None:
        self.bars[event.phase] = tqdm(total=event.total, desc=event.phase, unit=f" {event.unit}",
                                      leave=False, dynamic_ncols=True)


def _bars_shown() -> bool:
    """Bars only when both streams are terminals: a bar draws on stderr, the lines go to stdout."""
    return sys.stdout.isatty() and sys.stderr.isatty()
