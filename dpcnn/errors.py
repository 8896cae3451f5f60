"""Errors a user can act on, and the exit codes they end a job with.

Every `DpcnnError` is reported as one line (the problem and the fix) with no
traceback by the command-line entry points; anything else is a bug and keeps
its traceback. The exit code tells a supervisor (launch/local.sh
--max-restarts, Slurm) whether starting again can help:

====  ==========================================================================
0     finished
1     a rank failed, crashed, got stuck or lost its host: a restart can help
2     the configuration, the data or a checkpoint is wrong: fix it first
143   stopped by SIGTERM/SIGINT after writing a checkpoint (128 + 15)
====  ==========================================================================
"""

import sys

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGNAL = 143


class DpcnnError(Exception):
    """Base class of the errors dpcnn reports as one clear line."""

    exit_code = EXIT_FAILED


class DataError(DpcnnError):
    """A dataset file is missing, corrupt, truncated or cannot be downloaded."""

    exit_code = EXIT_USAGE


class ConfigError(DpcnnError, ValueError):
    """A configuration cannot build (bad layer spec, bad hyperparameter)."""

    exit_code = EXIT_USAGE


class CheckpointError(DpcnnError):
    """A checkpoint is missing, truncated, tampered with or cannot be written."""

    exit_code = EXIT_USAGE


class Diverged(DpcnnError):
    """The loss or the gradients stopped being finite: the same config would diverge again."""

    exit_code = EXIT_USAGE


def report(message: str) -> None:
    """``dpcnn: error: <message>`` on stderr in ONE write, so lines of different ranks never interleave."""
    sys.stderr.write(f"dpcnn: error: {message}\n")
    sys.stderr.flush()
