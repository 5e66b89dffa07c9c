"""The significance of a probe (docs/significance.md), as a run keyed by its settings.

1. Selection, on the train split: each concept's top FILTERS filters and each unit's top LABELS labels
   by train IoU (the labels are the ones tested).
2. One pass over the stored activations and the masks (the IoU stage's overlaps,
   stats/iou.iter_batch_overlaps) sums each selected pair's intersection and union under REPLICATES
   Poisson bootstrap weights per image (resample.py), per split.
3. The permutation null on the val split (null.py): a p-value per tested (unit, label).
4. From the stored per-image val scores, the segmentation embedding's IoU under the same weights, and
   its paired difference with the best single filter: an interval and a bootstrap p-value.
5. q-values (Benjamini-Hochberg) within each kind of test of the run, and one write transaction.

Nothing is written until the end: a killed run leaves no rows and runs again from the start.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import duckdb
import numpy as np
import pyarrow as pa
import torch

from n2vdb import timings, validate
from n2vdb.data.broden import BrodenDataset
from n2vdb.errors import UsageError
from n2vdb.probe import Probe
from n2vdb.progress import progress_bar
from n2vdb.significance import null, resample
from n2vdb.stats import iou
from n2vdb.store import writer
from n2vdb.store.connection import first, transaction
from n2vdb.store.sessions import Store

INTERVAL = "percentile"


@dataclass(frozen=True)
class SignificanceSettings:
    replicates: int = 200  # bootstrap replicates R
    level: float = 0.95  # the intervals' confidence level
    labels: int = 10  # each unit's best labels (train IoU) tested against the null
    filters: int = 10  # each concept's best filters (train IoU) given intervals
    permutations: int = 1000  # null draws per test: the smallest p-value is 1 / (permutations + 1)
    block: int = 32  # val images of one size whose unit and label masks a permutation pairs
    seed: int = 0  # the bootstrap weights and the permutations

    def __post_init__(self) -> None:
        validate.whole("replicates", self.replicates, 10, 100_000)
        if not (isinstance(self.level, float | int) and 0.5 <= self.level < 1):
            raise UsageError("level must be a confidence level in [0.5, 1), such as 0.95", param="level")
        validate.whole("labels", self.labels, 1, 10_000)
        validate.whole("filters", self.filters, 1, 100_000)
        validate.whole("permutations", self.permutations, 1, 1_000_000)
        validate.whole("block", self.block, 2, 4096)
        validate.whole("seed", self.seed, 0, 2**63 - 1)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Selection:
    """The (filter, concept) pairs a run gives intervals, sorted by concept then filter, and which of
    them it tests (a unit's top labels with a non-zero train intersection)."""

    concept: np.ndarray  # [S] int64
    filter: np.ndarray  # [S] int64
    label_rank: np.ndarray  # [S] the concept's rank among the filter's labels by train IoU
    tested: np.ndarray  # [S] bool


def not_applicable(con: duckdb.DuckDBPyConnection, probe: Probe) -> str | None:
    """Why a run cannot be made of PROBE (its scores are not all there, or are not set IoUs this run
    can resample, or it has no val image to test on), or None where it can."""
    status, kind, mode = first(
        con.execute(
            "SELECT status, settings->>'kind', coalesce(settings->>'iou_mode', 'net2vec') FROM probes"
            " WHERE probe_id = ?",
            [probe.probe_id],
        )
    )
    if kind == "vector":
        return f"probe {probe.probe_id} is a vector layer: it has no single-filter IoUs to test"
    if status != "complete":
        return f"probe {probe.probe_id} is at stage {status!r}; finish its ingest first (n2vdb ingest)"
    if mode != "net2vec":
        return (
            f"probe {probe.probe_id} uses --iou-mode {mode}, whose IoU is not a sum over the images of a label; "
            "significance needs a net2vec-mode probe (ingest it again with --iou-mode net2vec)"
        )
    val = first(
        con.execute(
            "SELECT count(*) FROM activations a JOIN images i ON i.dataset_id = ? AND i.image_id = a.image_id"
            " WHERE a.probe_id = ? AND i.split = 'val'",
            [probe.dataset_id, probe.activation_probe],
        )
    )[0]
    return None if val else f"probe {probe.probe_id} has no val images to test on"


def check_probe(con: duckdb.DuckDBPyConnection, probe: Probe) -> None:
    """Refuse a probe not_applicable names a reason for."""
    reason = not_applicable(con, probe)
    if reason:
        raise UsageError(reason)


def find_run(con: duckdb.DuckDBPyConnection, probe_id: int, settings: SignificanceSettings) -> int | None:
    row = first(
        con.execute(
            "SELECT run_id FROM significance_runs WHERE probe_id = ? AND settings_key = ?", [probe_id, settings.key]
        )
    )
    return row[0] if row else None


def select(con: duckdb.DuckDBPyConnection, probe_id: int, settings: SignificanceSettings) -> Selection:
    """Each concept's top filters (as the best_filters view ranks them: ties to the lower filter) and
    each filter's top labels with some train overlap, by train IoU."""
    rows = con.execute(
        """
        WITH ranked AS (
            SELECT filter, concept_id, intersection,
                   row_number() OVER (PARTITION BY concept_id ORDER BY iou DESC, filter) AS filter_rank,
                   row_number() OVER (PARTITION BY filter ORDER BY intersection > 0 DESC, iou DESC, concept_id)
                       AS label_rank
            FROM filter_concept_iou WHERE probe_id = ? AND split = 'train'
        )
        SELECT concept_id, filter, label_rank, label_rank <= ? AND intersection > 0 AS tested
        FROM ranked WHERE filter_rank <= ? OR (label_rank <= ? AND intersection > 0)
        ORDER BY concept_id, filter
        """,
        [probe_id, settings.labels, settings.filters, settings.labels],
    ).fetchnumpy()
    return Selection(
        rows["concept_id"].astype(np.int64),
        rows["filter"].astype(np.int64),
        rows["label_rank"].astype(np.int64),
        rows["tested"].astype(bool),
    )


def filter_replicates(
    con: duckdb.DuckDBPyConnection,
    probe: Probe,
    dataset: BrodenDataset,
    selection: Selection,
    settings: SignificanceSettings,
    workers: int,
) -> resample.RatioSums:
    """Step 2: the selected pairs' IoU sums (row 2 s + split: 0 train, 1 val), plain and under each
    replicate's weights, in one pass over the IoU stage's per-image overlaps."""
    concept_ids = np.array(sorted(dataset.labels), dtype=np.int64)
    col = np.searchsorted(concept_ids, selection.concept)
    degree = np.bincount(col, minlength=len(concept_ids))
    start = np.cumsum(degree) - degree  # the concept's first selected pair (they are sorted by concept)
    split_of = iou.split_lookup(dataset)
    sums = resample.RatioSums(2 * len(selection.filter), settings.replicates, settings.seed)
    thresholds = iou.thresholds_for(con, probe.probe_id, "net2vec")
    total = first(con.execute("SELECT count(*) FROM activations WHERE probe_id = ?", [probe.activation_probe]))[0]
    with progress_bar() as bar:
        task = bar.add_task("significance: bootstrap", total=total)
        for batch in iou.iter_batch_overlaps(con, probe, dataset, thresholds, "net2vec", workers):
            bar.advance(task, len(batch.image_ids))
            cols = np.searchsorted(concept_ids, batch.concept_ids)
            d = degree[cols]
            if not d.sum():
                continue
            pair = np.repeat(np.arange(len(d)), d)
            s = np.repeat(start[cols] - (np.cumsum(d) - d), d) + np.arange(len(pair))  # each entry's pair
            image = batch.pair_image[pair]
            k = torch.from_numpy(selection.filter[s])
            pair_t, image_t = torch.from_numpy(pair), torch.from_numpy(image)
            i_e = batch.intersection[pair_t, k].double()
            u_e = batch.mask_area[image_t, k].double() + batch.label_area[pair_t].double() - i_e
            sums.add(2 * s + split_of[batch.image_ids[image]], batch.image_ids[image], i_e, u_e)
    return sums


@dataclass
class Embeddings:
    concept: np.ndarray  # [E] concepts with a segmentation embedding and val images
    best_filter: np.ndarray  # [E] the best_filters view's filter
    iou: np.ndarray  # [E] val IoU, from the per-image scores
    replicates: np.ndarray  # [E, R]


def embedding_replicates(con: duckdb.DuckDBPyConnection, probe: Probe, settings: SignificanceSettings) -> Embeddings:
    """Step 4's first half: each segmentation embedding's val IoU from its stored per-image scores,
    and under each replicate's weights."""
    concepts = con.execute(
        "SELECT DISTINCT s.concept_id, b.filter FROM image_concept_scores s"
        " JOIN best_filters b ON b.probe_id = s.probe_id AND b.concept_id = s.concept_id"
        " WHERE s.probe_id = ? AND s.method = 'segmentation' ORDER BY s.concept_id",
        [probe.probe_id],
    ).fetchnumpy()
    ids = concepts["concept_id"].astype(np.int64)
    sums = resample.RatioSums(len(ids), settings.replicates, settings.seed)
    reader = con.sql(
        "SELECT image_id, concept_id, intersection, union_ FROM image_concept_scores"
        " WHERE probe_id = $p AND method = 'segmentation'",
        params={"p": probe.probe_id},
    ).to_arrow_reader(resample.RatioSums.CHUNK)
    for part in reader:
        image_ids, concept, i_e, u_e = (part.column(j).to_numpy().astype(np.int64) for j in range(4))
        sums.add(np.searchsorted(ids, concept), image_ids, torch.from_numpy(i_e), torch.from_numpy(u_e))
    return Embeddings(ids, concepts["filter"].astype(np.int64), sums.estimates(), sums.replicate_ratios())


@dataclass
class Classifications:
    concept: np.ndarray  # [C] concepts with a classification embedding and balanced val pairs
    accuracy: np.ndarray  # [C] balanced val accuracy, as embeddings.val_score
    replicates: np.ndarray  # [C, R]


def classification_replicates(
    con: duckdb.DuckDBPyConnection, probe: Probe, settings: SignificanceSettings
) -> Classifications:
    """Step 4's second half: each classification embedding's accuracy on its balanced val pairs,
    drawn again as training drew them (embed/classification.val_sample, from the probe's training
    seed), and under each replicate's weights (the pair's image's)."""
    from n2vdb.embed import classification
    from n2vdb.embed.stage import classification_inputs

    image_ids, features, labels, is_val, concepts = classification_inputs(con, probe, probe.dataset_id)
    stored = {
        c: (w, b)
        for c, w, b in con.execute(
            "SELECT e.concept_id, e.weights, e.bias FROM embeddings e JOIN probes p USING (probe_id)"
            " WHERE e.probe_id = ? AND e.kind = 'classification' AND e.n_filters = p.n_filters",
            [probe.probe_id],
        ).fetchall()
    }
    r = settings.replicates
    if not len(concepts) or not bool(is_val.any()) or any(int(c) not in stored for c in concepts):
        return Classifications(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, r)))
    weights = torch.tensor([stored[int(c)][0] for c in concepts], dtype=torch.float32).T.contiguous()
    bias = torch.tensor([stored[int(c)][1] for c in concepts], dtype=torch.float32)
    seed = first(
        con.execute("SELECT (settings->'train'->>'seed')::BIGINT FROM probes WHERE probe_id = ?", [probe.probe_id])
    )[0]
    val_rows = np.flatnonzero(is_val.numpy()).astype(np.int32)
    pairs = classification.val_sample(labels, val_rows, torch.Generator().manual_seed(seed))
    rows, cols, hits = classification.val_pair_hits(features, weights, bias, labels, val_rows, pairs)
    sums = resample.RatioSums(len(concepts), r, settings.seed)
    sums.add(cols, image_ids[rows], torch.from_numpy(hits), torch.ones(len(cols)))
    keep = sums.denominator > 0
    return Classifications(concepts[keep], sums.estimates()[keep], sums.replicate_ratios()[keep])


def run(store: Store, probe: Probe, dataset: BrodenDataset, settings: SignificanceSettings, workers: int = 0) -> int:
    """Intervals and tests of PROBE under SETTINGS, stored; returns the run_id (that of the stored run,
    where these settings have one already)."""
    with store.reading() as con:
        found = find_run(con, probe.probe_id, settings)
        if found is not None:
            return found
    with timings.timed("significance") as timing:
        with store.reading() as con:
            selection = select(con, probe.probe_id, settings)
            sums = filter_replicates(con, probe, dataset, selection, settings, workers)
            tested = np.flatnonzero(selection.tested)
            counts = null.counts(
                con,
                probe,
                dataset,
                selection.filter[tested],
                selection.concept[tested],
                settings.permutations,
                settings.block,
                settings.seed,
                workers,
            )
            embedded = embedding_replicates(con, probe, settings)
            classified = classification_replicates(con, probe, settings)
            timing.images = first(
                con.execute("SELECT count(*) FROM activations WHERE probe_id = ?", [probe.activation_probe])
            )[0]
        intervals, tests = _rows(selection, sums, tested, counts, embedded, classified, settings)
    with store.writing() as con, transaction(con):
        run_id = first(
            con.execute(
                "SELECT coalesce(max(run_id), 0) + 1 FROM significance_runs WHERE probe_id = ?", [probe.probe_id]
            )
        )[0]
        con.execute(
            "INSERT INTO significance_runs (probe_id, run_id, settings_key, settings, replicates, level, labels,"
            " filters, permutations, block, seed, interval) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                probe.probe_id,
                run_id,
                settings.key,
                json.dumps(asdict(settings), sort_keys=True),
                settings.replicates,
                settings.level,
                settings.labels,
                settings.filters,
                settings.permutations,
                settings.block,
                settings.seed,
                INTERVAL,
            ],
        )
        head = {"probe_id": probe.probe_id, "run_id": run_id}
        writer.insert(con, "score_intervals", _with_head(head, intervals))
        writer.insert(con, "significance_tests", _with_head(head, tests))
        timings.save(con, probe.probe_id, [timing])
    return run_id


def _lists(rows: np.ndarray) -> pa.Array:
    """float rows [n, R] as a FLOAT[] column, without a Python list per row."""
    flat = pa.array(rows.astype(np.float32).ravel())
    return pa.ListArray.from_arrays(pa.array(np.arange(len(rows) + 1, dtype=np.int32) * rows.shape[1]), flat)


def _with_head(head: dict, columns: dict) -> pa.Table:
    n = len(next(iter(columns.values())))
    return pa.table({**{k: pa.array(np.full(n, v, np.int32)) for k, v in head.items()}, **columns})


def _rows(
    selection: Selection,
    sums: resample.RatioSums,
    tested: np.ndarray,
    counts: null.NullCounts,
    embedded: Embeddings,
    classified: Classifications,
    settings: SignificanceSettings,
) -> tuple[dict, dict]:
    """(score_intervals columns, significance_tests columns) of a run, without its probe and run ids."""
    n = len(selection.filter)
    reps = sums.replicate_ratios()
    lower, upper = resample.percentile_interval(reps, settings.level)
    present = sums.denominator > 0
    pair = np.repeat(np.arange(n), 2)
    split = np.tile(np.array(["train", "val"]), n)

    # The gain: embedding minus its best filter, both on val, under the same weights.
    row_of = {(int(c), int(f)): 2 * j + 1 for j, (c, f) in enumerate(zip(selection.concept, selection.filter))}
    best_rows = np.array(
        [row_of.get((int(c), int(f)), -1) for c, f in zip(embedded.concept, embedded.best_filter)], dtype=np.int64
    )
    has_best = best_rows >= 0
    best_iou = np.where(has_best, sums.estimates()[best_rows], np.nan)
    gain = embedded.iou - best_iou
    gain_reps = embedded.replicates - np.where(has_best[:, None], reps[best_rows], np.nan)
    emb_lower, emb_upper = resample.percentile_interval(embedded.replicates, settings.level)
    gain_lower, gain_upper = resample.percentile_interval(gain_reps, settings.level)

    cls_lower, cls_upper = resample.percentile_interval(classified.replicates, settings.level)
    e, n_cls = len(embedded.concept), len(classified.concept)
    intervals = {
        "statistic": ["filter_iou"] * int(present.sum())
        + ["embedding_iou"] * e
        + ["embedding_gain"] * e
        + ["classification_accuracy"] * n_cls,
        "filter": np.r_[
            selection.filter[pair][present], np.full(e, -1), embedded.best_filter, np.full(n_cls, -1)
        ].astype(np.int32),
        "concept_id": np.r_[
            selection.concept[pair][present], embedded.concept, embedded.concept, classified.concept
        ].astype(np.int32),
        "split": list(split[present]) + ["val"] * (2 * e + n_cls),
        "estimate": np.r_[sums.estimates()[present], embedded.iou, gain, classified.accuracy],
        "lower": np.r_[lower[present], emb_lower, gain_lower, cls_lower],
        "upper": np.r_[upper[present], emb_upper, gain_upper, cls_upper],
        "replicates": _lists(np.r_[reps[present], embedded.replicates, gain_reps, classified.replicates]),
    }
    intervals["filter"] = pa.array(intervals["filter"], pa.int32(), mask=intervals["filter"] < 0)

    observed = counts.observed()
    testable = ~np.isnan(observed)
    label_p = np.where(testable, resample.monte_carlo_p(counts.exceed(), counts.permutations), np.nan)
    defined = ~np.isnan(gain_reps)
    gain_p = np.where(
        defined.any(axis=1) & has_best,
        resample.monte_carlo_p(((gain_reps <= 0) & defined).sum(axis=1), defined.sum(axis=1)),
        np.nan,
    )
    keep_gain = ~np.isnan(gain_p)
    tests = {
        "test": ["label"] * int(testable.sum()) + ["embedding_gain"] * int(keep_gain.sum()),
        "filter": np.r_[selection.filter[tested][testable], embedded.best_filter[keep_gain]].astype(np.int32),
        "concept_id": np.r_[selection.concept[tested][testable], embedded.concept[keep_gain]].astype(np.int32),
        "rank": pa.array(
            np.r_[selection.label_rank[tested][testable], np.zeros(int(keep_gain.sum()))].astype(np.int32),
            mask=np.r_[np.zeros(int(testable.sum()), bool), np.ones(int(keep_gain.sum()), bool)],
        ),
        "estimate": np.r_[observed[testable], gain[keep_gain]],
        "null_mean": pa.array(
            np.r_[counts.null_mean()[testable], np.zeros(int(keep_gain.sum()))],
            mask=np.r_[np.zeros(int(testable.sum()), bool), np.ones(int(keep_gain.sum()), bool)],
        ),
        "p_value": np.r_[label_p[testable], gain_p[keep_gain]],
        "q_value": np.r_[resample.bh_q_values(label_p[testable]), resample.bh_q_values(gain_p[keep_gain])],
    }
    return intervals, tests
