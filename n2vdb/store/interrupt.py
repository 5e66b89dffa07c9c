"""Running a statement so that Ctrl-C, SIGTERM and a time limit stop it within a moment.

DuckDB runs a statement in C++ on the calling thread, and Python runs a signal handler only when
that thread comes back to the interpreter: a long query on the main thread ignores Ctrl-C until it
ends (an endless recursive CTE never does). So the statement runs on a worker thread while the main
thread waits in short steps, where signals arrive; on a signal or at the deadline the main thread
calls DuckDB's interrupt, which stops the statement at its next check.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import duckdb

from n2vdb.errors import QueryError, UsageError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0  # readers: long enough for any named query, short enough not to hold the lock for hours
_STEP_S = 0.05
_AFTER_INTERRUPT_S = 5.0  # how long to wait for the statement to notice the interrupt


class QueryTimeout(QueryError):
    pass


def timeout_s(given: float | None = None) -> float | None:
    """The time limit of a read: GIVEN (a --timeout flag), else N2VDB_TIMEOUT, else DEFAULT_TIMEOUT_S;
    0 means none."""
    if given is None:
        text = os.environ.get("N2VDB_TIMEOUT")
        if text is None:
            return DEFAULT_TIMEOUT_S
        try:
            given = float(text)
        except ValueError:
            raise UsageError(f"N2VDB_TIMEOUT={text!r}: expected seconds, e.g. 600 (0: no limit)") from None
    if not 0 <= given < float("inf"):
        raise UsageError(f"timeout must be a number of seconds, 0 or more (0: no limit), not {given}", param="timeout")
    return given or None


def run(con: duckdb.DuckDBPyConnection, work: Callable[[], T], limit_s: float | None = None) -> T:
    """WORK() (statements on CON) on a worker thread; a KeyboardInterrupt or Terminated on this
    thread, or LIMIT_S seconds passing, interrupts CON: the exception is raised again here, the time
    limit as QueryTimeout."""
    box: dict = {}
    finished = threading.Event()

    def worker() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - raised again on the calling thread
            box["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=worker, name="n2vdb-statement", daemon=True).start()
    deadline = None if limit_s is None else time.monotonic() + limit_s
    timed_out = False
    try:
        # An Event, not Thread.join: a join that an exception breaks can report a live thread as done.
        while not finished.wait(_STEP_S):
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                break
    except BaseException:
        con.interrupt()
        finished.wait(_AFTER_INTERRUPT_S)
        raise
    if timed_out:
        con.interrupt()
        finished.wait(_AFTER_INTERRUPT_S)
        raise QueryTimeout(
            f"the query ran past its time limit of {limit_s:g} s and was stopped; "
            "--timeout SECONDS or N2VDB_TIMEOUT changes the limit (0: none)"
        )
    if "error" in box:
        raise box["error"]
    return box.get("value")
