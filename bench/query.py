"""Latency of named queries on a database the size of a real study.

4 probes x 1,200 concepts x 512 filters, generated directly (random embeddings and IoUs), then each
query run once to warm up and timed over repeats in one process, through the same path as the CLI.

    python bench/query.py [--probes 4] [--concepts 1200] [--filters 512] [--repeats 20]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from n2vdb import queries
from n2vdb.store import read_connection, write_connection

from common import save_result


def fill(db: Path, n_probes: int, n_concepts: int, k: int) -> None:
    rng = np.random.default_rng(0)
    categories = np.array(["color", "object", "part", "material", "scene", "texture"])
    with write_connection(db) as con:
        con.execute("INSERT INTO datasets VALUES (1, 'bench', '/bench', 0, ?, now())", [n_concepts])
        cat = categories[rng.integers(0, len(categories), n_concepts)]
        con.register(
            "_c",
            pa.table(
                {
                    "dataset_id": np.ones(n_concepts, np.int32),
                    "concept_id": np.arange(1, n_concepts + 1, dtype=np.int32),
                    "name": [f"concept{i}" for i in range(1, n_concepts + 1)],
                    "category": cat,
                    "categories": [[c] for c in cat],
                    "level": np.where(np.isin(cat, ["scene", "texture"]), "image", "pixel"),
                    "frequency": np.ones(n_concepts, np.int32),
                    "coverage": np.zeros(n_concepts),
                }
            ),
        )
        con.execute("INSERT INTO concepts SELECT * FROM _c")
        for p in range(1, n_probes + 1):
            con.execute(
                "INSERT INTO probes (probe_id, probe_key, model, weights, layer, dataset_id, n_filters, height,"
                " width, settings, status) VALUES (?, ?, 'm', 'w', ?, 1, ?, 13, 13, '{}', 'complete')",
                [p, f"k{p}", f"layer{p}", k],
            )
            con.register(
                "_f",
                pa.table(
                    {
                        "probe_id": np.full(k, p, np.int32),
                        "filter": np.arange(k, dtype=np.int32),
                        "threshold": rng.random(k),
                        "threshold_bound": np.zeros(k),
                        "max_value": np.ones(k),
                        "mean_value": np.ones(k),
                    }
                ),
            )
            con.execute("INSERT INTO filters SELECT * FROM _f")
            f, c = np.meshgrid(np.arange(k), np.arange(1, n_concepts + 1), indexing="ij")
            for split in ("train", "val"):
                n = f.size
                con.register(
                    "_i",
                    pa.table(
                        {
                            "probe_id": np.full(n, p, np.int32),
                            "filter": f.ravel().astype(np.int32),
                            "concept_id": c.ravel().astype(np.int32),
                            "split": np.full(n, split),
                            "intersection": np.ones(n, np.int64),
                            "union_": np.ones(n, np.int64),
                            "iou": rng.random(n) * 0.2,
                        }
                    ),
                )
                con.execute("INSERT INTO filter_concept_iou SELECT * FROM _i")
            for kind in ("segmentation", "classification"):
                w = rng.normal(size=(n_concepts, k)).astype(np.float32)
                con.register(
                    "_e",
                    pa.table(
                        {
                            "probe_id": np.full(n_concepts, p, np.int32),
                            "concept_id": np.arange(1, n_concepts + 1, dtype=np.int32),
                            "kind": np.full(n_concepts, kind),
                            "n_filters": np.full(n_concepts, k, np.int32),
                            "weights": pa.FixedSizeListArray.from_arrays(pa.array(w.ravel()), k).cast(
                                pa.list_(pa.float32())
                            ),
                            "bias": np.zeros(n_concepts),
                            "train_score": rng.random(n_concepts),
                            "val_score": rng.random(n_concepts),
                            "val_ap": rng.random(n_concepts),
                        }
                    ),
                )
                con.execute("INSERT INTO embeddings SELECT * FROM _e")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--concepts", type=int, default=1200)
    parser.add_argument("--filters", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        start = time.perf_counter()
        fill(db, args.probes, args.concepts, args.filters)
        print(
            f"filled {args.probes} probes x {args.concepts} concepts x {args.filters} filters "
            f"in {time.perf_counter() - start:.1f} s ({db.stat().st_size / 1e6:.0f} MB)"
        )
        cases = [
            ("nearest", {"concept": "concept17"}),
            ("exclusivity", {}),
            ("compare-probes", {"concept": "concept17"}),
            ("single-vs-embedding", {}),
            ("best-filters", {"concept": "concept17"}),
        ]
        medians = {}
        with read_connection(db) as con:
            for name, params in cases:
                queries.run(con, name, **params)  # warm
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    queries.run(con, name, **params)
                    times.append((time.perf_counter() - t) * 1000)
                medians[name] = statistics.median(times)
                print(
                    f"{name:22s} median {statistics.median(times):7.1f} ms   max {max(times):7.1f} ms   "
                    f"goal < 100 ms: {'yes' if statistics.median(times) < 100 else 'NO'}"
                )
    save_result(
        "query",
        f"{min(medians.values()):.0f}-{max(medians.values()):.0f} ms per named query (median of "
        f"{args.repeats}, warm); {args.probes} probes x {args.concepts:,} concepts x {args.filters} filters",
        {
            "probes": args.probes,
            "concepts": args.concepts,
            "filters": args.filters,
            "repeats": args.repeats,
            "median_ms": medians,
        },
    )


if __name__ == "__main__":
    main()
