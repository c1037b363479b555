"""The application shell: help, version, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli


def test_help_lists_every_subcommand() -> None:
    result = run_cli("--help")
    assert result.exit_code == 0
    for command in ("inspect", "prune", "shrink", "retrain", "merge", "reconstruct", "eval"):
        assert command in result.stdout, command


def test_version_and_bare_invocation() -> None:
    assert run_cli("--version").stdout.startswith("perp ")
    assert run_cli().exit_code == 0


def test_usage_errors_exit_2_in_one_line() -> None:
    result = run_cli("inspect", "somewhere", "--no-such-flag")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "--no-such-flag" in result.stderr
    assert run_cli("no-such-command").exit_code == 2


def test_console_script_runs_as_module() -> None:
    proc = subprocess.run([sys.executable, "-m", "perp_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("perp ")


def test_signals_inside_destructors_are_not_printed_but_other_errors_are() -> None:
    # a Ctrl-C landing in some library's __del__ is recorded by the handler and honoured
    # before any commit; Python's "Exception ignored in ..." traceback would only be noise
    import types

    from perp_cli.cli import _quiet_unraisable
    from perp_cli.errors import Interrupted

    seen = []
    hook = _quiet_unraisable(seen.append)
    for exc in (KeyboardInterrupt(), Interrupted("terminated (SIGTERM)"), ValueError("real")):
        hook(types.SimpleNamespace(exc_value=exc))
    assert [type(i.exc_value) for i in seen] == [ValueError]
