"""Running compiled training loops over disjoint concepts in threads.

The loops (pixel_kernel, cls_kernel) release the GIL. Each concept's pairs stay in one thread, so no two
threads write the same weight or gradient row, and every row's sums run in the same order whatever
the number of threads: results are bit for bit the same on one thread or many.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch


def concept_parts(cols: np.ndarray, n: int) -> np.ndarray:
    """Bounds of at most N runs of the (sorted) COLS, as equal in length as whole concepts allow."""
    starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]]) if len(cols) else np.zeros(0, np.int64)
    if n <= 1 or len(starts) <= 1:
        return np.array([0, len(cols)])
    at = np.searchsorted(starts, np.linspace(0, len(cols), n + 1)[1:-1]).clip(max=len(starts) - 1)
    return np.unique(np.r_[0, starts[at], len(cols)])


def over_concepts(run: Callable[[int, int], None], cols: np.ndarray) -> None:
    """RUN(first, stop) over the runs of the sorted COLS, split between torch's thread count."""
    n = torch.get_num_threads()
    parts = concept_parts(cols, n) if n > 1 else (0, len(cols))
    if len(parts) <= 2:
        run(int(parts[0]), int(parts[-1]))
        return
    list(_pool(len(parts) - 1).map(lambda i: run(int(parts[i]), int(parts[i + 1])), range(len(parts) - 1)))


@cache
def _pool(n: int) -> ThreadPoolExecutor:
    """A pool of N threads, made once per size."""
    return ThreadPoolExecutor(n, thread_name_prefix="n2vdb-train")
