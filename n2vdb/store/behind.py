"""Writing behind the producer: the database writes of a long stage in a thread of their own.

Extraction is a loop of forward pass then write (an insert, and every few batches the checkpoint
DuckDB makes when a write session closes). Both release the GIL, so a writer thread takes the writes
off the forward pass's path. Items are written in the order produced, each as its own commit, so an
interruption leaves a prefix of them, as before; at most DEPTH wait in between.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

Item = TypeVar("Item")

_DONE = object()


def write_behind(write: Callable[[Item], None], items: Iterable[Item], depth: int = 2) -> None:
    """write(item) for every item, in order, in one writer thread while ITEMS produces the next.
    An error in write stops the producer at its next item and is raised here; an error or interrupt
    in the producer lets the writer finish the items already handed over (each a whole commit),
    then is raised."""
    pending: queue.Queue = queue.Queue(depth)
    failed: list[BaseException] = []

    def run() -> None:
        while (item := pending.get()) is not _DONE:
            if failed:
                continue  # drain what was handed over after a failure
            try:
                write(item)
            except BaseException as error:  # noqa: BLE001 (raised again in the producer's thread)
                failed.append(error)

    thread = threading.Thread(target=run, name="n2vdb-writer", daemon=True)
    thread.start()
    try:
        for item in items:
            if failed:
                break
            pending.put(item)
    finally:
        pending.put(_DONE)
        thread.join()
    if failed:
        raise failed[0]
