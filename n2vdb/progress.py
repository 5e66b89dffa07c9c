"""Progress bars on stderr, so stdout carries only data."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr = Console(stderr=True, soft_wrap=True)


def progress_bar() -> Progress:
    quiet = os.environ.get("N2VDB_QUIET") == "1"
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
        disable=quiet or not sys.stderr.isatty(),
    )


def say(message: str) -> None:
    """A status line on stderr (suppressed by N2VDB_QUIET=1)."""
    if os.environ.get("N2VDB_QUIET") != "1":
        stderr.print(message, highlight=False)
