"""Per-filter thresholds: the top quantile of each filter's stored activations, over the dataset."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

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
                sketch.add(acts_store.dequantise(codes, scales))
                peak = np.maximum(peak, scales.max(axis=0))
                bar.advance(task, len(ids))
        thresholds = sketch.result().numpy()
        _, pooled = acts_store.pooled(con, probe.activation_probe)
    return pa.table(
        {
            "probe_id": pa.array(np.full(probe.n_filters, probe.probe_id, np.int32)),
            "filter": pa.array(np.arange(probe.n_filters, dtype=np.int32)),
            "threshold": thresholds,
            "threshold_bound": peak / 2,
            "max_value": peak * 255,
            "mean_value": pooled.mean(axis=0).astype(np.float64),
        }
    )


def compute_thresholds(store: Store, probe: Probe, quantile: float, finish=None) -> np.ndarray:
    """Per-filter thresholds from the stored activations, into `filters` (threshold_rows). FINISH(con),
    where given (n2vdb.pipeline), runs in the transaction that writes them."""
    table = threshold_rows(store, probe, quantile)
    with store.writing() as con, transaction(con):
        writer.replace_probe_rows(con, "filters", probe.probe_id, table)
        if finish is not None:
            finish(con)
    return table.column("threshold").to_numpy().copy()
