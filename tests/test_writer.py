"""The writer layer (store/writer.py): rows land in the column of their name, whatever the table's
column order, and rows whose columns are not the table's are refused before anything is written."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from n2vdb import activations as acts_store
from n2vdb import probe as probes
from n2vdb.errors import N2vdbError
from n2vdb.stats.thresholds import compute_thresholds
from n2vdb.store import write_connection, writer
from n2vdb.store.sessions import Pinned

from helpers import planted_probe


def _filters(con, probe_id: int) -> list[dict]:
    sql = "SELECT probe_id, filter, threshold, threshold_bound, max_value, mean_value FROM filters WHERE probe_id = ?"
    return con.sql(sql + " ORDER BY filter", params=[probe_id]).to_arrow_table().to_pylist()


def _rebuild(con, table: str, columns_sql: str) -> None:
    """What a migration that rebuilds TABLE does: a new column order (and here a new column in the
    middle), the old rows copied by name."""
    con.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
    con.execute(f"CREATE TABLE {table} ({columns_sql})")
    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {table}_old")
    con.execute(f"DROP TABLE {table}_old")


def test_thresholds_land_in_their_columns_after_a_migration_reorders_the_table(tmp_path, edge_broden):
    root, _ = edge_broden
    acts = np.random.default_rng(0).gamma(2.0, 1.0, (4, 3, 5, 6)).astype(np.float32)
    db = tmp_path / "w.duckdb"
    probe_id, _ = planted_probe(db, root, acts, quantile=0.9)
    with write_connection(db) as con:
        before = _filters(con, probe_id)
        # Same-typed columns swapped (filter/probe_id, threshold/threshold_bound, max/mean): a
        # positional copy would write every value into its neighbour without a complaint.
        _rebuild(
            con,
            "filters",
            "filter INTEGER NOT NULL, probe_id INTEGER NOT NULL, note VARCHAR DEFAULT 'added',"
            " threshold_bound DOUBLE NOT NULL, threshold DOUBLE NOT NULL, mean_value DOUBLE NOT NULL,"
            " max_value DOUBLE NOT NULL",
        )
        assert list(writer.columns(con, "filters"))[:2] == ["filter", "probe_id"]
        probe = probes.load(con, probe_id)
        compute_thresholds(Pinned(con), probe, 0.9)
        after = _filters(con, probe_id)
        notes = {n for (n,) in con.execute("SELECT DISTINCT note FROM filters").fetchall()}
    assert after == before
    assert notes == {"added"}  # the new column takes its default
    # and the values are the ones an independent computation gives
    values = acts.transpose(1, 0, 2, 3).reshape(3, -1)
    codes, scales = acts_store.quantise(torch.from_numpy(acts))
    stored = (codes.float() * scales[:, :, None, None]).numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    assert [r["filter"] for r in after] == [0, 1, 2]
    assert all(r["probe_id"] == probe_id for r in after)
    np.testing.assert_allclose([r["threshold"] for r in after], np.quantile(stored, 0.9, axis=1), rtol=1e-6)
    np.testing.assert_allclose([r["max_value"] for r in after], values.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose([r["mean_value"] for r in after], values.mean(axis=1), rtol=1e-5)


def _reordered_activations(con) -> None:
    """The activations table rebuilt with its columns in another order than the schema's."""
    _rebuild(
        con,
        "activations",
        "image_id INTEGER NOT NULL, pooled FLOAT[] NOT NULL, probe_id INTEGER NOT NULL,"
        " scales FLOAT[] NOT NULL, codes BLOB NOT NULL",
    )


def test_activations_round_trip_through_a_reordered_table(tmp_path):
    db = tmp_path / "a.duckdb"
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (3, 2, 4, 5), dtype=np.uint8)
    scales = rng.random((3, 2)).astype(np.float32)
    pooled = rng.random((3, 2)).astype(np.float32)
    with write_connection(db) as con:
        _reordered_activations(con)
        acts_store.write(con, acts_store.to_arrow(7, np.array([4, 5, 6]), codes, scales, pooled))
        [(ids, got_codes, got_scales)] = list(acts_store.iter_codes(con, 7, (2, 4, 5)))
        got_ids, got_pooled = acts_store.pooled(con, 7)
    assert ids.tolist() == [4, 5, 6] and got_ids.tolist() == [4, 5, 6]
    assert np.array_equal(got_codes, codes)
    assert np.array_equal(got_scales, scales)
    assert np.array_equal(got_pooled, pooled)


def test_pooled_means_are_read_across_windows_in_image_order(tmp_path):
    """pooled() fills one [N, K] array from windows of 4,096 rows and sorts it by image id where the
    rows were stored out of order; pooled_mean() is the means' float64 average, summed window by
    window."""
    db = tmp_path / "a.duckdb"
    rng = np.random.default_rng(2)
    n, k = 9000, 3
    ids = rng.permutation(n) + 1
    pooled = rng.random((n, k)).astype(np.float32)
    codes, scales = np.zeros((n, k, 1, 1), np.uint8), np.ones((n, k), np.float32)
    with write_connection(db) as con:
        _reordered_activations(con)
        for lo in range(0, n, 2500):
            part = slice(lo, lo + 2500)
            acts_store.write(con, acts_store.to_arrow(7, ids[part], codes[part], scales[part], pooled[part]))
        got_ids, got = acts_store.pooled(con, 7)
        mean = acts_store.pooled_mean(con, 7)
    order = np.argsort(ids)
    assert got_ids.tolist() == ids[order].tolist()
    assert np.array_equal(got, pooled[order])
    np.testing.assert_allclose(mean, pooled.astype(np.float64).mean(axis=0), rtol=1e-12)


def _filter_rows(**drop_or_add) -> pa.Table:
    columns = {
        "probe_id": pa.array([1, 1], pa.int32()),
        "filter": pa.array([0, 1], pa.int32()),
        "threshold": [0.5, 0.25],
        "threshold_bound": [0.01, 0.02],
        "max_value": [2.0, 3.0],
        "mean_value": [0.1, 0.2],
    }
    for name, value in drop_or_add.items():
        if value is None:
            del columns[name]
        else:
            columns[name] = value
    return pa.table(columns)


@pytest.mark.parametrize(
    "rows, said",
    [
        (_filter_rows(mean_value=None), "rows for table filters lack column(s) mean_value"),
        (_filter_rows(threshold=None, filter=None), "lack column(s) filter, threshold"),
        (_filter_rows(colour=["red", "blue"]), "carry column(s) colour it does not have"),
        (_filter_rows(max_value=None, colour=["a", "b"]), "lack column(s) max_value and carry column(s) colour"),
    ],
)
def test_rows_that_are_not_the_tables_are_refused_and_nothing_is_written(tmp_path, rows, said):
    with write_connection(tmp_path / "r.duckdb") as con:
        writer.insert(con, "filters", _filter_rows(probe_id=pa.array([2, 2], pa.int32())))
        with pytest.raises(N2vdbError) as refused:
            writer.insert(con, "filters", rows)
        assert said in str(refused.value) and "\n" not in str(refused.value)
        with pytest.raises(N2vdbError):  # a replace refuses before it deletes the old rows
            writer.replace_probe_rows(con, "filters", 2, rows)
        assert con.execute("SELECT probe_id, count(*) FROM filters GROUP BY ALL").fetchall() == [(2, 2)]


def test_a_record_batch_and_a_defaulted_column_may_be_written(tmp_path):
    with write_connection(tmp_path / "b.duckdb") as con:
        batch = pa.record_batch(
            {"n_images": [3], "name": ["x"], "n_concepts": [2], "path": ["/data/x"]}
        )  # dataset_id and added_at have defaults
        writer.insert(con, "datasets", batch)
        assert con.execute("SELECT dataset_id, name, path, n_images, n_concepts FROM datasets").fetchall() == [
            (1, "x", "/data/x", 3, 2)
        ]


def test_replace_deletes_only_that_probes_rows_of_those_methods(tmp_path):
    def scores(probe_id: int, method: str, iou: float) -> pa.Table:
        return pa.table(
            {
                "probe_id": pa.array([probe_id], pa.int32()),
                "image_id": pa.array([0], pa.int32()),
                "concept_id": pa.array([1], pa.int32()),
                "method": [method],
                "intersection": pa.array([1], pa.int64()),
                "union_": pa.array([2], pa.int64()),
                "iou": [iou],
                "score": pa.nulls(1, pa.float64()),
            }
        )

    with write_connection(tmp_path / "s.duckdb") as con:
        for probe_id in (1, 2):
            for method in ("best_filter", "segmentation"):
                writer.insert(con, "image_concept_scores", scores(probe_id, method, 0.5))
        writer.replace_probe_rows(
            con, "image_concept_scores", 1, [scores(1, "best_filter", 0.75)], methods=("best_filter",)
        )
        got = con.execute("SELECT probe_id, method, iou FROM image_concept_scores ORDER BY ALL").fetchall()
    assert got == [
        (1, "best_filter", 0.75),
        (1, "segmentation", 0.5),
        (2, "best_filter", 0.5),
        (2, "segmentation", 0.5),
    ]


def test_a_wide_layers_iou_rows_fit_the_writers_default_budget(tmp_path, monkeypatch):
    """A 256-filter layer (AlexNet conv5) against Broden's ~1,200 concepts is 614k IoU rows under a
    primary key: they are written, and replaced (the stage run again: delete and insert in one
    transaction, which a 128MB budget could not hold), under the writer's default memory budget."""
    monkeypatch.delenv("N2VDB_DUCKDB_WRITER_MEMORY", raising=False)
    k, c = 256, 1200
    filters, concepts = (a.ravel().astype(np.int32) for a in np.meshgrid(np.arange(k), np.arange(c), indexing="ij"))
    n = len(filters)
    rows = pa.table(
        {
            "probe_id": np.full(2 * n, 1, np.int32),
            "filter": np.r_[filters, filters],
            "concept_id": np.r_[concepts, concepts],
            "split": pa.array(["train"] * n + ["val"] * n),
            "intersection": np.zeros(2 * n, np.int64),
            "union_": np.ones(2 * n, np.int64),
            "iou": np.zeros(2 * n),
        }
    )
    db = tmp_path / "wide.duckdb"
    for _ in range(2):
        with write_connection(db) as con:
            con.execute("BEGIN")
            writer.replace_probe_rows(con, "filter_concept_iou", 1, rows)
            con.execute("COMMIT")
    with write_connection(db) as con:
        assert con.execute("SELECT count(*) FROM filter_concept_iou").fetchone()[0] == 2 * n
