"""The one worker pool that decodes masks (dataset import, IoU tallies, embedding examples).

decode(item) runs in worker processes (torch's DataLoader: forked on Linux, each worker watching its
parent, stopped when the iterator is dropped, so an interrupted stage leaves none behind), and the
results come back in item order. Workers send chunks of results: one message per image would cost
more than the decoding it saves. An N2vdbError raised by decode (a missing or unreadable mask)
reaches the caller as itself, one line, not wrapped in the worker's traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from torch.utils.data import DataLoader, Dataset

from n2vdb.errors import N2vdbError

Item = TypeVar("Item")
Result = TypeVar("Result")

CHUNK = 32  # results per message from a worker
PREFETCH = 4  # chunks each worker decodes ahead


class _Failed:
    """An N2vdbError caught in a worker, sent back as a result to be raised in order."""

    def __init__(self, error: N2vdbError):
        self.error = error


class _Decoding(Dataset):
    def __init__(self, decode: Callable, items: Sequence):
        self.decode, self.items = decode, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            return self.decode(self.items[index])
        except N2vdbError as error:
            return _Failed(error)


def _as_list(results: list) -> list:
    return results


def decoded(
    decode: Callable[[Item], Result], items: Sequence[Item], workers: int, chunk: int = CHUNK
) -> Iterator[Result]:
    """decode(item) for every item, in order; in WORKERS processes, or in this one when 0. DECODE
    must be picklable where processes spawn (a module-level function, or a partial of one)."""
    if not workers:
        yield from map(decode, items)
        return
    loader = DataLoader(
        _Decoding(decode, items), batch_size=chunk, num_workers=workers, collate_fn=_as_list, prefetch_factor=PREFETCH
    )
    for results in loader:
        for result in results:
            if isinstance(result, _Failed):
                raise result.error
            yield result
