"""Export time and peak memory for a probe of --images images (alexnet conv5 shape: 256 x 13 x 13).

The database is generated directly (bench/query.py's fill for concepts, filters, IoUs and embeddings,
plus random activation codes and per-image scores), then exported to a Parquet directory, to SQLite,
and to PostgreSQL when --postgres URL is given.

    python bench/export.py [--images 2000] [--concepts 100] [--postgres postgresql://USER@/DB?host=DIR]
"""

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from n2vdb import api
from n2vdb.store import write_connection

from common import save_result
from query import fill  # bench/query.py


def add_images(db: Path, images: int, k: int, hw: int, n_concepts: int) -> None:
    rng = np.random.default_rng(1)
    with write_connection(db) as con:
        ids = np.arange(images, dtype=np.int32)
        con.register(
            "_img",
            pa.table(
                {
                    "dataset_id": np.ones(images, np.int32),
                    "image_id": ids,
                    "path": [f"i/{i}.jpg" for i in ids],
                    "split": np.where(ids % 2 == 0, "train", "val"),
                    "ih": np.full(images, 227, np.int32),
                    "iw": np.full(images, 227, np.int32),
                    "sh": np.full(images, 113, np.int32),
                    "sw": np.full(images, 113, np.int32),
                }
            ),
        )
        con.execute("INSERT INTO images SELECT * FROM _img")
        for start in range(0, images, 200):  # in slices, like extraction, so filling stays small too
            n = min(200, images - start)
            codes = rng.integers(0, 256, (n, k * hw), dtype=np.uint8)
            con.register(
                "_act",
                pa.table(
                    {
                        "probe_id": np.ones(n, np.int32),
                        "image_id": ids[start : start + n],
                        "scales": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * k, np.float32)), k).cast(
                            pa.list_(pa.float32())
                        ),
                        "codes": pa.array([row.tobytes() for row in codes], pa.binary()),
                        "pooled": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * k, np.float32)), k).cast(
                            pa.list_(pa.float32())
                        ),
                    }
                ),
            )
            con.execute("INSERT INTO activations SELECT * FROM _act")
        concept = rng.integers(1, n_concepts + 1, images * 5).astype(np.int32)
        image = np.repeat(ids, 5)
        con.register(
            "_ic",
            pa.table(
                {
                    "dataset_id": np.ones(len(image), np.int32),
                    "image_id": image,
                    "concept_id": concept,
                    "pixels": np.full(len(image), 100, np.int32),
                }
            ),
        )
        con.execute("INSERT INTO image_concepts SELECT DISTINCT * FROM _ic")
        con.execute(
            "INSERT INTO image_concept_scores SELECT 1, image_id, concept_id, m.method, 10, 20, 0.5, NULL "
            "FROM image_concepts, (VALUES ('best_filter'), ('segmentation')) m(method)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--concepts", type=int, default=100)
    parser.add_argument("--postgres", help="also export to this PostgreSQL URL (its tables are replaced)")
    args = parser.parse_args()
    k, hw = 256, 13 * 13
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        fill(db, 1, args.concepts, k)
        add_images(db, args.images, k, hw, args.concepts)
        print(
            f"{args.images} images x {k} filters x {hw} positions, {args.concepts} concepts: "
            f"{db.stat().st_size / 1e6:.0f} MB of DuckDB; peak RSS after generating it {_peak_mib():.0f} MiB"
        )
        targets = [("parquet directory", str(Path(tmp) / "parquet")), ("sqlite", f"sqlite:///{tmp}/export.db")]
        if args.postgres:
            targets.append(("postgresql", args.postgres))
        timings = {}
        for label, dest in targets:
            start = time.perf_counter()
            counts = api.export(dest, db)
            elapsed = time.perf_counter() - start
            again = time.perf_counter()
            api.export(dest, db, probe=1)
            print(
                f"{label:<18} {sum(counts.values()):>9,} rows {elapsed:6.1f} s; re-export of probe 1 "
                f"{time.perf_counter() - again:5.1f} s; peak RSS so far {_peak_mib():.0f} MiB"
            )
            timings[label] = {
                "rows": sum(counts.values()),
                "seconds": round(elapsed, 2),
                "reexport_seconds": round(time.perf_counter() - again, 2),
            }
        size_mb = db.stat().st_size / 1e6
    rows = next(iter(timings.values()))["rows"]
    parts = ", ".join(
        f"{label} {t['seconds']:.1f} s (again {t['reexport_seconds']:.1f} s)" for label, t in timings.items()
    )
    save_result(
        "export",
        f"{args.images}-image probe ({size_mb:.0f} MB DuckDB, {rows:,} rows): {parts}; peak RSS {_peak_mib():.0f} MiB",
        {"targets": timings, "db_mb": round(size_mb, 1), "peak_rss_mib": round(_peak_mib())},
    )


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
