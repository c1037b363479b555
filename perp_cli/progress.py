"""Rich progress bars on stderr, silent when `--quiet` or when stderr is not a terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def make_progress(quiet: bool = False) -> Progress:
    """A progress display for long work; use as a context manager."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet or not sys.stderr.isatty(),
        transient=False,
    )


class Reporter:
    """What a recipe shows while it runs: one-line notes on stderr (rich markup), none when
    `quiet`. The library never prints; a step that has something to say takes a reporter."""

    def __init__(self, quiet: bool = True) -> None:
        self.quiet = quiet

    def note(self, text: str, **style: bool) -> None:
        if not self.quiet:
            console.print(text, **{"soft_wrap": True, **style})


SILENT = Reporter(quiet=True)
