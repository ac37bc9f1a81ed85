"""The error types a user is shown: one line on stderr and exit 2, never a traceback.

Every module raises these (never its own copy), and ``cli.py`` maps exactly ``USER_ERRORS`` to exit 2,
so a new kind of refusal needs no change in the command line's error handling. Messages quote paths,
values and a child's output: the CLI makes them printable before showing them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration the user must fix; its message is shown as is, without a traceback."""


class ProfileError(Exception):
    """A run directory that cannot be read; the message says why in the user's terms."""


class UsageError(Exception):
    """Bad input on the command line (an option's value, a path that is neither a run nor a sweep)."""


class LaunchError(Exception):
    """A run or a sweep could not be started from the dashboard; the message says why."""


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, ProfileError, UsageError)
"""What ``blipmon`` answers with one line and exit 2."""

__all__ = ["USER_ERRORS", "ConfigError", "LaunchError", "ProfileError", "UsageError"]
