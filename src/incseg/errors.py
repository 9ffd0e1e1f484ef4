"""Errors that are the user's to fix: the CLI prints them without a traceback and exits 2."""


class IncsegError(Exception):
    """Base class of user-facing errors (bad config, bad data, bad checkpoint)."""


class ConfigError(IncsegError):
    """A config key, name or value is invalid; the message says which and what is expected."""


class DataError(IncsegError):
    """A dataset is missing or malformed; the message names the file."""


class CheckpointError(IncsegError):
    """A checkpoint cannot be used (missing, not a checkpoint, or for another run)."""


class DiskFullError(IncsegError):
    """A file could not be written for want of space or a file-size limit; the command that
    was writing says how to continue once space is freed."""
