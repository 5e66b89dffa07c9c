"""Thresholds and single-filter IoU of an existing probe beside a bare forward pass, in one run.

    python bench/iou_stage.py --db DB [--probe ID] [--repeat 3] [--workers 2] [--threads 1]
    python bench/iou_stage.py --images 1000 [--repeat 3]   (a broden-profile set, extracted here)

The probe's database is copied to a scratch file first, so its rows and status stay as they were;
with --images, a broden-profile set of that size is generated and an alexnet conv5 probe (random
weights) extracted into the scratch database instead.
Each repetition times, in turn: a bare forward pass of the probe's model up to its layer over the
probe's images (the extraction DataLoader, results discarded; random weights of the same
architecture cost the same), the thresholds stage (stats/thresholds.py) and the IoU stage
(iou.run), then the IoU stage's parts on their own: mask decoding alone, the tally pass, the
per-image best-filter scores read back from the tally's spill; the rest of the stage is its
DuckDB write. It prints one line per repetition and the median ratios to the
forward pass (issue 15's goal: thresholds + IoU <= 0.25x).
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import torch
from torch.utils.data import DataLoader

from n2vdb import activations as acts_store
from n2vdb import extract, pipeline
from n2vdb import probe as probes
from n2vdb.data.broden import BrodenDataset
from n2vdb.models import registry, weights
from n2vdb.stats import iou
from n2vdb.stats.thresholds import compute_thresholds
from n2vdb.store.sessions import Store

from common import save_result


def forward_seconds(net, spec: dict, model: str, dataset: BrodenDataset, rows, workers: int) -> float:
    size = spec.get("input_size") or registry.input_size(model)
    tap = extract.LayerTap(net, spec["module"], spec["relu"])
    loader = DataLoader(
        extract.ImageFolderRows(dataset, rows, size, spec["mean"], spec["std"], spec.get("preprocess", "torchvision")),
        batch_size=32,
        num_workers=workers,
    )
    tap(torch.zeros(2, 3, size, size))
    start = time.perf_counter()
    for _, images, _ in loader:
        tap(images)
    seconds = time.perf_counter() - start
    tap.handle.remove()
    return seconds


def extracted(scratch: Path, db: Path, images: int, workers: int) -> None:
    from n2vdb import api
    from n2vdb.ingest import IngestOptions, make_spec
    from n2vdb.store import write_connection

    api.synth(scratch / "broden", images=images, name="broden", db=db, profile="broden")
    with write_connection(db) as con:
        spec = make_spec(con, "alexnet", "conv5", IngestOptions(dataset="broden", weights="random")).spec
        probe, _ = pipeline.find_or_create(con, spec)
        dataset = BrodenDataset.open(scratch / "broden")
    extract.extract(Store(db), probe, spec, dataset, weights.load("alexnet", "random").net, "cpu", 32, workers)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path)
    parser.add_argument("--images", type=int, help="generate and extract a broden-profile set of N images")
    parser.add_argument("--probe", type=int)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default), as scale.py's")
    parser.add_argument(
        "--parts", action=argparse.BooleanOptionalAction, default=True, help="also time the IoU stage's parts"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["N2VDB_QUIET"] = "1"
    tmp = tempfile.TemporaryDirectory()
    db = Path(tmp.name) / "bench.duckdb"
    if args.images:
        extracted(Path(tmp.name), db, args.images, args.workers)
    elif args.db:
        shutil.copy(args.db, db)
    else:
        parser.error("pass --db or --images")
    con = duckdb.connect(str(db))
    probe_id = args.probe or probes.latest(con, complete_only=False)
    probe = probes.load(con, probe_id)
    model, settings, mode = con.execute(
        "SELECT model, settings, settings->>'iou_mode' FROM probes WHERE probe_id = ?", [probe_id]
    ).fetchone()
    spec = json.loads(settings)
    path = con.execute("SELECT path FROM datasets WHERE dataset_id = ?", [probe.dataset_id]).fetchone()[0]
    quantile = spec.get("quantile", 0.995)
    con.close()
    dataset = BrodenDataset.open(path)
    store = Store(db)
    with store.reading() as rcon:
        rows = [dataset.rows[i] for i in acts_store.stored_order(rcon, probe.activation_probe)]
        n_pairs = sum(len(r.labels) for r in rows)
    net = weights.load(model, "random").net.eval()
    print(
        f"{model} {spec['layer']} probe {probe_id} ({mode}): {len(rows)} images, "
        f"{probe.n_filters}x{probe.height}x{probe.width}, {args.workers} workers, "
        f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    header = f"{'rep':>3} {'forward':>8} {'thresh':>8} {'iou':>8} {'ratio':>6}"
    if args.parts:
        header += f" {'decode':>8} {'tally':>8} {'best':>8}"
    print(header + "   (seconds; ratio = (thresholds + iou) / forward)")
    ratios = []
    for rep in range(args.repeat):
        fwd = forward_seconds(net, spec, model, dataset, rows, args.workers)
        thr = timed(lambda: compute_thresholds(store, probe, quantile))
        with store.writing() as wcon:  # as in an ingest, the stage writes into empty tables (untimed)
            wcon.execute("DELETE FROM filter_concept_iou WHERE probe_id = ?", [probe_id])
            wcon.execute("DELETE FROM image_concept_scores WHERE probe_id = ? AND method = 'best_filter'", [probe_id])
        stage = timed(lambda: iou.run(store, probe, dataset, mode, args.workers))
        ratio = (thr + stage) / fwd
        ratios.append(ratio)
        line = f"{rep:>3} {fwd:8.2f} {thr:8.2f} {stage:8.2f} {ratio:6.3f}"
        if args.parts:
            decode = timed(lambda: sum(1 for _ in iou.iter_masks(dataset, rows, args.workers)))
            with store.reading() as rcon:
                thresholds = iou.thresholds_for(rcon, probe_id, mode)
                spill = iou.OverlapSpill()
                totals = None

                def run_tally():
                    nonlocal totals
                    totals = iou.tally(rcon, probe, dataset, thresholds, mode, args.workers, spill=spill)

                tal = timed(run_tally)
                best = iou.best_filters(totals)
                per = timed(
                    lambda: iou.per_image_best(
                        rcon, probe, dataset, thresholds, mode, best, args.workers, overlaps=spill
                    )
                )
                spill.close()
            line += f" {decode:8.2f} {tal:8.2f} {per:8.2f}"
        print(line, flush=True)
    print(f"median (thresholds + IoU) / forward = {statistics.median(ratios):.3f}  (goal <= 0.25)")
    median = statistics.median(ratios)
    save_result(
        "iou_stage",
        f"{len(rows)} images, broden profile: thresholds + single-filter IoU {median:.2f}x the "
        f"forward pass (median of {args.repeat}; {min(ratios):.2f}-{max(ratios):.2f}; goal 0.25x)",
        {
            "images": len(rows),
            "ratios": [round(r, 3) for r in ratios],
            "median_ratio": round(median, 3),
            "pairs": n_pairs,
        },
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
