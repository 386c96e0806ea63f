"""The one exception type a user ever sees.

Anything the user can fix (a path, a key, a value, a setting) raises UserError. The CLI turns
it into one message and exit code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a clear message, exit code 2, nothing written."""

    exit_code = 2


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM where there is nothing to save (peftko.stopping): it unwinds, so every
    `finally` cleans up, to one line and exit code 128 + the signal. A BaseException, so no
    `except Exception` on the way swallows it."""

    def __init__(self, signum: int, what: str):
        import signal

        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {what}")
