"""Extraction throughput against a bare forward pass of the same model on the same images, one run.

    python bench/extract.py [--images 400] [--model alexnet] [--layer conv5] [--workers 2]

bare forward = the same DataLoader (decode, resize, normalise) and the same forward pass up to the
layer, results discarded. extraction = n2vdb's extraction stage: that plus quantisation and DuckDB
writes (one commit per batch). Thresholds (a pass over the stored activations) are timed apart.
"""

import argparse
import os
import time

import duckdb
import torch
from torch.utils.data import DataLoader

from n2vdb import extract, pipeline
from n2vdb.data.broden import BrodenDataset
from n2vdb.ingest import IngestOptions, make_spec
from n2vdb.models import weights
from n2vdb.models.device import pick_device
from n2vdb.stats.thresholds import compute_thresholds
from n2vdb.store import write_connection
from n2vdb.store.sessions import Store

from common import peak_rss_mib, save_result, scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--model", default="alexnet")
    parser.add_argument("--layer", default="conv5")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    root, db, tmp = scratch(args.images)
    os.environ["N2VDB_QUIET"] = "1"
    with write_connection(db) as con:
        spec = make_spec(con, args.model, args.layer, IngestOptions(dataset="synthetic", weights="random")).spec
        dataset = BrodenDataset.open(root)
        net = weights.load(args.model, "random").net
        dev = pick_device(args.device)
        net = net.to(dev)
        tap = extract.LayerTap(net, spec.module, spec.relu)
        loader = DataLoader(
            extract.ImageFolderRows(dataset, dataset.rows, spec.input_size, spec.mean, spec.std),
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
        for _ in zip(range(2), loader):  # warm the workers and allocator
            pass
        tap(torch.zeros(2, 3, spec.input_size, spec.input_size, device=dev))
        start = time.perf_counter()
        for _, images, _ in loader:
            tap(images.to(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        bare = time.perf_counter() - start
        tap.handle.remove()

        probe, _ = pipeline.find_or_create(con, spec)
    store = Store(db)  # as ingest runs: batches written in short sessions that let readers in
    start = time.perf_counter()
    extract.extract(store, probe, spec, dataset, net, args.device, args.batch_size, args.workers)
    extraction = time.perf_counter() - start
    start = time.perf_counter()
    compute_thresholds(store, probe, spec.quantile)
    thresholds = time.perf_counter() - start
    size = db.stat().st_size
    con = duckdb.connect(str(db), read_only=True)
    k, h, w = con.execute("SELECT n_filters, height, width FROM probes").fetchone()
    raw = con.execute("SELECT sum(octet_length(codes) + 4 * len(scales)) FROM activations").fetchone()[0]
    con.close()
    n = args.images
    print(f"{args.model} {args.layer}: {n} images, {k}x{h}x{w}, device {dev}, {args.workers} workers")
    print(f"bare forward  {n / bare:7.1f} img/s")
    print(f"extraction    {n / extraction:7.1f} img/s   ratio {bare / extraction:.2f}x of bare forward (goal >= 0.8)")
    print(f"thresholds    {thresholds:7.2f} s ({n / thresholds:.0f} img/s over stored activations)")
    print(
        f"storage       {raw / (n * k * h * w):.3f} bytes/value as written, "
        f"{size / (n * k * h * w):.3f} bytes/value for the whole database file"
    )
    print(f"peak RSS      {peak_rss_mib():.0f} MiB")
    written, on_disk = raw / (n * k * h * w), size / (n * k * h * w)
    save_result(
        "extract",
        f"{bare / extraction:.2f}x of a bare forward pass ({n / extraction:.0f} vs {n / bare:.0f} "
        f"img/s); {written:.2f} bytes per value as written, {on_disk:.2f} for the whole database file",
        {
            "images": n,
            "bare_img_s": n / bare,
            "extraction_img_s": n / extraction,
            "ratio": bare / extraction,
            "thresholds_s": thresholds,
            "bytes_per_value_written": written,
            "bytes_per_value_file": on_disk,
            "peak_rss_mib": peak_rss_mib(),
        },
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
