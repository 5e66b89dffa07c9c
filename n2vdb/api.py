"""The Python API: every CLI command is one call here, for notebooks and scripts.

    >>> from n2vdb import api
    >>> probe_id = api.ingest("alexnet", "conv5", weights="random", db="n2v.duckdb")
    >>> api.query("nearest", concept="red", db="n2v.duckdb").to_pylist()
    >>> ids, acts = api.activations(probe_id, db="n2v.duckdb")   # float32 [N, K, H, W]

Results are pyarrow Tables (`.to_pandas()` gives a DataFrame where pandas is installed).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from n2vdb import probe as probes_mod
from n2vdb import queries
from n2vdb.errors import N2vdbError
from n2vdb.store import connect, db_path, migrate, read_connection, refuse_database_path, sandbox, write_connection
from n2vdb.store.connection import database_files

# torch-backed modules (ingest, models, activations), numpy and the dataset modules are imported inside
# the functions that need them, so queries and SQL answer without paying their import time.

if TYPE_CHECKING:
    import numpy as np

PathLike = str | os.PathLike | None


def add_dataset(path: str | Path, name: str, db: PathLike = None) -> int:
    from n2vdb.data import importer

    importer.check_name(name)  # before a database is created for nothing
    with _removed_if_refused(db), write_connection(db) as con:
        return importer.add_dataset(con, path, name)


def synth(
    path: str | Path,
    images: int = 300,
    size: int = 227,
    seed: int = 0,
    name: str | None = "synthetic",
    db: PathLike = None,
    profile: str = "builtin",
) -> Path:
    """Generate a Broden-format concept set at PATH (PROFILE: builtin, or broden for Broden's
    categories and density); registers it under NAME unless NAME is None."""
    from n2vdb.data import importer
    from n2vdb.data import synth as synth_mod
    from n2vdb.data.writing import os_errors

    if name:
        importer.check_name(name)  # before any file is written
    with os_errors("write the concept set", path):
        root = synth_mod.generate_profile(path, profile, images=images, size=size, seed=seed)
    if name:
        add_dataset(root, name, db)
    return root


def fetch_broden(release: str, directory: str | Path) -> Path:
    from n2vdb.data import fetch as fetch_mod

    return fetch_mod.fetch(release, Path(directory))


def datasets(db: PathLike = None) -> pa.Table:
    from n2vdb.data import importer

    with read_connection(db) as con:
        return pa.Table.from_pylist(importer.list_datasets(con))


def ingest(model: str, layer: str, db: PathLike = None, **options) -> int:
    """Run or resume every stage of a probe. Options are IngestOptions fields; training settings may be
    passed as train=TrainSettings(...)."""
    from n2vdb.ingest import IngestOptions
    from n2vdb.ingest import ingest as run_ingest
    from n2vdb.store.sessions import Store

    settings = IngestOptions(**options)  # nonsense is refused before the database is touched
    with _removed_if_refused(db):
        with write_connection(db):
            pass  # create and upgrade the database before the ingest's short sessions begin
        return run_ingest(Store(db), model, layer, settings)


@contextlib.contextmanager
def _removed_if_refused(db: PathLike) -> Iterator[None]:
    """For a command that may create the database: bad input found once it exists (an unknown model,
    an unreadable weights file, a malformed dataset) removes a database this call created and that
    holds no probe, so the user has what they had before: no file."""
    fresh = not db_path(db).exists()
    try:
        yield
    except N2vdbError:
        if fresh and db_path(db).exists():
            with read_connection(db) as con:
                empty = not probes_mod.count(con)
            if empty:
                for path in database_files(db):
                    path.unlink(missing_ok=True)
        raise


def formulas(
    probe: int | None = None,
    db: PathLike = None,
    beam_size: int = 5,
    max_length: int = 3,
    penalty: float = 1.0,
    categories: list[str] | None = None,
    split: str = "all",
    workers: int = 0,
) -> int:
    """Each unit's compositional formula (compexp's beam search, n2vdb/formulas) for PROBE (default:
    the latest complete one); returns the run_id. The same settings again find the stored run."""
    from n2vdb.formulas import stage

    settings = stage.FormulaSettings(
        beam_size, max_length, penalty, tuple(categories) if categories is not None else None, split
    )
    return _analysis(stage, settings, probe, db, workers)


def significance(
    probe: int | None = None,
    db: PathLike = None,
    replicates: int = 200,
    level: float = 0.95,
    labels: int = 10,
    filters: int = 10,
    permutations: int = 1000,
    seed: int = 0,
    workers: int = 0,
    block: int = 32,
) -> int:
    """Bootstrap intervals and permutation p- and q-values (n2vdb/significance) for PROBE (default:
    the latest complete one); returns the run_id. The same settings again find the stored run."""
    from n2vdb.significance import stage

    settings = stage.SignificanceSettings(replicates, level, labels, filters, permutations, block, seed)
    return _analysis(stage, settings, probe, db, workers)


def significance_where_it_applies(probe: int, db: PathLike = None, workers: int = 0) -> tuple[int | None, str | None]:
    """api.significance with its defaults, as `n2vdb ingest` runs it after every probe: (run_id, None),
    or (None, why not) for a probe it does not apply to (a vector layer, netdissect mode, no val images)."""
    from n2vdb.significance import stage

    with read_connection(db) as con:
        reason = stage.not_applicable(con, probes_mod.load(con, probe))
    return (None, reason) if reason else (significance(probe, db, workers=workers), None)


def _analysis(stage, settings, probe: int | None, db: PathLike, workers: int) -> int:
    """Run an analysis of stored probes (n2vdb.formulas.stage, n2vdb.significance.stage: each has
    check_probe and run) under SETTINGS on PROBE; returns its run's id."""
    from n2vdb.store.sessions import Store

    with write_connection(db):
        pass  # create and upgrade the database (its tables come with a migration) before the reads
    store = Store(db)
    with store.reading() as con:
        found, dataset = _probe_and_dataset(con, probe)
        stage.check_probe(con, found)
    return stage.run(store, found, dataset, settings, workers)


def ingest_shard(model: str, layer: str, shard: str, shard_dir: str | Path, db: PathLike = None, **options) -> Path:
    """Extract shard 'i/N' (or 'auto' under torchrun) of a probe into SHARD_DIR. The database is only read,
    once the first shard has created it and registered the dataset (n2vdb.ingest.prepare_database)."""
    from n2vdb import shards
    from n2vdb.ingest import IngestOptions

    index_count = shards.parse_shard(shard)
    settings = IngestOptions(**options)  # nonsense is refused before the database is touched
    return shards.extract_shard(db, model, layer, settings, index_count, Path(shard_dir))


def merge(shard_dir: str | Path, db: PathLike = None) -> list[int]:
    """Fold finished shards into the database and run the probes' remaining stages."""
    from n2vdb import shards
    from n2vdb.store.sessions import Store

    with write_connection(db):
        pass
    return shards.merge(Store(db), Path(shard_dir))


def probes(db: PathLike = None) -> pa.Table:
    with read_connection(db) as con:
        return pa.Table.from_pylist(probes_mod.list_probes(con))


def models(model: str | None = None) -> pa.Table:
    """torchvision's models; 'timm:PATTERN' (with a *) lists timm's; a model's name lists its layers with
    their output shapes and kinds (map, tokens, vector)."""
    from n2vdb.models import registry, timm_models

    if model is None:
        friendly = registry.FRIENDLY
        return pa.Table.from_pylist(
            [
                {"model": m, "friendly_layers": ", ".join(friendly.get(m, {})) or "(any dotted module path)"}
                for m in registry.all_models()
            ]
        )
    if timm_models.is_timm(model) and "*" in model:
        return pa.Table.from_pylist([{"model": m} for m in timm_models.list_models(model)])
    return pa.Table.from_pylist(registry.layer_table(model))


def query(name: str, db: PathLike = None, timeout: float | None = None, **params) -> pa.Table:
    """Run the named query NAME with PARAMS; stopped after TIMEOUT seconds (default 600, N2VDB_TIMEOUT; 0: none)."""
    with read_connection(db) as con:
        return queries.run(con, name, timeout, **params)


def sql(
    statement: str,
    db: PathLike = None,
    write: bool = False,
    read: dict[str, str | Path] | None = None,
    output: str | Path | None = None,
    timeout: float | None = None,
) -> pa.Table | None:
    """Run ad-hoc SQL in the sandbox (docs/sandbox.md) and return the last statement's result.

    Read-only unless write=True, which runs all the statements as one transaction. read={NAME: PATH}
    shows Parquet/CSV files to the SQL as views (n2vdb opens them read-only); output=FILE streams the
    result into a .parquet or .csv file instead of returning it. A read stops after TIMEOUT seconds
    (default 600, N2VDB_TIMEOUT; 0: none); Ctrl-C stops any statement at once."""
    from n2vdb import adhoc

    if output is not None:
        refuse_database_path(output, db, "output")
    with sandbox(db, write=write) as con:
        adhoc.register_files(con, read or {})
        out = Path(output) if output is not None else None
        return adhoc.run(con, statement, write=write, output=out, timeout=timeout)


def activations(
    probe_id: int, db: PathLike = None, image_ids: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A probe's activations, dequantised: (image ids [N], float32 [N, K, H, W]), aligned by row.
    Each value is within half its (image, filter) quantisation step, scale / 2, of the float activation."""
    import numpy as np

    from n2vdb import activations as acts_store

    with read_connection(db) as con:
        probe = probes_mod.load(con, probe_id)
        shape = (probe.n_filters, probe.height, probe.width)
        parts = list(acts_store.iter_activations(con, probe.activation_probe, shape, image_ids))
    if not parts:
        return np.zeros(0, np.int32), np.zeros((0, *shape), np.float32)
    ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(ids, kind="stable")  # storage order is insertion order; callers get image order
    return ids[order], np.concatenate([p[1] for p in parts])[order]


def db_status(db: PathLike = None) -> pa.Table:
    path = db_path(db)  # the path every other command opens: --db, N2VDB_DB, ./n2v.duckdb
    if not path.exists():
        return pa.Table.from_pylist(
            [{"version": m.version, "name": m.name, "applied": False} for m in migrate.available()]
        )
    con = connect(path, read_only=True)
    try:
        return pa.Table.from_pylist(migrate.status(con))
    finally:
        con.close()


def db_check(db: PathLike = None) -> pa.Table:
    """Row counts, references and stage completeness (queries/integrity.sql): 0 violations everywhere = sound."""
    return query("integrity", db)


def db_upgrade(db: PathLike = None, adopt: bool = False) -> list[str]:
    """Apply pending migrations; ADOPT adds n2vdb's schema to a DuckDB file that holds other tables."""
    con = connect(db, read_only=False)
    try:
        return [f"{m.version:04d}_{m.name}" for m in migrate.upgrade(con, adopt=adopt)]
    finally:
        con.close()


def _probe_and_dataset(con, probe_id: int | None):
    from n2vdb.data import importer
    from n2vdb.data.broden import BrodenDataset

    probe = probes_mod.load(con, probe_id if probe_id is not None else probes_mod.latest(con))
    return probe, BrodenDataset.open(importer.dataset_root(con, probe.dataset_id))


def _png_path(out: str | Path) -> Path:
    from n2vdb.errors import UsageError

    path = Path(out)
    if path.is_dir() or path.suffix.lower() != ".png":
        raise UsageError(f"out {path}: give the name of a .png file to write", param="out")
    return path


def show_concept(
    concept: str,
    db: PathLike = None,
    probe: int | None = None,
    method: str = "segmentation",
    out: str | Path | None = None,
    over: str = "containing",
) -> tuple[Path, list, list[float]]:
    """A PNG grid of images at quantiles of the concept's per-image IoU under METHOD
    ('segmentation' = the embedding, 'best_filter') among images containing it; over='all': of its
    classification score over every image (the paper's non-maximal view). Returns (path, samples, values)."""
    from n2vdb.data import importer
    from n2vdb.data.names import file_stem
    from n2vdb.errors import UsageError
    from n2vdb.render import grids

    if method not in ("segmentation", "best_filter"):
        raise UsageError("method must be segmentation or best_filter", param="method")
    if over not in ("containing", "all"):
        raise UsageError("over must be containing or all", param="over")
    if out:
        refuse_database_path(out, db, "out")
    with read_connection(db) as con:
        probe_obj, dataset = _probe_and_dataset(con, probe)
        name = queries.resolve_concept(con, concept, probe_obj.dataset_id)
        if over == "all":
            target = (
                Path(out) if out else Path("n2v_out") / f"concept-{file_stem(name)}-all-probe{probe_obj.probe_id}.png"
            )
            return grids.distribution_grid(con, probe_obj, dataset, name, target)
        concept_id = importer.concept_id(con, probe_obj.dataset_id, name)
        stem = f"concept-{file_stem(name)}-{method}-probe{probe_obj.probe_id}"
        target = _png_path(out) if out else Path("n2v_out") / f"{stem}.png"
        path, samples = grids.concept_grid(con, probe_obj, dataset, concept_id, name, method, target)
        scores = queries.run(con, "concept-image-scores", concept=name, probe=probe_obj.probe_id, method=method)
        values = scores.column("iou").to_pylist()
    return path, samples, values


def show_filter(
    filter_id: int, db: PathLike = None, probe: int | None = None, out: str | Path | None = None
) -> tuple[Path, list]:
    from n2vdb.render import grids

    if out:
        refuse_database_path(out, db, "out")
    with read_connection(db) as con:
        probe_obj, dataset = _probe_and_dataset(con, probe)
        if not probes_mod.has_thresholds(con, probe_obj):
            raise N2vdbError(
                f"probe {probe_obj.probe_id} has no thresholds yet (it is at stage {probe_obj.status}): "
                "finish it by running its `n2vdb ingest` command again"
            )
        target = _png_path(out) if out else Path("n2v_out") / f"filter-{filter_id}-probe{probe_obj.probe_id}.png"
        return grids.filter_grid(con, probe_obj, dataset, filter_id, target)


def reproduce(
    paper: str = "net2vec", db: PathLike = None, models: list[str] | None = None, offline: bool | None = None, **options
) -> tuple[pa.Table, list[str]]:
    """Run the paper's setting and compare with its numbers: (table, notes). Offline (no Broden or no
    cached ImageNet weights, or offline=True) it runs on the built-in set with random weights.
    Options: limit, epochs, workers, device."""
    from n2vdb import reproduce as reproduce_mod
    from n2vdb.store.sessions import Store

    with write_connection(db):
        pass  # create and upgrade the database before the ingests' short sessions begin
    return reproduce_mod.reproduce(Store(db), paper, models, offline, **options)


def report(out: str | Path, db: PathLike = None, probe: int | None = None, cards: int = 8) -> Path:
    """A static HTML report (index.html and its PNGs) of one probe, in OUT."""
    from n2vdb.render import report as report_mod

    refuse_database_path(out, db, "out")
    with read_connection(db) as con:
        probe_obj, dataset = _probe_and_dataset(con, probe)
        return report_mod.build(con, probe_obj, dataset, Path(out), cards)


def export(dest: str | Path, db: PathLike = None, probe: int | None = None, progress=None) -> dict[str, int]:
    """Copy the public tables to DEST: a directory (one Parquet file per table plus schema.sql) or a
    SQLAlchemy URL (sqlite:///FILE, postgresql://...). With PROBE, only that probe's rows and its
    dataset's, replacing what an earlier export of them left there. Returns rows written per table."""
    from n2vdb import export as export_mod

    local = export_mod.local_target(str(dest))
    if local:
        refuse_database_path(local, db, "dest")
    with read_connection(db) as con:
        return export_mod.export(con, str(dest), probe, progress)
