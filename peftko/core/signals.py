"""Ctrl-C (SIGINT) and SIGTERM: one handler for the whole command, acting by phase.

  prepare   before anything is written (and a merge before its final rename): nothing to save.
            The signal becomes an Interrupted exception, so `finally` blocks clean up after
            themselves (the dataset cache's build folder, a merge's staging folder); the
            command prints one line and exits 130 (SIGINT) or 143 (SIGTERM).
  train     finish the step, write a checkpoint, stop (peftko.train.callbacks.StopOnSignal).
  evaluate  the final evaluation: Interrupted; the session writes a checkpoint instead.
  evaluate together  the same, data-parallel: every rank takes part in each evaluation batch, so
            the evaluation completes, then the run stops with a checkpoint (no rank may leave alone).
  save      a write that must not be cut (the final adapter, a checkpoint, a merge's rename):
            it completes, then the command stops.
A second signal in any phase exits at once, with one line and no traceback: checkpoints and
adapters are written to hidden folders and renamed in, so this never leaves a half one. This
module imports nothing heavy, so the handler is in place before torch is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from peftko.core import distributed
from peftko.core.errors import Interrupted
from peftko.core.lock import release_all
from peftko.core.progress import say

SIGNALS = (signal.SIGINT, signal.SIGTERM)
RAISING = ("prepare", "evaluate")
DEFERRED = {"train": "finishing this step and writing a checkpoint", "save": "finishing the save",
            "evaluate together": "finishing the evaluation all processes share, then writing a checkpoint"}


class Stopper:
    def __init__(self, unfinished: str):
        self.signum: int | None = None
        self.phase = "prepare"
        self.unfinished = unfinished  # the line printed for a stop in the prepare phase

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @contextlib.contextmanager
    def installed(self):
        """For the whole command. A signal that was ignored (a background job's SIGINT) stays so."""
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        self._set({s: self._handle for s in SIGNALS}, previous)
        try:
            yield self
        finally:
            # After a stop the process is ending: a second signal during interpreter shutdown
            # must not raise KeyboardInterrupt inside atexit callbacks (a traceback), so the
            # at-once exit stays in place.
            if self.signum is not None:
                self._set({s: self._exit_now for s in SIGNALS}, previous)
            else:  # an inner Stopper that stopped left its exit-at-once handler: that one stays
                self._set({s: h for s, h in previous.items() if signal.getsignal(s) == self._handle}, previous)

    @staticmethod
    def _set(handlers: dict, previous: dict) -> None:
        for s, handler in handlers.items():
            if previous[s] is not signal.SIG_IGN:
                signal.signal(s, handler)

    def agreed(self) -> bool:
        """Whether any rank was signalled (data-parallel: a collective, every rank calls it at the
        same point); a rank that was not takes on the signal, so all stop the same way."""
        signum = distributed.max_over_ranks(self.signum or 0)
        if signum and self.signum is None:
            self.signum = signum
        return bool(signum)

    @contextlib.contextmanager
    def during(self, phase: str):
        """Run the block in `phase`; a signal already received stops a raising phase at its start."""
        before, self.phase = self.phase, phase
        try:
            if self.signum is not None and phase in RAISING:
                raise Interrupted(self.signum, self.unfinished)
            yield
        finally:
            self.phase = before

    def _handle(self, signum, frame):
        if self.signum is not None:
            self._exit_now(signum, frame)
        self.signum = signum
        if self.phase in RAISING:
            raise Interrupted(signum, self.unfinished)
        _say(f"\npeftko: {self.name} received: {DEFERRED[self.phase]} (send it again to stop at once)\n")

    def _exit_now(self, signum, frame):
        _say(f"\npeftko: {signal.Signals(signum).name} again: stopping at once; every complete "
             "checkpoint and output is intact.\n")
        release_all()
        os._exit(128 + signum)


def _hold_for_fork() -> None:
    """Before a fork: the forking thread blocks the signals, so the child starts with them blocked.
    CPython clears the signals a child caught before its after-fork reset, so a pool terminating a
    worker that was still starting lost the SIGTERM and waited for it forever (17 of 30 forks of a
    large process signalled at once, measured); blocked, the signal waits for `_release_in_child`."""
    _held[threading.get_ident()] = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def _release_in_parent() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, _held.pop(threading.get_ident(), ()))


def _release_in_child() -> None:
    """In the forked child (a tokenising pool's worker): peftko's handlers give way to the default
    action, so the worker ends when its pool terminates it, instead of taking the command's "finish
    this step" and waiting for ever on its task queue (a hung `Pool.terminate`); then the signals are
    unblocked, so one sent while the child was starting ends it now."""
    for s in SIGNALS:
        if isinstance(getattr(signal.getsignal(s), "__self__", None), Stopper):
            signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, _held.pop(threading.get_ident(), ()))


_held: dict[int, set] = {}  # the forking thread's signal mask before the fork
if hasattr(os, "register_at_fork") and hasattr(signal, "pthread_sigmask"):  # POSIX
    os.register_at_fork(before=_hold_for_fork, after_in_parent=_release_in_parent,
                        after_in_child=_release_in_child)


def _say(text: str) -> None:
    say(text.rstrip("\n"), err=True)  # the renderer ends the line
