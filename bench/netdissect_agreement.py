"""--iou-mode netdissect against NetDissect-Lite's published tally (the loop of tests/test_netdissect.py).

    python bench/netdissect_agreement.py [--images 120] [--threads N]

An alexnet conv5 probe (random weights, --preprocess caffe) on the built-in concept set. Compared:
(a) n2vdb's stored IoUs summed over splits against the published algorithm fed the stored activations
    and thresholds: must be identical, pair by pair;
(b) the published algorithm on the float activations (the model re-run, numpy's percentile thresholds),
    as NetDissect-Lite itself would compute: differs only through the uint8 quantisation.
Also times the two tallies (net2vec and netdissect mode) on the same stored activations.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_netdissect import netdissect_lite  # noqa: E402

from n2vdb import activations as acts_store  # noqa: E402
from n2vdb import api, extract  # noqa: E402
from n2vdb import probe as probes  # noqa: E402
from n2vdb.data.broden import BrodenDataset  # noqa: E402
from n2vdb.models import weights  # noqa: E402
from n2vdb.probe import TrainSettings  # noqa: E402
from n2vdb.stats import iou as iou_stage  # noqa: E402
from n2vdb.stats import netdissect
from n2vdb.store import read_connection  # noqa: E402

from common import save_result, scratch  # noqa: E402


def float_activations(root, n_images):
    dataset = BrodenDataset.open(root)
    net = weights.load("alexnet", "random", 0).net
    tap = extract.LayerTap(net, "features.11", False)
    rows = extract.ImageFolderRows(
        dataset, dataset.rows[:n_images], 227, extract.CAFFE_MEAN, extract.CAFFE_STD, "caffe"
    )
    batch = torch.stack([rows[i][1] for i in range(len(rows))])
    return torch.cat([tap(batch[i : i + 32]) for i in range(0, len(batch), 32)]).numpy().astype(np.float64)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root, db, tmp = scratch(args.images)
    probe_id = api.ingest(
        "alexnet",
        "conv5",
        db,
        dataset="synthetic",
        weights="random",
        workers=0,
        iou_mode="netdissect",
        preprocess="caffe",
        train=TrainSettings(epochs=1),
    )
    with read_connection(db) as con:
        stored = {
            (f, c): (i, u)
            for f, c, i, u in con.execute(
                "SELECT filter, concept_id, sum(intersection), sum(union_) FROM filter_concept_iou"
                " WHERE probe_id = ? GROUP BY ALL",
                [probe_id],
            ).fetchall()
        }
        thresholds = netdissect.thresholds(con, probe_id).numpy()
        probe = probes.load(con, probe_id)
        dataset = BrodenDataset.open(root)
        start = time.perf_counter()
        netdissect.tally(con, probe, dataset)
        t_netdissect = time.perf_counter() - start
        start = time.perf_counter()
        iou_stage.tally(con, probe, dataset, acts_store.thresholds(con, probe_id), "net2vec")
        t_net2vec = time.perf_counter() - start
    _, values = api.activations(probe_id, db)
    both, denominator, _ = netdissect_lite(root, values.astype(np.float64), thresholds)
    real = sorted(BrodenDataset.open(root).labels)  # the published arrays also hold unused label numbers
    expected = {
        (f, c): (int(both[f, c]), int(denominator[f, c]))
        for f in range(both.shape[0])
        for c in real
        if denominator[f, c] > 0
    }
    same = sum(stored.get(key) == value for key, value in expected.items())
    print(
        f"(a) stored vs published algorithm on the stored values: {same} of {len(expected)} (unit, label) "
        f"pairs identical; {len(stored)} pairs stored"
    )
    acts = float_activations(root, args.images)
    float_thresholds = np.percentile(acts, 99.5, axis=(0, 2, 3))
    both_f, denominator_f, _ = netdissect_lite(root, acts, float_thresholds)
    iou_f = both_f / (denominator_f + 1e-10)
    iou_s = np.zeros_like(iou_f)
    for (f, c), (i, u) in stored.items():
        iou_s[f, c] = i / u
    labels = np.zeros(denominator_f.shape[1], bool)
    labels[real] = denominator_f[:, real].max(axis=0) > 0
    diff = np.abs(iou_s - iou_f)[:, labels]
    top_s, top_f = iou_s[:, labels].argmax(axis=1), iou_f[:, labels].argmax(axis=1)
    print(
        f"(b) against float activations: max |dIoU| {diff.max():.2e}, mean {diff.mean():.2e}; "
        f"top label agrees on {(top_s == top_f).sum()} of {len(top_s)} units; "
        f"max |threshold - float percentile| {np.abs(thresholds - float_thresholds).max():.2e}"
    )
    print(f"tally over {args.images} images: netdissect {t_netdissect:.2f} s, net2vec {t_net2vec:.2f} s")
    agree = int((top_s == top_f).sum())
    save_result(
        "netdissect_agreement",
        f"{same:,} of {len(expected):,} (unit, label) pairs identical on the stored values; on float "
        f"activations max |dIoU| {diff.max():.1e}, top label {agree} of {len(top_s)} units; tally "
        f"{t_netdissect:.1f} s, {t_netdissect / args.images * 1000:.0f} ms per image (net2vec mode {t_net2vec:.1f} s)",
        {
            "images": args.images,
            "pairs_identical": same,
            "pairs": len(expected),
            "pairs_stored": len(stored),
            "max_abs_diou_float": float(diff.max()),
            "mean_abs_diou_float": float(diff.mean()),
            "top_label_agrees": agree,
            "units": len(top_s),
            "max_threshold_diff": float(np.abs(thresholds - float_thresholds).max()),
            "tally_netdissect_s": t_netdissect,
            "tally_net2vec_s": t_net2vec,
        },
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
