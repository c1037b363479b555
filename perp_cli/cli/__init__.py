"""perp's command line: one module per subcommand; `app` only registers them.

`run` is the console script. It installs the SIGTERM handler before the heavy imports
(torch, transformers), so a job killed while starting up still exits with 130 and a
one-line message instead of a traceback.
"""

from __future__ import annotations

import signal
import sys


last_signal: list[str] = []  # which signal interrupted the run, for the one-line message


def _on_sigterm(signum: int, frame: object) -> None:
    from perp_cli.errors import Interrupted

    last_signal.append("terminated (SIGTERM)")
    raise Interrupted("terminated (SIGTERM)")


def _on_sigint(signum: int, frame: object) -> None:
    # Remember the signal: some libraries (transformers' lazy imports) wrap a
    # KeyboardInterrupt raised inside them into another exception.
    last_signal.append("interrupted (SIGINT)")
    raise KeyboardInterrupt


def run() -> None:
    """Entry point of `perp` and `python -m perp_cli`."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        from perp_cli.cli.app import main
    except BaseException as exc:
        # Ctrl-C or SIGTERM while importing torch/transformers; an import cut short can
        # also surface as another error (numpy: "cannot load module more than once")
        if isinstance(exc, KeyboardInterrupt) or last_signal:
            sys.stderr.write("perp: interrupted while starting; no output was written\n")
            sys.exit(130)
        raise
    sys.exit(main())
