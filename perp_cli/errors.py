"""The error family every command maps to an exit code.

A user of a shell pipeline needs two things from a failure: one line that says what is
wrong and what to do, and an exit code a script can branch on. Exit codes:

* 0 success
* 1 runtime failure (bad checkpoint, numerical fault, out of disk, inconsistent mask, ...)
* 2 usage error (bad option value, conflicting options, missing input)
* 3 `perp inspect` found weights and masks that disagree, or an expectation failed
* 130 interrupted (Ctrl-C / SIGTERM); nothing was written
"""

from __future__ import annotations


class PerpError(Exception):
    """Base class: a failure with a user-facing one-line message."""

    exit_code = 1


class UsageError(PerpError):
    """The command line asks for something impossible or contradictory."""

    exit_code = 2


class CheckpointError(PerpError):
    """A checkpoint directory is missing, corrupt, or inconsistent."""

    exit_code = 1


class ArchitectureError(PerpError):
    """The model's architecture is not in perp's architecture map."""

    exit_code = 1


class DataError(PerpError):
    """Calibration, training or evaluation data cannot be used."""

    exit_code = 1


class NumericalError(PerpError):
    """NaN/inf in weights or losses, or a factorisation that cannot be repaired."""

    exit_code = 1


class InconsistentCheckpoint(PerpError):
    """Weights and masks disagree, or an `inspect` expectation failed."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGTERM arrived. It unwinds exactly like Ctrl-C (a KeyboardInterrupt), so every
    `finally` and every atomic-write cleanup runs, and no `except Exception` in library
    code can swallow it."""

    exit_code = 130
