"""Single-filter IoU stage against a per-unit loop in the style of NetDissect-Lite, same data, one run.

    python bench/dissect.py [--images 120]

baseline: image by image, unit by unit: binarise the unit's map, resize it to the segmentation size,
then count intersection and union with each concept's mask (what NetDissect-Lite's tally does).
n2vdb: stats.iou.tally, all units of an image at once (2x2 cell patterns, upsample_patterns.py).
Both read the stored activations; they are timed with the masks decoded beforehand (the tally
alone) and with decoding included (end to end). The results must agree exactly.
"""

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import ingested, peak_rss_mib
from n2vdb import activations as acts_store
from n2vdb import probe as probes
from n2vdb.data.broden import BrodenDataset
from n2vdb.stats import iou as iou_stage
from n2vdb.store import read_connection


def baseline(con, probe, dataset, thresholds, decoded=None):
    concept_ids = np.array(sorted(dataset.labels))
    column = {int(c): j for j, c in enumerate(concept_ids)}
    split_of = {r.image_id: r.split for r in dataset.rows}
    rows = {r.image_id: r for r in dataset.rows}
    k = probe.n_filters
    inter = {s: np.zeros((k, len(concept_ids)), np.int64) for s in ("train", "val")}
    union = {s: np.zeros((k, len(concept_ids)), np.int64) for s in ("train", "val")}
    shape = (probe.n_filters, probe.height, probe.width)
    for ids, acts in acts_store.iter_activations(con, probe.activation_probe, shape):
        for i, image_id in enumerate(ids):
            concepts, masks = decoded[int(image_id)] if decoded else dataset.masks(rows[int(image_id)])
            split = split_of[int(image_id)]
            flat = masks.reshape(len(concepts), -1)
            for unit in range(k):
                binary = torch.from_numpy((acts[i, unit] > thresholds[unit]).astype(np.float32))
                up = F.interpolate(binary[None, None], size=masks.shape[1:], mode="bilinear", align_corners=True)
                m = (up[0, 0] > 0.5).numpy().ravel()
                for j, c in enumerate(concepts):
                    inter[split][unit, column[int(c)]] += np.count_nonzero(m & flat[j])
                    union[split][unit, column[int(c)]] += np.count_nonzero(m | flat[j])
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
        totals = iou_stage.tally(con, probe, dataset, t, "net2vec",
                                 masks=((i, *decoded[i]) for i in acts_store.stored_order(con, 1)))
        timings["ours, decoded"] = time.perf_counter() - start
        start = time.perf_counter()
        inter, union = baseline(con, probe, dataset, thresholds, decoded)
        timings["loop, decoded"] = time.perf_counter() - start
        start = time.perf_counter()
        again = iou_stage.tally(con, probe, dataset, t, "net2vec", workers=args.workers)
        timings["ours, end to end"] = time.perf_counter() - start
        start = time.perf_counter()
        baseline(con, probe, dataset, thresholds)
        timings["loop, end to end"] = time.perf_counter() - start
    for split in ("train", "val"):
        for counts in (totals, again):
            assert np.array_equal(inter[split], counts.intersection[split]), split
            assert np.array_equal(union[split], counts.union[split]), split
    n = args.images
    print(f"alexnet conv5, {n} images, 256 units, {len(dataset.labels)} concepts: results identical")
    for name, seconds in timings.items():
        print(f"{name:18s} {seconds:7.2f} s  ({seconds / n * 1000:6.2f} ms/image)")
    print(f"speed-up, tally alone (masks decoded beforehand for both): "
          f"{timings['loop, decoded'] / timings['ours, decoded']:.1f}x (goal >= 50x)")
    print(f"speed-up, end to end (mask decoding included; n2vdb with {args.workers} decoding workers): "
          f"{timings['loop, end to end'] / timings['ours, end to end']:.1f}x")
    print(f"peak RSS       {peak_rss_mib():.0f} MiB")
    tmp.cleanup()


if __name__ == "__main__":
    main()
