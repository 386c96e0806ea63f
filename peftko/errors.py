"""The one exception type a user ever sees.

Anything the user can fix (a path, a key, a value, a setting) raises UserError. The CLI turns
it into one message and exit code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a clear message, exit code 2, nothing written."""

    exit_code = 2
