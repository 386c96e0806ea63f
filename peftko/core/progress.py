"""What the engine reports: typed events sent to a sink, never printed.

Everything below peftko.commands tells what it does through `say`, `warn`, `phase` and `result`.
The sink is given by the caller (`reporting(sink)`), per thread and task (a context variable): the
command line renders events as today's lines and bars (peftko.commands.render), `--progress json`
as one JSON object a line (docs/en/progress.md), and a caller that installs no sink hears nothing.

Events:
  Message   a line for the user (level info or warning; `err`: it belongs on stderr)
  Started   a long phase began: its name, the total when known, the unit counted
  Advanced  the phase moved on: done of total, with the step's numbers (`values`) and its line
  Finished  the phase ended: done, total, seconds
  Result    what a command produced (a score, a path), as plain data
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal, Union

SCHEMA_VERSION = 1
# A phase's Advanced events come at most this often unless they carry a line or finish the phase:
# a 10,000-document corpus must not write 10,000 lines into a progress file.
MIN_INTERVAL_S = 0.25


@dataclass(frozen=True)
class Message:
    text: str
    level: Literal["info", "warning", "error"] = "info"
    err: bool = False  # stderr on a terminal (warnings, and notes that are not the command's output)
    end: str = "\n"  # "" while text streams (generate writes a sample piece by piece)
    event = "message"


@dataclass(frozen=True)
class Started:
    phase: str
    total: int | None
    unit: str
    event = "started"


@dataclass(frozen=True)
class Advanced:
    phase: str
    done: int
    total: int | None
    unit: str
    text: str | None = None  # the line a terminal shows for this step (a training log line), if any
    values: dict = field(default_factory=dict)
    event = "advanced"


@dataclass(frozen=True)
class Finished:
    phase: str
    done: int
    total: int | None
    unit: str
    seconds: float
    ok: bool = True  # False: the phase ended by an error or a stop
    event = "finished"


@dataclass(frozen=True)
class Result:
    name: str
    value: dict
    event = "result"


Event = Union[Message, Started, Advanced, Finished, Result]
Sink = Callable[[Event], None]


def _ignore(event: Event) -> None:
    pass


_sink: contextvars.ContextVar[Sink] = contextvars.ContextVar("peftko_progress_sink", default=_ignore)


@contextlib.contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    """Send every event raised inside the block to `sink`."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


def current_sink() -> Sink:
    """The sink in force: for work handed to another thread, which starts with none."""
    return _sink.get()


def emit(event: Event) -> None:
    _sink.get()(event)


def say(text: str, err: bool = False, end: str = "\n") -> None:
    emit(Message(text, "info", err, end))


def warn(text: str, err: bool = True) -> None:
    emit(Message(text, "warning", err))


def result(name: str, **value) -> None:
    emit(Result(name, value))


def to_json(event: Event) -> dict:
    """The event as one JSON object: {"v": 1, "event": ..., "time": ..., and its fields}."""
    return {"v": SCHEMA_VERSION, "event": event.event, "time": round(time.time(), 3), **asdict(event)}


class Tracker:
    """How far a phase is; `advance` reports it (throttled unless the step has a line or ends it)."""

    def __init__(self, name: str, total: int | None, unit: str):
        self.name, self.total, self.unit, self.done = name, total, unit, 0
        self._last = 0.0

    def advance(self, n: int = 1, text: str | None = None, **values) -> None:
        self.done += n
        self.report(text, **values)

    def set(self, done: int, text: str | None = None, total: int | None = None, **values) -> None:
        """Jump to `done` (the Trainer's global step), and to a new total when the plan changed."""
        self.done = done
        if total is not None:
            self.total = total
        self.report(text, **values)

    def report(self, text: str | None = None, **values) -> None:
        now = time.monotonic()
        if text is None and self.done != self.total and now - self._last < MIN_INTERVAL_S:
            return
        self._last = now
        emit(Advanced(self.name, self.done, self.total, self.unit, text, values))


@contextlib.contextmanager
def phase(name: str, total: int | None = None, unit: str = "items") -> Iterator[Tracker]:
    """A long phase: Started, the Tracker's Advanced events, then Finished (also when it fails:
    a front end must not show a bar that never ends)."""
    tracker = Tracker(name, total, unit)
    emit(Started(name, total, unit))
    start, ok = time.monotonic(), False
    try:
        yield tracker
        ok = True
    finally:
        emit(Finished(name, tracker.done, tracker.total, unit, round(time.monotonic() - start, 3), ok))
