"""Sharded extraction: N processes (GPUs, machines) each extract every N-th image into Parquet files;
`merge` folds them into one probe of the database and finishes the remaining stages there.

Layout of a shard directory (readable by DuckDB, Spark or Trino alike):

    DIR/probe-<key>/spec.json                          how the probe was asked for, and the layer shape
    DIR/probe-<key>/shard-<i>-of-<N>/part-<id>.parquet image_id, scales, codes, pooled (one batch each)
    DIR/probe-<key>/shard-<i>-of-<N>/done              written when shard i has every one of its images

Parts are written to a temporary name and renamed, so a killed shard leaves only whole parts and
resumes after them. Thresholds are computed after the merge from the merged activations, so they are
identical to those of an unsharded run (the per-image quantisation does not depend on the shard).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from n2vdb import activations as acts_store
from n2vdb import extract, pipeline
from n2vdb import probe as probes
from n2vdb.errors import N2vdbError, UsageError
from n2vdb.ingest import IngestOptions, choose_layer, ingest, make_spec, prepare_database, prepare_dataset
from n2vdb.models import weights as weights_mod
from n2vdb.progress import say
from n2vdb.store import read_connection
from n2vdb.store.connection import transaction
from n2vdb.store.sessions import Store


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N', or 'auto' for torchrun's RANK and WORLD_SIZE."""
    if text == "auto":
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise UsageError(
                "shard auto needs RANK and WORLD_SIZE (set by torchrun); else give one as i/N", param="shard"
            )
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"shard {text!r}: expected i/N, e.g. 0/2, or auto", param="shard") from None
    if not 0 <= index < count:
        raise UsageError(f"shard {text!r}: need 0 <= i < N", param="shard")
    return index, count


def _options_dict(options: IngestOptions) -> dict:
    return dataclasses.asdict(options)


def _options_from(data: dict) -> IngestOptions:
    data = dict(data)
    data["train"] = probes.TrainSettings(**data["train"])
    return IngestOptions(**data)


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # shards write spec.json side by side
    write(temporary)
    os.replace(temporary, path)


def extract_shard(
    db: str | os.PathLike | None,
    model: str,
    layer: str,
    options: IngestOptions,
    shard: tuple[int, int],
    root: Path,
    wait_s: float = 300.0,
) -> Path:
    """Extract this shard's images into ROOT. The database is only read (dataset, probe key), after
    whichever shard comes first has created it and registered the dataset (the others wait for it up
    to WAIT_S seconds); no connection stays open while the shard extracts."""
    index, count = shard
    choice = choose_layer(model, layer, options)  # bad input fails before a database is created
    options = prepare_database(db, options, wait_s)
    with read_connection(db, wait_s=wait_s) as con:
        made = make_spec(con, model, layer, options, choice)
    spec, dataset = made.spec, made.dataset
    directory = root / f"probe-{spec.key}"
    part_dir = directory / f"shard-{index}-of-{count}"
    part_dir.mkdir(parents=True, exist_ok=True)
    rows = dataset.rows[: spec.limit] if spec.limit else dataset.rows
    mine = [r for r in rows if r.image_id % count == index]
    done: set[int] = set()
    for part in part_dir.glob("part-*.parquet"):
        done.update(pq.read_table(part, columns=["image_id"]).column(0).to_pylist())
    todo = [r for r in mine if r.image_id not in done]
    if todo:
        net = weights_mod.load(model, options.weights, options.seed, spec.input_size).net
        batches = extract.stream(
            spec,
            dataset,
            todo,
            net,
            options.device,
            options.batch_size,
            options.workers,
            (len(mine) - len(todo), len(mine)),
        )
        shape = next(batches)
        meta = {
            "model": model,
            "layer": layer,
            "key": spec.key,
            "shards": count,
            "shape": list(shape),
            "options": _options_dict(options),
        }
        _write_atomically(directory / "spec.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
        for image_ids, codes, scales, pooled in batches:
            table = acts_store.to_arrow(0, image_ids, codes, scales, pooled).drop(["probe_id"])
            _write_atomically(
                part_dir / f"part-{int(image_ids[0]):08d}.parquet", lambda p, t=table: pq.write_table(t, p)
            )
    (part_dir / "done").write_text(f"{len(mine)}\n")
    say(f"shard {index}/{count}: {len(mine)} images in {part_dir}")
    return part_dir


def merge(store: Store, root: Path) -> list[int]:
    """Fold every complete probe under ROOT into the database and run its remaining stages."""
    with store.exclusive_writer():
        return [_merge_one(store, directory) for directory in _probe_dirs(root)]


def _probe_dirs(root: Path) -> list[Path]:
    directories = sorted(root.glob("probe-*")) if root.is_dir() else []
    if not directories:
        raise N2vdbError(f"no shards under {root}: run `n2vdb ingest ... --shard i/N --shard-dir {root}` first")
    return directories


_PART_SCHEMA = (
    acts_store.to_arrow(
        0,
        np.zeros(0, np.int64),
        np.zeros((0, 1, 1, 1), np.uint8),
        np.zeros((0, 1), np.float32),
        np.zeros((0, 1), np.float32),
    )
    .drop(["probe_id"])
    .schema
)


def _read_meta(spec_file: Path) -> dict:
    try:
        meta = json.loads(spec_file.read_text())
        shape = meta["shape"]
        ok = (
            isinstance(meta["shards"], int)
            and meta["shards"] >= 1
            and isinstance(meta["options"], dict)
            and len(shape) == 3
            and all(isinstance(d, int) and d >= 1 for d in shape)
            and all(isinstance(meta[k], str) for k in ("model", "layer", "key"))
        )
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise N2vdbError(
            f"{spec_file} is not a shard spec n2vdb wrote; extract the shards again into an empty --shard-dir"
        )
    return meta


def check_parts(con: duckdb.DuckDBPyConnection, directory: Path, meta: dict, spec: probes.ProbeSpec) -> list[str]:
    """Every Parquet part of DIRECTORY, checked before anything is written: n2vdb's schema, blobs of the
    layer's size, image ids of this dataset that belong to the shard holding them, and every image of
    the probe exactly once. Returns the part paths."""
    count = meta["shards"]
    k, h, w = meta["shape"]
    stale = sorted(d.name for d in directory.glob("shard-*") if not d.name.endswith(f"-of-{count}"))
    if stale:
        raise N2vdbError(
            f"{directory.name} holds shards of another run ({stale[0]}; this one has {count} shards): "
            "remove them, or extract again into an empty --shard-dir"
        )

    def refuse(what: str) -> N2vdbError:
        return N2vdbError(f"{directory.name}: {what}; extract that shard again (delete its directory first)")

    parts = sorted(directory.glob(f"shard-*-of-{count}/part-*.parquet"))
    for part in parts:
        try:
            schema = pq.read_schema(part)
        except (OSError, ValueError, pa.ArrowException):
            raise refuse(f"{part.relative_to(directory)} is not a readable Parquet file") from None
        if [(f.name, f.type) for f in schema] != [(f.name, f.type) for f in _PART_SCHEMA]:
            raise refuse(
                f"{part.relative_to(directory)} does not have the columns n2vdb writes "
                f"({', '.join(f'{f.name} {f.type}' for f in _PART_SCHEMA)})"
            )
    expected = len(spec_rows(spec, con))
    if not parts:
        raise refuse("no Parquet parts")
    rows = con.execute(
        """WITH part AS (
               SELECT image_id, scales, codes, pooled,
                      regexp_extract(filename, 'shard-(\\d+)-of-', 1)::INTEGER AS shard
               FROM read_parquet($parts, filename = true))
           SELECT count(*) FILTER (WHERE octet_length(codes) <> $khw OR len(scales) <> $k OR len(pooled) <> $k),
                  count(*) FILTER (WHERE image_id % $count <> shard),
                  count(*) FILTER (WHERE image_id NOT IN (SELECT image_id FROM images WHERE dataset_id = $dataset)
                                      OR ($limit IS NOT NULL AND image_id >= $limit)),
                  count(*) - count(DISTINCT image_id), count(DISTINCT image_id),
                  min(image_id) FILTER (WHERE octet_length(codes) <> $khw OR len(scales) <> $k OR len(pooled) <> $k),
                  min(image_id) FILTER (WHERE image_id NOT IN (SELECT image_id FROM images WHERE dataset_id = $dataset)
                                            OR ($limit IS NOT NULL AND image_id >= $limit))
           FROM part""",
        {
            "parts": [str(p) for p in parts],
            "khw": k * h * w,
            "k": k,
            "count": count,
            "dataset": spec.dataset_id,
            "limit": spec.limit,
        },
    ).fetchone()
    wrong_size, wrong_shard, unknown, duplicates, distinct, first_bad_size, first_unknown = rows
    if wrong_size:
        raise refuse(f"{wrong_size} row(s) do not hold a {k}x{h}x{w} layer (image {first_bad_size} first)")
    if unknown:
        raise refuse(f"{unknown} row(s) name images this probe does not have (image {first_unknown} first)")
    if wrong_shard:
        raise refuse(f"{wrong_shard} row(s) sit in a shard that does not own their image")
    if duplicates:
        raise refuse(f"{duplicates} image(s) appear in more than one part")
    if distinct != expected:
        raise refuse(f"the parts hold {distinct} of the probe's {expected} images")
    return [str(p) for p in parts]


def spec_rows(spec: probes.ProbeSpec, con: duckdb.DuckDBPyConnection) -> list[int]:
    """Image ids a probe extracts: the first --limit rows of its dataset, or all."""
    ids = [
        i
        for (i,) in con.execute(
            "SELECT image_id FROM images WHERE dataset_id = ? ORDER BY image_id", [spec.dataset_id]
        ).fetchall()
    ]
    return ids[: spec.limit] if spec.limit else ids


def _merge_one(store: Store, directory: Path) -> int:
    with store.writing() as con:
        spec_file = directory / "spec.json"
        if not spec_file.exists():
            raise N2vdbError(f"{directory} has no spec.json: no shard has written a batch yet")
        meta = _read_meta(spec_file)
        count = meta["shards"]
        missing = [i for i in range(count) if not (directory / f"shard-{i}-of-{count}" / "done").exists()]
        if missing:
            raise N2vdbError(
                f"{directory.name}: shard {missing[0]}/{count} is not finished; run it "
                f"(`n2vdb ingest ... --shard {missing[0]}/{count}`) and merge again"
            )
        options = prepare_dataset(con, _options_from(meta["options"]))
        made = make_spec(con, meta["model"], meta["layer"], options)
        if made.spec.key != meta["key"] or directory.name != f"probe-{meta['key']}":
            raise N2vdbError(
                f"{directory.name} was extracted with other settings or another dataset than this database holds"
            )
        parts = check_parts(con, directory, meta, made.spec)
        with transaction(con):  # the probe and its activations arrive together
            probe, _ = pipeline.find_or_create(con, made.spec)
            if pipeline.sharded(probe.status):
                k, h, w = meta["shape"]
                con.execute(
                    "UPDATE probes SET n_filters = ?, height = ?, width = ? WHERE probe_id = ?",
                    [k, h, w, probe.probe_id],
                )
                con.execute(
                    "INSERT INTO activations BY NAME SELECT $probe AS probe_id, image_id, scales, codes, pooled"
                    " FROM read_parquet($parts) WHERE image_id NOT IN"
                    " (SELECT image_id FROM activations WHERE probe_id = $probe)",
                    {"probe": probe.probe_id, "parts": parts},
                )
                probes.set_status(con, probe.probe_id, pipeline.status_after_shards(made.spec))
        say(f"merged {len(parts)} parts of {count} shards into probe {probe.probe_id}")
    return ingest(store, meta["model"], meta["layer"], options)
