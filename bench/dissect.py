"""Single-filter IoU stage against NetDissect-Lite's per-unit algorithm, same data, one run.

    python bench/dissect.py [--images 120]

baseline: NetDissect-Lite's tally_job (feature_operation.py), shortcuts included, in n2vdb's net2vec
order (threshold, then upsample): image by image, one bincount of the label codes of every mask
channel for the label areas; then unit by unit, a unit whose map never exceeds its threshold is
skipped (it adds nothing but the labels' areas to the unions); otherwise its binary map is
resized to the segmentation size and ONE bincount of the label codes under it gives its
intersection with every label at once; image-level labels cover the whole image.
n2vdb: stats.iou.tally, all units of an image at once (2x2 cell patterns, upsample_patterns.py).
Both read the stored activations; they are timed with the masks decoded beforehand (the tally
alone) and with decoding included (end to end). The results must agree exactly (as NetDissect-Lite,
the bincount counts a label once per channel it is in; the built-in set never puts one label in two
channels at one pixel, so that equals n2vdb's OR over channels here).
"""

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from n2vdb import activations as acts_store
from n2vdb import probe as probes
from n2vdb.data.broden import BrodenDataset, decode_mask
from n2vdb.stats import iou as iou_stage
from n2vdb.store import read_connection

from common import ingested, peak_rss_mib, save_result


def channel_maps(dataset, row):
    """(label codes [channels, sh, sw], image-level labels) of one image, as NetDissect-Lite reads them."""
    planes = [
        decode_mask(dataset.root / "images" / rel, (row.sh, row.sw)) for paths in row.masks.values() for rel in paths
    ]
    codes = np.stack(planes) if planes else np.zeros((0, row.sh, row.sw), np.int64)
    return codes, [n for numbers in row.labels.values() for n in numbers]


def baseline(con, probe, dataset, thresholds, decoded=None):
    numbers = np.array(sorted(dataset.labels))
    column_of = np.full(int(numbers.max()) + 1, -1, np.int64)
    column_of[numbers] = np.arange(len(numbers))
    split_of = {r.image_id: r.split for r in dataset.rows}
    rows = {r.image_id: r for r in dataset.rows}
    k = probe.n_filters
    inter = {s: np.zeros((k, len(numbers)), np.int64) for s in ("train", "val")}
    union = {s: np.zeros((k, len(numbers)), np.int64) for s in ("train", "val")}
    shape = (probe.n_filters, probe.height, probe.width)
    for ids, acts in acts_store.iter_activations(con, probe.activation_probe, shape):
        for i, image_id in enumerate(ids):
            row = rows[int(image_id)]
            codes, scalars = decoded[int(image_id)] if decoded else channel_maps(dataset, row)
            split = split_of[int(image_id)]
            sh, sw = row.sh, row.sw
            label_area = np.bincount(codes.ravel(), minlength=len(column_of))[: len(column_of)]
            label_area[0] = 0
            present = np.flatnonzero(label_area)
            cols, scalar_cols = column_of[present], column_of[np.array(scalars, np.int64)]
            # every unit's union starts at the labels' areas; units that fire add their own below
            union[split][:, cols] += label_area[present]
            union[split][:, scalar_cols] += sh * sw
            for unit in range(k):
                feature_map = acts[i, unit]
                if feature_map.max() <= thresholds[unit]:
                    continue  # NetDissect-Lite's shortcut: nothing of this unit is on in this image
                binary = torch.from_numpy((feature_map > thresholds[unit]).astype(np.float32))
                up = F.interpolate(binary[None, None], size=(sh, sw), mode="bilinear", align_corners=True)
                ys, xs = np.nonzero((up[0, 0] > 0.5).numpy())
                both = np.bincount(codes[:, ys, xs].ravel(), minlength=len(column_of))[: len(column_of)]
                both[0] = 0
                inter[split][unit, cols] += both[present]
                union[split][unit, cols] += len(ys) - both[present]
                inter[split][unit, scalar_cols] += len(ys)
    return inter, union


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ["N2VDB_QUIET"] = "1"
    root, db, tmp = ingested(args.images)
    dataset = BrodenDataset.open(root)
    with read_connection(db) as con:
        probe = probes.load(con, 1)
        thresholds = acts_store.thresholds(con, 1).numpy()
        t = torch.from_numpy(thresholds)
        timings = {}
        start = time.perf_counter()
        decoded = {r.image_id: dataset.masks(r) for r in dataset.rows}
        timings["decode"] = time.perf_counter() - start
        start = time.perf_counter()
        totals = iou_stage.tally(
            con, probe, dataset, t, "net2vec", masks=((i, *decoded[i]) for i in acts_store.stored_order(con, 1))
        )
        timings["ours, decoded"] = time.perf_counter() - start
        start = time.perf_counter()
        channels = {r.image_id: channel_maps(dataset, r) for r in dataset.rows}
        timings["decode, channels"] = time.perf_counter() - start
        start = time.perf_counter()
        inter, union = baseline(con, probe, dataset, thresholds, channels)
        timings["NetDissect-Lite alg., decoded"] = time.perf_counter() - start
        start = time.perf_counter()
        again = iou_stage.tally(con, probe, dataset, t, "net2vec", workers=args.workers)
        timings["ours, end to end"] = time.perf_counter() - start
        start = time.perf_counter()
        baseline(con, probe, dataset, thresholds)
        timings["NetDissect-Lite alg., end to end"] = time.perf_counter() - start
    for split in ("train", "val"):
        for counts in (totals, again):
            assert np.array_equal(inter[split], counts.intersection[split]), split
            assert np.array_equal(union[split], counts.union[split]), split
    n = args.images
    print(f"alexnet conv5, {n} images, 256 units, {len(dataset.labels)} concepts: results identical")
    for name, seconds in timings.items():
        print(f"{name:32s} {seconds:7.2f} s  ({seconds / n * 1000:6.2f} ms/image)")
    print(
        f"speed-up, tally alone (masks decoded beforehand for both): "
        f"{timings['NetDissect-Lite alg., decoded'] / timings['ours, decoded']:.1f}x (goal >= 50x)"
    )
    print(
        f"speed-up, end to end (mask decoding included; n2vdb with {args.workers} decoding workers): "
        f"{timings['NetDissect-Lite alg., end to end'] / timings['ours, end to end']:.1f}x"
    )
    print(f"peak RSS       {peak_rss_mib():.0f} MiB")
    alone = timings["NetDissect-Lite alg., decoded"] / timings["ours, decoded"]
    end_to_end = timings["NetDissect-Lite alg., end to end"] / timings["ours, end to end"]
    save_result(
        "dissect",
        f"{alone:.1f}x for the tally alone, {end_to_end:.1f}x with mask decoding; identical counts",
        {
            "images": n,
            "seconds": timings,
            "speedup_tally": alone,
            "speedup_end_to_end": end_to_end,
            "identical": True,
            "peak_rss_mib": peak_rss_mib(),
        },
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
