"""Exceptions with messages meant for people: each names the file or site and says how to fix it."""


class FedsegError(Exception):
    """Base class for user-facing fedseg errors."""


class DataError(FedsegError, ValueError):
    """Bad or missing input data (names the file / site and the fix)."""


class ConfigError(FedsegError, ValueError):
    """Bad or missing configuration (names the setting and the fix)."""


class UpdateRejected(FedsegError, ValueError):
    """A site's model update cannot be aggregated (NaN/Inf, wrong keys or shapes)."""


class CommandError(FedsegError):
    """A user-facing CLI error: printed without a traceback, exit code 2."""
