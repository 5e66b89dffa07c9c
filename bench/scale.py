"""The whole ingest at Broden density, at three sizes, beside a bare forward pass over the same images.

    python bench/scale.py [--sizes 250,500,1000] [--epochs 30] [--workers 2]
    python bench/scale.py --sizes 1000,4000,16000          # the issue's sizes (hours on two cores)

A 64-image warm-up ingest runs first and its figures are dropped: it fills numba's kernel cache, so
no measured size pays for compiling the kernels. Each size runs in its own process (so peak RSS is
that size's ingest's): it writes the broden profile
(`n2vdb data synth --profile broden`), times a bare forward pass in a child process (the same image
loader, the model run to alexnet conv5, nothing stored), then `ingest alexnet conv5` (random weights) and reads the
probe's stage_timings, then `n2vdb significance` (which `n2vdb ingest` runs after the stages by
default; a column of its own, outside the stages' total). One table: per stage ms/image and its ratio to the forward pass, training
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

from common import ingest_profile, save_result

BRODEN_IMAGES = 63_305
STAGES = ("extraction", "thresholds", "iou", "segmentation", "classification")
AFTER = ("significance",)  # `n2vdb ingest` runs it after the stages; reported beside them, not in their total
TRAINING = ("segmentation", "classification")
WARMUP_IMAGES = 64


def forward_pass(root: Path, workers: int, device: str, batch_size: int = 32) -> float:
    """Seconds to load every image and run alexnet up to conv5 on DEVICE: the floor every ingest pays."""
    import torch
    from torch.utils.data import DataLoader

    from n2vdb.data.broden import BrodenDataset
    from n2vdb.extract import ImageFolderRows, LayerTap
    from n2vdb.models import registry, weights
    from n2vdb.models.device import pick_device

    dev = pick_device(device)
    dataset = BrodenDataset.open(root)
    loaded = weights.load("alexnet", "random", 0)
    layer = registry.resolve_layer("alexnet", "conv5")
    tap = LayerTap(loaded.net.eval().to(dev), layer.module, layer.relu)
    loader = DataLoader(
        ImageFolderRows(dataset, dataset.rows, registry.input_size("alexnet"), loaded.mean, loaded.std),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
    )
    start = time.perf_counter()
    with torch.no_grad():
        for _, images, _ in loader:
            out = tap(images.to(dev, non_blocking=True))
        if dev.type == "cuda":
            out.cpu()  # waits for the device: the ingest pays for its maps' copy to the host too
    return time.perf_counter() - start


def forward_in_child(root: Path, workers: int, device: str) -> float:
    """forward_pass in a process of its own (with this one's torch threads), so that the peak RSS
    this process reports is the ingest's alone, not the bare pass's whole model."""
    import torch

    command = [sys.executable, __file__, "--forward-of", str(root), "--workers", str(workers), "--device", device]
    command += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"the bare forward pass failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def one_size(images: int, epochs: int, workers: int, device: str) -> dict:
    from n2vdb import api
    from n2vdb.data.synth import generate_broden
    from n2vdb.store import read_connection
    from n2vdb.timings import peak_rss_mb

    with tempfile.TemporaryDirectory() as tmp:
        root, db = Path(tmp) / "broden", Path(tmp) / "bench.duckdb"
        start = time.perf_counter()
        generate_broden(root, images=images, workers=max(workers, 1))
        synth_s = time.perf_counter() - start
        api.add_dataset(root, "broden-profile", db)
        forward = forward_in_child(root, workers, device)
        probe_id = ingest_profile(db, workers, epochs, device)
        api.significance(probe_id, db, workers=workers)
        with read_connection(db) as con:
            rows = con.execute(
                "SELECT stage, seconds, images, pairs, peak_rss_mb FROM stage_timings WHERE probe_id = ?", [probe_id]
            ).fetchall()
            concepts = dict(
                con.execute(
                    "SELECT kind, count(*) FROM embeddings WHERE probe_id = ? GROUP BY 1", [probe_id]
                ).fetchall()
            )
    # peak_rss_mb: the process's peak so far when the stage ended (where memory grows with the size)
    stages = {s: {"seconds": sec, "images": n, "pairs": p, "peak_rss_mb": rss} for s, sec, n, p, rss in rows}
    return {
        "images": images,
        "epochs": epochs,
        "device": device,
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
        + " ".join(f"{s[:12]:>16}" for s in STAGES + AFTER)
        + f" {'ingest':>12} {'seg pairs/s':>11} {'peak RSS':>9}"
    )
    lines += ["ms/image (ratio to the bare forward pass)", head]
    for r in results:
        n, fwd = r["images"], r["forward_s"]
        cells = []
        for s in STAGES + AFTER:
            sec = r["stages"].get(s, {}).get("seconds", 0.0)
            cells.append(f"{1000 * sec / n:8.1f} ({sec / fwd:4.2f}x)")
        total = sum(v["seconds"] for s, v in r["stages"].items() if s not in AFTER)
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
    projected = {
        s: v["seconds"] * scale * (to30 if s in TRAINING else 1) for s, v in last["stages"].items() if s not in AFTER
    }
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
    ratios = {s: last["stages"].get(s, {}).get("seconds", 0.0) / fwd for s in STAGES + AFTER}
    ingest = sum(v["seconds"] for s, v in last["stages"].items() if s not in AFTER) / fwd
    seg = last["stages"].get("segmentation", {})
    rate = (seg.get("pairs") or 0) * last["epochs"] / seg["seconds"] if seg.get("seconds") else 0.0
    to30 = 30 / last["epochs"]
    hours = (
        sum(v["seconds"] * (to30 if s in TRAINING else 1) for s, v in last["stages"].items() if s not in AFTER)
        * BRODEN_IMAGES
        / n
        / 3600
    )
    rss = [r["peak_rss_mb"] / 1000 for r in results]
    concepts = last["concepts"]
    headline = (
        f"{n:,} images ({concepts.get('segmentation', 0):,} seg + {concepts.get('classification', 0):,} cls "
        f"concepts, {last['epochs']} epochs): "
        + ", ".join(f"{s} {ratios[s]:.2f}x" for s in STAGES)
        + f", ingest {ingest:.1f}x the forward pass, then significance {ratios['significance']:.2f}x; "
        f"{rate:,.0f} training pairs/s; peak RSS "
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
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto: the forward pass and every stage")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--forward-of", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--results-dir", type=Path, help="where NAME.json goes (default bench/results/; bench/gpu.sh: its OUT_DIR)"
    )
    args = parser.parse_args()
    os.environ["N2VDB_QUIET"] = "1"
    if args.one or args.forward_of:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
    if args.forward_of:
        print(forward_pass(args.forward_of, args.workers, args.device))
        return
    if args.one:
        print(json.dumps(one_size(args.one, args.epochs, args.workers, args.device)))
        return

    def run_size(size: int) -> dict:
        command = [sys.executable, __file__, "--one", str(size), "--epochs", str(args.epochs)]
        command += ["--workers", str(args.workers), "--threads", str(args.threads), "--device", args.device]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"size {size} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    # A small ingest first, its figures dropped: it compiles numba's kernels into their cache (a first
    # compilation holds ~200 MB of LLVM's memory in its process), so every measured size loads them
    # as a user's second ingest does, and the smallest size's peak RSS is not inflated by it.
    run_size(WARMUP_IMAGES)
    results = [run_size(int(s)) for s in args.sizes.split(",")]
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # so the saved result records the runs' thread count
    print(
        f"device: {args.device}; torch threads: {args.threads or torch.get_num_threads()}; CPU cores: {os.cpu_count()}; "
        f"load average at the end: {os.getloadavg()[0]:.1f}"
    )
    print(table(results))
    # a GPU run is its own result: the README's CPU row stays the CPU's
    save_result("scale" if args.device == "cpu" else "scale_gpu", *summary(results), directory=args.results_dir)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
