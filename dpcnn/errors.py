"""Errors a user can act on.

Every `DpcnnError` is reported as one line (the problem and the fix) with no
traceback by the command-line entry points; anything else is a bug and keeps
its traceback.
"""


class DpcnnError(Exception):
    """Base class of the errors dpcnn reports as one clear line."""


class DataError(DpcnnError):
    """A dataset file is missing, corrupt, truncated or cannot be downloaded."""


class ConfigError(DpcnnError, ValueError):
    """A configuration cannot build (bad layer spec, bad hyperparameter)."""


class CheckpointError(DpcnnError):
    """A checkpoint is missing, truncated, tampered with or cannot be written."""
