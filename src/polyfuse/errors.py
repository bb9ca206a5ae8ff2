"""User-facing errors.

A `UserError` is a mistake the user can fix (bad config key, malformed row, missing file). The CLI
prints its message without a traceback and exits with code 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input: config, data file, model path or CLI flag."""


class ConfigError(UserError):
    """A config key is missing, unknown or of the wrong type."""


class DataError(UserError):
    """A data file has a malformed row; the message names the file and line."""
