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
import pyarrow.parquet as pq

from n2vdb import activations as acts_store
from n2vdb import extract, probe as probes
from n2vdb.errors import N2vdbError, UsageError
from n2vdb.ingest import IngestOptions, ingest, make_spec
from n2vdb.models import weights as weights_mod
from n2vdb.progress import say
from n2vdb.store.connection import transaction
from n2vdb.store.sessions import Store


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N', or 'auto' for torchrun's RANK and WORLD_SIZE."""
    if text == "auto":
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise UsageError("--shard auto needs RANK and WORLD_SIZE (set by torchrun); else give --shard i/N")
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected i/N, e.g. 0/2, or auto") from None
    if not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= i < N")
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


def extract_shard(con: duckdb.DuckDBPyConnection, model: str, layer: str, options: IngestOptions,
                  shard: tuple[int, int], root: Path) -> Path:
    """Extract this shard's images into ROOT; the database is only read (dataset, probe key)."""
    index, count = shard
    made = make_spec(con, model, layer, options)
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
        batches = extract.stream(spec, dataset, todo, net, options.device, options.batch_size, options.workers,
                                 (len(mine) - len(todo), len(mine)))
        shape = next(batches)
        meta = {"model": model, "layer": layer, "key": spec.key, "shards": count, "shape": list(shape),
                "options": _options_dict(options)}
        _write_atomically(directory / "spec.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
        for image_ids, codes, scales, pooled in batches:
            table = acts_store.to_arrow(0, image_ids, codes, scales, pooled).drop(["probe_id"])
            _write_atomically(part_dir / f"part-{int(image_ids[0]):08d}.parquet",
                              lambda p, t=table: pq.write_table(t, p))
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


def _merge_one(store: Store, directory: Path) -> int:
    with store.writing() as con:
        spec_file = directory / "spec.json"
        if not spec_file.exists():
            raise N2vdbError(f"{directory} has no spec.json: no shard has written a batch yet")
        meta = json.loads(spec_file.read_text())
        count = meta["shards"]
        missing = [i for i in range(count) if not (directory / f"shard-{i}-of-{count}" / "done").exists()]
        if missing:
            raise N2vdbError(f"{directory.name}: shard {missing[0]}/{count} is not finished; run it "
                             f"(`n2vdb ingest ... --shard {missing[0]}/{count}`) and merge again")
        options = _options_from(meta["options"])
        made = make_spec(con, meta["model"], meta["layer"], options)
        if made.spec.key != meta["key"]:
            raise N2vdbError(f"{directory.name} was extracted with other settings or another dataset than this "
                             "database holds")
        parts = [str(p) for p in sorted(directory.glob("shard-*/part-*.parquet"))]
        with transaction(con):  # the probe and its activations arrive together
            probe, _ = probes.get_or_create(con, made.spec)
            if probe.status == "extracting":
                k, h, w = meta["shape"]
                con.execute("UPDATE probes SET n_filters = ?, height = ?, width = ? WHERE probe_id = ?",
                            [k, h, w, probe.probe_id])
                con.execute(
                    "INSERT INTO activations SELECT $probe, image_id, scales, codes, pooled"
                    " FROM read_parquet($parts) WHERE image_id NOT IN"
                    " (SELECT image_id FROM activations WHERE probe_id = $probe)",
                    {"probe": probe.probe_id, "parts": parts})
        say(f"merged {len(parts)} parts of {count} shards into probe {probe.probe_id}")
    return ingest(store, meta["model"], meta["layer"], options)
