"""The reference's batching, for all concepts at once: each concept takes its own examples in the
epoch's order in batches of a fixed size (the last one smaller) and divides its loss by the batch's
own count; step t of the joint trainer is every concept's t-th batch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def own_batches(cols: np.ndarray, rank: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For examples given by their concept column COLS and epoch rank RANK: per step, (indices into
    cols, 1 / own batch count of each), every concept's t-th batch in step t."""
    by = np.lexsort((rank, cols))  # by column, then epoch order
    sorted_cols = cols[by]
    starts = np.flatnonzero(np.r_[True, sorted_cols[1:] != sorted_cols[:-1]]) if len(by) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(by)])
    position = np.arange(len(by)) - np.repeat(starts, sizes)
    step = position // batch_size
    count = np.minimum(batch_size, np.repeat(sizes, sizes) - step * batch_size)
    by_step = np.argsort(step, kind="stable")
    step, chosen, count = step[by_step], by[by_step], count[by_step]
    bounds = np.flatnonzero(np.r_[True, step[1:] != step[:-1], True]) if len(step) else []
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield chosen[a:b], 1.0 / count[a:b]


class RowMomentum:
    """torch's SGD with momentum (v = m v + g; w -= lr v) for a [C, ...] parameter whose rows are
    separate problems: only the rows that had a batch in a step move, their velocity included, as
    each concept's own optimiser would, in place (the other rows are not touched). The parameter is
    a torch tensor or a numpy array (the same float32 operations)."""

    def __init__(self, param: torch.Tensor | np.ndarray, momentum: float = 0.9) -> None:
        self.velocity = np.zeros_like(param) if isinstance(param, np.ndarray) else torch.zeros_like(param)
        self.momentum = momentum

    def step(self, param: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """PARAM[rows] moves by GRAD [len(rows), ...] (rows distinct)."""
        velocity = self.momentum * self.velocity[rows] + grad
        self.velocity[rows] = velocity
        param[rows] = param[rows] - lr * velocity
