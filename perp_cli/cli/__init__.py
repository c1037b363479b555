"""perp's command line: one module per subcommand; `app` only registers them.

`run` is the console script. It installs the SIGTERM handler before the heavy imports
(torch, transformers), so a job killed while starting up still exits with 130 and a
one-line message instead of a traceback.
"""

from __future__ import annotations

import os
import signal
import sys

from perp_cli.errors import Interrupted, received_signals as last_signal  # light: no torch


def _on_sigterm(signum: int, frame: object) -> None:
    last_signal.append("terminated (SIGTERM)")
    raise Interrupted("terminated (SIGTERM)")


def _on_sigint(signum: int, frame: object) -> None:
    # Remember the signal: some libraries (transformers' lazy imports) wrap a
    # KeyboardInterrupt raised inside them into another exception, or swallow it.
    last_signal.append("interrupted (SIGINT)")
    raise KeyboardInterrupt


def _quiet_unraisable(hook: object) -> object:
    """A signal that lands inside a `__del__` cannot propagate; Python prints it as
    "Exception ignored in ..." with a traceback. The signal is recorded (and honoured
    before any output is committed), so that noise is dropped; other unraisable errors
    still reach the default hook."""

    def quiet(info: object) -> None:
        if not isinstance(getattr(info, "exc_value", None), KeyboardInterrupt):
            hook(info)  # type: ignore[operator]

    return quiet


def _exit(code: int) -> None:
    """Exit with `code`. After a signal, exit without running the interpreter's own
    shutdown: CPython remembers a KeyboardInterrupt that passed through `exec` of a
    string (dataclasses does that while modules import) and would otherwise re-kill the
    process with SIGINT at exit, turning our 130 into -2. Every cleanup of ours (the
    staging directory) has already run in `finally` blocks by then."""
    if code == 130 or last_signal:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


def run() -> None:
    """Entry point of `perp` and `python -m perp_cli`."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    try:
        from perp_cli.cli.app import main
    except BaseException as exc:
        # Ctrl-C or SIGTERM while importing torch/transformers; an import cut short can
        # also surface as another error (numpy: "cannot load module more than once")
        if isinstance(exc, KeyboardInterrupt) or last_signal:
            sys.stderr.write("perp: interrupted while starting; no output was written\n")
            _exit(130)
        raise
    if last_signal:
        # the signal landed inside an import that swallowed it (optional-dependency probes
        # catch the ImportError an interrupted import turns into): the half-imported
        # libraries cannot be trusted, so stop here as if the import had been cut short
        sys.stderr.write("perp: interrupted while starting; no output was written\n")
        _exit(130)
    _exit(main())
