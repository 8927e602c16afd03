"""Typed errors the library raises for problems a user can fix.

Each message is one line that names the problem and the fix; the CLI prints it as it is, without a
traceback. Anything that is not an `LmError` is a bug in `lm` and is reported as one.
"""


class LmError(Exception):
    """A problem with the user's input, options or environment, explained in one line."""

    exit_code = 1


class UsageError(LmError):
    """An option value that can never work (a vocabulary too small, a negative count)."""

    exit_code = 2


class InputError(LmError):
    """An input path that is missing, empty, unreadable or not UTF-8 text."""


class OutputError(LmError):
    """An output that exists already or cannot be written."""


class DownloadError(LmError):
    """A download that failed or did not match its published checksum."""
