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


class MemoryLimitError(PerpError):
    """A step would need more memory than this process may use (checked before it starts)."""

    exit_code = 1


class InconsistentCheckpoint(PerpError):
    """Weights and masks disagree, or an `inspect` expectation failed."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGTERM arrived. It unwinds exactly like Ctrl-C (a KeyboardInterrupt), so every
    `finally` and every atomic-write cleanup runs, and no `except Exception` in library
    code can swallow it."""

    exit_code = 130


# Which signals perp's handlers (perp_cli.cli) saw in this process, newest last. A library
# can swallow the KeyboardInterrupt a handler raises (inside a __del__, an optional-import
# probe, a lazy-import wrapper), so the record, not the exception, is the truth.
received_signals: list[str] = []


def raise_if_signalled() -> None:
    """Raise `Interrupted` if a signal arrived that something swallowed. Called right
    before an output directory is committed: a run that was asked to stop never
    publishes its result, even when the stop request got lost on the way."""
    if received_signals:
        raise Interrupted(received_signals[-1])
