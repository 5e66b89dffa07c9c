"""Progress bars on stderr, so stdout carries only data."""

from __future__ import annotations

import errno
import io
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# markup=False: what n2vdb prints carries user text (names, paths, SQL), which must never be parsed as markup.
stderr = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def progress_bar() -> Progress:
    quiet = os.environ.get("N2VDB_QUIET") == "1"
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
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
        stderr.print(message, highlight=False, markup=False)


class ClosedOutput(io.TextIOBase):
    """Stands in for a stdout the process was started without (`>&-`): commands that print nothing
    work, and the first write fails with an OSError the CLI reports on one line."""

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")
