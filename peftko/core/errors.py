"""The exceptions a user sees: each ends the command with one line and its exit code, no traceback.

Exit codes (docs/*/resuming-and-safety.md):
  1    another process of a multi-process run (torchrun) ended under this one (PeerLost): its own
       error is in the launcher's report; the last checkpoint stays for `--resume`
  2    bad input or environment, nothing more to do (UserError; includes CUDA out of memory and
       a full or unwritable output disk)
  3    training diverged: max_bad_steps non-finite steps in a row, or parameters that ended NaN
       or inf (TrainingDiverged, a UserError)
  130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM (e.g. a preempted job): during training, a
       checkpoint was written after the current step and `--resume` continues from it; before
       training nothing was written (Interrupted); during the final save, the save completed
       (peftko.core.signals)
The CLI turns each into one line; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """Bad input: a clear message, exit code 2, nothing written."""

    exit_code = 2


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row, or parameters that ended NaN/inf: the user must change a
    setting (exit 3, no traceback)."""

    exit_code = 3


class PeerLost(UserError):
    """Another rank of a torchrun / accelerate run ended (killed, out of memory, a lost machine): the
    survivors' collective call fails with "Connection reset by peer". Their traceback says nothing the
    launcher's report does not, so it is one line and exit 1, not a peftko bug."""

    exit_code = 1


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM where there is nothing to save (peftko.core.signals): it unwinds, so every
    `finally` cleans up, to one line and exit code 128 + the signal. A BaseException, so no
    `except Exception` on the way swallows it."""

    def __init__(self, signum: int, what: str):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {what}")
