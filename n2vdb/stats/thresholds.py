"""Per-filter thresholds: the top quantile of each filter's stored activations, over the dataset."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from n2vdb import activations as acts_store
from n2vdb.probe import Probe
from n2vdb.progress import progress_bar
from n2vdb.stats.quantile import TopQuantile
from n2vdb.store import writer
from n2vdb.store.connection import first, transaction
from n2vdb.store.sessions import Store


def threshold_rows(store: Store, probe: Probe, quantile: float) -> pa.Table:
    """The probe's `filters` rows, computed from its stored activations.

    Exactly the numpy linear quantile of the dequantised values; since every stored value is within
    half its (image, filter) step of the float value, and order statistics move no more than the
    largest perturbation, each threshold is within threshold_bound = max over images of s_k / 2 of
    the quantile of the float activations.
    """
    with store.reading() as con:
        shape = (probe.n_filters, probe.height, probe.width)
        n_images = first(con.execute("SELECT count(*) FROM activations WHERE probe_id = ?", [probe.activation_probe]))[
            0
        ]
        sketch = TopQuantile(quantile, n_images * probe.height * probe.width)
        peak = np.zeros(probe.n_filters, np.float64)
        with progress_bar() as bar:
            task = bar.add_task("thresholds", total=n_images)
            for ids, codes, scales in acts_store.iter_codes(con, probe.activation_probe, shape):
                add(sketch, torch.from_numpy(codes), torch.from_numpy(scales))
                peak = np.maximum(peak, scales.max(axis=0))
                bar.advance(task, len(ids))
        thresholds = sketch.result().numpy()
        del sketch  # (its values, 0.5% of all, before the means' read: 14 MB at 16,000 Broden images)
        means = acts_store.pooled_mean(con, probe.activation_probe)
    return pa.table(
        {
            "probe_id": pa.array(np.full(probe.n_filters, probe.probe_id, np.int32)),
            "filter": pa.array(np.arange(probe.n_filters, dtype=np.int32)),
            "threshold": thresholds,
            "threshold_bound": peak / 2,
            "max_value": peak * 255,
            "mean_value": means,
        }
    )


# Values above the sketch's bound given to it at once (see add): each costs ~60 bytes on the way
# (its indices, sorted, and its slot), so ~32 MB.
_CANDIDATES = 1 << 19


def add(sketch: TopQuantile, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """sketch.add(dequantise(codes, scales)) for codes [n, K, H, W], scales [n, K]: once the sketch
    holds its KEEP values, only the values above its bound are dequantised and given (most are not:
    they are found on the codes, by code_cutoffs).

    The share of a batch above the bound is KEEP's share of the values seen so far, and KEEP grows
    with the dataset (0.5% of it): in the first batches after the sketch fills, a third of a batch at
    16,000 Broden images, more at full Broden. A batch with more than _CANDIDATES of them is given in
    halves, each cut by the bound the one before raised (measured, thresholds alone, peak RSS from a
    start of 586 MB: at 16,000 Broden-profile images 899-947 -> 799-802 MB, 6.8 -> 7.4 s; at 1,000
    images 731 MB either way)."""
    bound = sketch.bound()
    cutoffs = None if bound is None else code_cutoffs(scales, bound)
    if cutoffs is None:
        sketch.add(acts_store.dequantise(codes, scales))
        return
    live = torch.nonzero(cutoffs.flatten() <= 255).flatten()  # (image, filter) maps with a value above
    maps = codes.flatten(2).flatten(0, 1)[live]
    above = maps >= cutoffs.flatten()[live].clamp(min=0).to(torch.uint8)[:, None]
    if len(codes) > 1 and int(torch.count_nonzero(above)) > _CANDIDATES:
        del maps, above
        half = len(codes) // 2
        add(sketch, codes[:half], scales[:half])
        add(sketch, codes[half:], scales[half:])
        return
    at, position = torch.nonzero(above, as_tuple=True)
    values = maps[at, position].float() * scales.flatten()[live[at]]  # dequantise's own product
    sketch.add_above(live[at] % codes.shape[1], values, codes.shape[0] * codes[0, 0].numel())


def code_cutoffs(scales: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor | None:
    """Per (image, filter), the least stored code whose dequantised value is above the filter's
    threshold (256 where none is), so that codes >= cutoffs is exactly
    activations.dequantise(codes, scales) > thresholds, without dequantising: scales [n, K] float32,
    thresholds [K]. None where that cannot be vouched for (thresholds not float32)."""
    if thresholds.dtype != torch.float32 or scales.dtype != torch.float32:
        return None
    s, t = scales, thresholds.view(1, -1).expand_as(scales)
    # dequantise's value of code c is the float32 product c * s: monotone in c, and within half an
    # ulp of the real product. A code at or below floor(t / s) - 2 is off for certain (its real
    # product is at most t - s, so rounding gives at most t); the boundary lies among the next five,
    # each tried with dequantise's own float32 product (checked below).
    positive = s > 0
    ratio = torch.where(positive, t.double() / torch.where(positive, s, 1).double(), 0)
    low = (torch.floor(ratio) - 2).clamp(-3, 256)
    tried = low[..., None] + torch.arange(1, 6, device=s.device, dtype=low.dtype)
    on = tried.float() * s[..., None] > t[..., None]
    cutoffs = low.long() + 1 + (~on).sum(dim=-1)
    if not bool((on[..., -1] | (tried[..., -1] > 255) | ~positive).all()):
        return None  # the boundary was not among the five (not expected: then the general path)
    # A zero scale stores all-zero maps: on everywhere or nowhere.
    zero = torch.where(t < 0, 0, 256).to(cutoffs.dtype)
    return torch.where(positive, cutoffs, zero).clamp(0, 256)


def compute_thresholds(store: Store, probe: Probe, quantile: float, finish=None) -> np.ndarray:
    """Per-filter thresholds from the stored activations, into `filters` (threshold_rows). FINISH(con),
    where given (n2vdb.pipeline), runs in the transaction that writes them."""
    table = threshold_rows(store, probe, quantile)
    with store.writing() as con, transaction(con):
        writer.replace_probe_rows(con, "filters", probe.probe_id, table)
        if finish is not None:
            finish(con)
    return table.column("threshold").to_numpy().copy()
