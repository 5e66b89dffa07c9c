"""The whole ingest at Broden density, at three sizes, beside a bare forward pass over the same images.

    python bench/scale.py [--sizes 250,500,1000] [--epochs 30] [--workers 2]
    python bench/scale.py --sizes 1000,4000,16000          # the issue's sizes (hours on two cores)

Each size runs in its own process (so peak RSS is that size's): it writes the broden profile
(`n2vdb data synth --profile broden`), times a bare forward pass (the same image loader, the model
run to alexnet conv5, nothing stored), then `ingest alexnet conv5` (random weights) and reads the
probe's stage_timings. One table: per stage ms/image and its ratio to the forward pass, training
(image, concept) pairs per second, peak RSS, and a linear projection of the largest size to all of
Broden (63,305 images; training stages scaled to 30 epochs when --epochs is less).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save_result

BRODEN_IMAGES = 63_305
STAGES = ("extraction", "thresholds", "iou", "segmentation", "classification")
TRAINING = ("segmentation", "classification")


def forward_pass(root: Path, workers: int, batch_size: int = 32) -> float:
    """Seconds to load every image and run alexnet up to conv5: the floor every ingest pays."""
    import torch
    from torch.utils.data import DataLoader

    from n2vdb.data.broden import BrodenDataset
    from n2vdb.extract import ImageFolderRows, LayerTap
    from n2vdb.models import registry, weights

    dataset = BrodenDataset.open(root)
    loaded = weights.load("alexnet", "random", 0)
    layer = registry.resolve_layer("alexnet", "conv5")
    tap = LayerTap(loaded.net.eval(), layer.module, layer.relu)
    loader = DataLoader(
        ImageFolderRows(dataset, dataset.rows, registry.input_size("alexnet"), loaded.mean, loaded.std),
        batch_size=batch_size,
        num_workers=workers,
    )
    start = time.perf_counter()
    with torch.no_grad():
        for _, images, _ in loader:
            tap(images)
    return time.perf_counter() - start


def one_size(images: int, epochs: int, workers: int) -> dict:
    from n2vdb import api
    from n2vdb.data.synth import generate_broden
    from n2vdb.probe import TrainSettings
    from n2vdb.store import read_connection
    from n2vdb.timings import peak_rss_mb

    with tempfile.TemporaryDirectory() as tmp:
        root, db = Path(tmp) / "broden", Path(tmp) / "bench.duckdb"
        start = time.perf_counter()
        generate_broden(root, images=images, workers=max(workers, 1))
        synth_s = time.perf_counter() - start
        api.add_dataset(root, "broden-profile", db)
        forward = forward_pass(root, workers)
        probe_id = api.ingest(
            "alexnet",
            "conv5",
            db,
            dataset="broden-profile",
            weights="random",
            workers=workers,
            train=TrainSettings(epochs=epochs),
        )
        with read_connection(db) as con:
            rows = con.execute(
                "SELECT stage, seconds, images, pairs FROM stage_timings WHERE probe_id = ?", [probe_id]
            ).fetchall()
            concepts = dict(
                con.execute(
                    "SELECT kind, count(*) FROM embeddings WHERE probe_id = ? GROUP BY 1", [probe_id]
                ).fetchall()
            )
    stages = {s: {"seconds": sec, "images": n, "pairs": p} for s, sec, n, p in rows}
    return {
        "images": images,
        "epochs": epochs,
        "synth_s": synth_s,
        "forward_s": forward,
        "stages": stages,
        "concepts": concepts,
        "peak_rss_mb": peak_rss_mb(),
    }


def table(results: list[dict]) -> str:
    lines = []
    head = (
        f"{'images':>7} {'forward':>8} "
        + " ".join(f"{s[:12]:>16}" for s in STAGES)
        + f" {'ingest':>12} {'seg pairs/s':>11} {'peak RSS':>9}"
    )
    lines += ["ms/image (ratio to the bare forward pass)", head]
    for r in results:
        n, fwd = r["images"], r["forward_s"]
        cells = []
        for s in STAGES:
            sec = r["stages"].get(s, {}).get("seconds", 0.0)
            cells.append(f"{1000 * sec / n:8.1f} ({sec / fwd:4.2f}x)")
        total = sum(v["seconds"] for v in r["stages"].values())
        seg = r["stages"].get("segmentation", {})
        rate = (seg.get("pairs") or 0) * r["epochs"] / seg["seconds"] if seg.get("seconds") else float("nan")
        lines.append(
            f"{n:7d} {1000 * fwd / n:8.1f} "
            + " ".join(f"{c:>16}" for c in cells)
            + f" {total / fwd:11.2f}x {rate:11.0f} {r['peak_rss_mb']:7.0f}MB"
        )
    last = results[-1]
    scale = BRODEN_IMAGES / last["images"]
    to30 = 30 / last["epochs"]
    projected = {s: v["seconds"] * scale * (to30 if s in TRAINING else 1) for s, v in last["stages"].items()}
    fwd = last["forward_s"] * scale
    lines.append(
        f"linear projection to {BRODEN_IMAGES:,} images from {last['images']} "
        f"(training x{to30:.0f} to 30 epochs): forward {fwd / 3600:.2f} h; "
        + ", ".join(f"{s} {projected.get(s, 0) / 3600:.2f} h" for s in STAGES)
        + f"; ingest {sum(projected.values()) / 3600:.2f} h = {sum(projected.values()) / fwd:.2f}x forward"
    )
    concepts = last["concepts"]
    lines.append(
        f"concepts at {last['images']} images: {concepts.get('segmentation', 0)} segmentation, "
        f"{concepts.get('classification', 0)} classification; epochs {last['epochs']}"
    )
    return "\n".join(lines)


def summary(results: list[dict]) -> tuple[str, dict]:
    """The README's one-line headline and its figures: the largest size's ratios, the peak RSS range, the projection."""
    last = results[-1]
    n, fwd = last["images"], last["forward_s"]
    ratios = {s: last["stages"].get(s, {}).get("seconds", 0.0) / fwd for s in STAGES}
    ingest = sum(v["seconds"] for v in last["stages"].values()) / fwd
    seg = last["stages"].get("segmentation", {})
    rate = (seg.get("pairs") or 0) * last["epochs"] / seg["seconds"] if seg.get("seconds") else 0.0
    to30 = 30 / last["epochs"]
    hours = (
        sum(v["seconds"] * (to30 if s in TRAINING else 1) for s, v in last["stages"].items()) * BRODEN_IMAGES / n / 3600
    )
    rss = [r["peak_rss_mb"] / 1000 for r in results]
    concepts = last["concepts"]
    headline = (
        f"{n:,} images ({concepts.get('segmentation', 0):,} seg + {concepts.get('classification', 0):,} cls "
        f"concepts, {last['epochs']} epochs): "
        + ", ".join(f"{s} {ratios[s]:.2f}x" for s in STAGES)
        + f", ingest {ingest:.1f}x the forward pass; {rate:,.0f} training pairs/s; peak RSS "
        f"{rss[0]:.2f} GB at {results[0]['images']:,} to {rss[-1]:.2f} GB at {n:,}; projected {hours:.1f} h "
        f"for {BRODEN_IMAGES:,} images"
    )
    return headline, {
        "sizes": [r["images"] for r in results],
        "ratios_to_forward": ratios,
        "ingest_ratio": ingest,
        "segmentation_pairs_per_s": rate,
        "projected_hours": hours,
        "runs": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,500,1000")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ["N2VDB_QUIET"] = "1"
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(one_size(args.one, args.epochs, args.workers)))
        return
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(size),
                "--epochs",
                str(args.epochs),
                "--workers",
                str(args.workers),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            sys.exit(f"size {size} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # so the saved result records the runs' thread count
    print(
        f"torch threads: {args.threads or torch.get_num_threads()}; CPU cores: {os.cpu_count()}; "
        f"load average at the end: {os.getloadavg()[0]:.1f}"
    )
    print(table(results))
    save_result("scale", *summary(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
