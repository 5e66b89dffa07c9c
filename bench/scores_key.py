"""What image_concept_scores' old PRIMARY KEY cost a write (migrations/0012): peak RSS of one
transaction that replaces a probe's best-filter rows, in a table with the key and in one without.

    python bench/scores_key.py [--rows 544000,2152370]

Each (rows, table) pair runs in its own process: a bare DuckDB file with the table as migration 0001
made it (key) or as 0012 leaves it (none), 34 concepts per image, and n2vdb's writer settings (1GB,
no vacuum). VmRSS is sampled every 2 ms from the opening of the connection to its close. 544,000
rows is the 16,000-image Broden profile's; 2,152,370 is all of Broden's 63,305 images at 34 pairs
each. A diagnostic: it prints, and saves no result.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import vm_rss_mb

COLUMNS = (
    "probe_id INTEGER NOT NULL, image_id INTEGER NOT NULL, concept_id INTEGER NOT NULL, method VARCHAR NOT NULL,"
    " intersection BIGINT, union_ BIGINT, iou DOUBLE, score DOUBLE"
)
KEY = ", PRIMARY KEY (probe_id, image_id, concept_id, method)"


def one(rows: int, keyed: bool) -> dict:
    import duckdb
    import numpy as np

    from n2vdb.store import writer

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "scores.duckdb")
        con = duckdb.connect(path)
        con.execute(f"CREATE TABLE image_concept_scores ({COLUMNS}{KEY if keyed else ''})")
        con.close()
        rng = np.random.default_rng(0)
        image_ids = np.repeat(np.arange(rows // 34), 34)
        concept_ids = np.tile(np.arange(34), rows // 34)
        inter = rng.integers(0, 100, len(image_ids))
        table = writer.score_rows(
            1, "best_filter", image_ids, concept_ids, inter, inter + rng.integers(1, 100, len(inter))
        )
        peak, done = [vm_rss_mb()], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], vm_rss_mb())
                time.sleep(0.002)

        start = vm_rss_mb()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        con = duckdb.connect(path, config={"memory_limit": "1GB", "max_vacuum_tasks": 0})
        con.execute("BEGIN TRANSACTION")
        writer.replace_probe_rows(con, "image_concept_scores", 1, table, methods=("best_filter",))
        con.execute("COMMIT")
        con.close()
        done.set()
        sampler.join()
    return {"rows": len(image_ids), "keyed": keyed, "peak_rise_mb": peak[0] - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="544000,2152370")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        rows, keyed = args.one.split(":")
        print(json.dumps(one(int(rows), keyed == "key")))
        return
    print(f"{'rows':>10} {'with key':>10} {'without':>10}  (peak RSS above the transaction's start, MB)")
    for rows in (int(r) for r in args.rows.split(",")):
        rise = {}
        for keyed in ("key", "none"):
            command = [sys.executable, __file__, "--one", f"{rows}:{keyed}"]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            rise[keyed] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{rise['key']['rows']:10,d} {rise['key']['peak_rise_mb']:10.0f} {rise['none']['peak_rise_mb']:10.0f}")


if __name__ == "__main__":
    main()
