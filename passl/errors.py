"""Errors caused by the user (config, paths, data), as opposed to bugs.

The command-line tools catch :class:`UserError` and print its message as a
single ``error: ...`` line without a traceback; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message says what to do."""


class ConfigError(UserError):
    """A bad config file, key, value or override."""


class ResumableError(UserError):
    """The run's surroundings stopped it (a full disk, a killed process); once the cause is
    fixed it continues from its last checkpoint, and ``tools/train.py`` says how."""
