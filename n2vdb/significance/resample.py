"""Poisson bootstrap weights keyed by image, percentile intervals, p-values and q-values.

Each image gets one weight per replicate, a Poisson(1) draw from a counter-based hash of (seed, image
id, replicate): the same image gets the same weights in any batch, shard or resumed run, so every
statistic of a run (a filter's IoU, an embedding's IoU, their difference) is resampled with the same
weights and paired differences are paired. A weighted sum over the images is one replicate of the
sum; as the number of images grows the Poisson bootstrap agrees with resampling images with
replacement (Hanley & MacGibbon 2006), and it needs no count of the images in advance, so it streams.
"""

from __future__ import annotations

import math

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Poisson(1)'s CDF: a uniform u maps to the number of entries at most u (the weight). Past 20 the
# remaining mass is below 2^-53, the resolution of u.
_POISSON_CDF = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(21)])


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose output bits look independent."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def poisson_weights(seed: int, image_ids: np.ndarray, replicates: int) -> np.ndarray:
    """uint8 [len(image_ids), REPLICATES]: image i's Poisson(1) weight in each replicate."""
    ids = np.asarray(image_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(_mix(np.uint64(seed) ^ _GOLDEN) + ids)  # one stream per (seed, image)
        counter = (np.arange(1, replicates + 1, dtype=np.uint64) * _GOLDEN) & _MASK
        bits = _mix(key[:, None] + counter[None, :])
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.searchsorted(_POISSON_CDF, uniform, side="right").astype(np.uint8)


def ratios(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (a replicate that drew no image)."""
    out = np.full(np.shape(numerator), np.nan)
    np.divide(numerator, denominator, out=out, where=np.asarray(denominator) > 0)
    return out


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) [...] of replicates [..., R]: the (1 - level) / 2 and (1 + level) / 2 quantiles,
    interpolated between ranks as numpy's default, over the replicates that are defined (NaN where
    none is). Vectorised over rows: np.nanquantile loops over them in Python."""
    tail = (1.0 - level) / 2.0
    reps = np.sort(np.asarray(replicates, dtype=np.float64), axis=-1)  # NaN sorts last
    if not reps.shape[-1]:
        return np.full(reps.shape[:-1], np.nan), np.full(reps.shape[:-1], np.nan)
    defined = (~np.isnan(reps)).sum(axis=-1)
    bounds = []
    for q in (tail, 1.0 - tail):
        position = np.maximum(defined - 1, 0) * q
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, np.maximum(defined - 1, 0))
        low = np.take_along_axis(reps, below[..., None], axis=-1)[..., 0]
        high = np.take_along_axis(reps, above[..., None], axis=-1)[..., 0]
        value = low + (position - below) * (high - low)
        bounds.append(np.where(defined > 0, value, np.nan))
    return bounds[0], bounds[1]


def monte_carlo_p(exceed: np.ndarray, draws: int) -> np.ndarray:
    """(1 + EXCEED) / (1 + DRAWS): a Monte Carlo p-value that is never 0, and valid when the observed
    statistic is exchangeable with the draws (Phipson & Smyth 2010)."""
    return (1.0 + np.asarray(exceed, dtype=np.float64)) / (1.0 + draws)


def bh_q_values(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of P (NaN entries are no test and stay NaN): the smallest false
    discovery rate at which each test is a discovery."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if not m:
        return q
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def add_weighted(sums: list, rows: np.ndarray, image_ids: np.ndarray, values: list, seed: int, replicates: int) -> None:
    """sums[j][rows[e], r] += w(image_ids[e], r) * values[j][e] for every entry e: one bootstrap step
    of a streamed sum. SUMS are float64 torch tensors [n, REPLICATES]; VALUES float64 tensors [E].
    Entries whose value is 0 add nothing and are skipped (most intersections are 0)."""
    import torch

    if not len(rows):
        return
    images, image_of = np.unique(image_ids, return_inverse=True)
    # float32 products are exact (a union below 2^19 pixels, 724 x 724 masks, times a weight of at most 21:
    # below 2^24); a batch's sums are rounded to float32 once, a relative 6e-8, before the float64 totals.
    weights = torch.from_numpy(poisson_weights(seed, images, replicates)).float()
    image_of, at = torch.from_numpy(image_of), torch.from_numpy(np.asarray(rows, dtype=np.int64))
    for total, value in zip(sums, values):
        nonzero = torch.nonzero(value).flatten()
        where, inverse = torch.unique(at[nonzero], return_inverse=True)
        part = torch.zeros(len(where), replicates)
        part.index_add_(0, inverse, weights[image_of[nonzero]] * value[nonzero, None].float())
        total.index_add_(0, where, part.double())


class RatioSums:
    """N ratios' numerators and denominators, summed plainly and under each bootstrap replicate's
    weights, entry by entry (an entry: a ratio's row, its image and its two counts). One of these
    holds a run's filter IoUs, one its embedding IoUs, one its classification accuracies."""

    CHUNK = 1 << 14  # entries weighted at once: memory holds CHUNK x R weights

    def __init__(self, n: int, replicates: int, seed: int) -> None:
        import torch

        self.replicates, self.seed = replicates, seed
        self.plain = [torch.zeros(n, dtype=torch.float64) for _ in range(2)]
        self.weighted = [torch.zeros(n, replicates, dtype=torch.float64) for _ in range(2)]

    def add(self, rows: np.ndarray, image_ids: np.ndarray, numerator, denominator) -> None:
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        values = [torch.as_tensor(v).double() for v in (numerator, denominator)]
        at = torch.from_numpy(rows)
        for total, value in zip(self.plain, values):
            total.index_add_(0, at, value)
        for lo in range(0, len(rows), self.CHUNK):
            part = slice(lo, lo + self.CHUNK)
            add_weighted(
                self.weighted, rows[part], image_ids[part], [v[part] for v in values], self.seed, self.replicates
            )

    @property
    def denominator(self) -> np.ndarray:
        return self.plain[1].numpy()

    def estimates(self) -> np.ndarray:
        """[N] numerator / denominator (NaN where nothing was added)."""
        return ratios(self.plain[0].numpy(), self.plain[1].numpy())

    def replicate_ratios(self) -> np.ndarray:
        """[N, R] the ratios in each replicate (NaN where a replicate drew no image of the ratio's)."""
        return ratios(self.weighted[0].numpy(), self.weighted[1].numpy())
