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
from perp_cli.cli import demo as demo_cmd
from perp_cli.cli import eval as eval_cmd
from perp_cli.cli import inspect as inspect_cmd
from perp_cli.cli import prune as prune_cmd
from perp_cli.cli import merge as merge_cmd
from perp_cli.cli import retrain as retrain_cmd
from perp_cli.cli import reconstruct as reconstruct_cmd
from perp_cli.cli import shrink as shrink_cmd
from perp_cli.cli import _on_sigint, _on_sigterm, last_signal
from perp_cli.cli.common import validated
from perp_cli.errors import PerpError
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


app.command("inspect")(validated(inspect_cmd.inspect))
app.command("eval")(validated(eval_cmd.eval_cmd))
app.command("prune")(validated(prune_cmd.prune_cmd))
app.command("shrink")(validated(shrink_cmd.shrink_cmd))
app.command("retrain")(validated(retrain_cmd.retrain_cmd))
app.command("reconstruct")(validated(reconstruct_cmd.reconstruct_cmd))
app.command("merge")(validated(merge_cmd.merge_cmd))
app.command("demo")(validated(demo_cmd.demo))


def _say(prefix: str, message: str) -> None:
    """One line on stderr, never wrapped, with no markup taken from the message."""
    one_line = " ".join(message.splitlines())  # a path with a newline in it stays on the line
    console.print(f"[red]{prefix}[/] {escape(one_line)}", highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    """Library chatter (transformers' one-time warnings, progress bars) is noise in a pipeline's
    stderr; perp reports what matters itself. --debug keeps it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script exits with it)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # SIGTERM unwinds like Ctrl-C
    previous_int = signal.signal(signal.SIGINT, _on_sigint)
    try:
        if not _state["debug"]:
            _quiet_libraries()  # imports transformers: a signal may land here too
        # obj=main: a command that runs other commands (demo) gets this runner, not an import of this module
        code = app(args=argv, prog_name="perp", standalone_mode=False, obj=main)
        # typer turns KeyboardInterrupt (Ctrl-C, and SIGTERM via Interrupted) into exit 130
        if code == 130:
            _say("perp:", f"{last_signal[-1] if last_signal else 'interrupted'}; no output was written")
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except NoArgsIsHelpError as exc:  # bare `perp`: the help is the answer
        sys.stdout.write(exc.format_message() + "\n")
        return 0
    except ClickUsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        _say("perp: error:", f"{exc.format_message()}{hint}")
        return 2
    except (KeyboardInterrupt, typer.Abort):
        _say("perp:", f"{last_signal[-1] if last_signal else 'interrupted'}; no output was written")
        return 130
    except Exception as exc:
        if last_signal:  # a signal arrived and some library re-wrapped its KeyboardInterrupt
            _say("perp:", f"{last_signal[-1]}; no output was written")
            return 130
        return _report_failure(exc)
    finally:
        # cleared on the way out, not on the way in: a signal that arrived while `run`
        # imported this module must still turn a later wrapped error into exit 130
        last_signal.clear()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        sys.stdout.flush()


def _report_failure(exc: Exception) -> int:
    """One line for a failure; the traceback only in debug mode."""
    if _state["debug"]:
        traceback.print_exception(exc)
    if isinstance(exc, PerpError):
        _say("perp: error:", str(exc))
        return exc.exit_code
    # an unexpected failure: still one line
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    _say("perp: internal error:", f"{type(exc).__name__}: {text} (rerun with `perp --debug` for a traceback)")
    return 1
