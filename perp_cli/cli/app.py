"""The `perp` application: registers the subcommands and maps failures to exit codes.

Exit codes: 0 ok, 1 runtime failure, 2 usage error, 3 inconsistent checkpoint or failed
expectation (`inspect`), 130 interrupted. Errors print one line on stderr; a traceback
only with `perp --debug ...` or PERP_DEBUG=1.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Annotated

import typer
from rich.markup import escape

from perp_cli import __version__

try:  # recent typer vendors its own copy of click and raises that copy's exceptions
    from typer._click.exceptions import NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import NoArgsIsHelpError
    from click.exceptions import UsageError as ClickUsageError
from perp_cli.cli import inspect as inspect_cmd
from perp_cli.errors import Interrupted, PerpError
from perp_cli.progress import console

app = typer.Typer(
    name="perp",
    help=(
        "Prune LLMs, recover them by retraining a tiny parameter subset (PERP), merge "
        "sparsity-preserving LoRA, evaluate. Every step reads a checkpoint directory and "
        "writes a new one.\n\nExit codes: 0 ok, 1 runtime error, 2 usage error, "
        "3 inconsistent checkpoint / failed expectation, 130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": bool(os.environ.get("PERP_DEBUG"))}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"perp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    if debug:
        _state["debug"] = True


app.command("inspect")(inspect_cmd.inspect)


def _say(prefix: str, message: str) -> None:
    """One line on stderr, never wrapped, with no markup taken from the message."""
    console.print(f"[red]{prefix}[/] {escape(message)}", highlight=False, soft_wrap=True)


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted("terminated (SIGTERM)")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script exits with it)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app(args=argv, prog_name="perp", standalone_mode=False)
        return 0
    except typer.Exit as exc:
        return exc.exit_code
    except NoArgsIsHelpError as exc:  # bare `perp`: the help is the answer
        sys.stdout.write(exc.format_message() + "\n")
        return 0
    except ClickUsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        _say("perp: error:", f"{exc.format_message()}{hint}")
        return 2
    except (KeyboardInterrupt, typer.Abort, Interrupted) as exc:
        reason = str(exc) if isinstance(exc, Interrupted) else "interrupted"
        _say("perp:", f"{reason}; no output was written")
        return 130
    except PerpError as exc:
        if _state["debug"]:
            traceback.print_exc()
        _say("perp: error:", str(exc))
        return exc.exit_code
    except Exception as exc:  # an unexpected failure: still one line, traceback on request
        if _state["debug"]:
            traceback.print_exc()
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _say("perp: internal error:", f"{type(exc).__name__}: {text} (rerun with `perp --debug` for a traceback)")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stdout.flush()


def console_script() -> None:
    sys.exit(main())
