"""Segmentation embeddings: all concepts jointly (n2vdb) vs one concept at a time (the reference
code's way), on the same in-memory examples, same epochs, one run.

    python bench/embed.py [--images 300] [--epochs 5]

one at a time: for each concept, its own train images in shuffled batches of 16, the loss divided
by the batch's own count, one forward and autograd backward per batch through F.interpolate, as the
Net2Vec reference code trains. Both runs start from decoded examples held in memory (n2vdb's
packed pair blocks, the reference's list of examples), so the ratio is the training arithmetic alone.
"""

import argparse
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from n2vdb import probe as probes
from n2vdb.data.broden import BrodenDataset
from n2vdb.embed import segmentation
from n2vdb.embed.examples import cached, store_examples
from n2vdb.store import read_connection

from common import ingested, peak_rss_mib, save_result


def one_at_a_time(source, concepts, k, epochs, lr=1e-4, batch_size=16, seed=0):
    """source() yields the examples; called once per concept and epoch, as the reference reads its data."""
    column = {int(c): j for j, c in enumerate(concepts)}
    alpha = segmentation.compute_alpha(source, column)
    rng = random.Random(seed)
    weights = torch.zeros(k, len(concepts))
    for concept, j in column.items():
        w = ((torch.rand(k) * 2 - 1) / math.sqrt(k)).requires_grad_()
        optimiser = torch.optim.SGD([w], lr=lr, momentum=0.9)
        for _ in range(epochs):
            mine = [
                (ex, list(ex.concept_ids).index(concept))
                for ex in source()
                if ex.split == "train" and concept in ex.concept_ids
            ]
            rng.shuffle(mine)
            for start in range(0, len(mine), batch_size):
                batch = mine[start : start + batch_size]
                binary = torch.stack([ex.binary for ex, _ in batch]).float()
                labels = torch.stack([ex.masks[i] for ex, i in batch]).float()
                logits = F.interpolate(
                    torch.einsum("nkhw,k->nhw", binary, w)[:, None],
                    size=labels.shape[1:],
                    mode="bilinear",
                    align_corners=True,
                )[:, 0]
                loss = segmentation.concept_loss(logits, labels, alpha[j].expand(len(batch))).sum() / len(batch)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        weights[:, j] = w.detach()
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    os.environ["N2VDB_QUIET"] = "1"
    root, db, tmp = ingested(args.images)
    dataset = BrodenDataset.open(root)
    with read_connection(db) as con:
        probe = probes.load(con, 1)
        pixel = {c for (c,) in con.execute("SELECT concept_id FROM concepts WHERE level = 'pixel'").fetchall()}
        start = time.perf_counter()
        packed = cached(store_examples(con, probe, dataset, pixel))
        decode = time.perf_counter() - start
        examples = list(packed())
        concepts = sorted({int(c) for ex in examples for c in ex.concept_ids if ex.split == "train"})
        k = probe.n_filters
        start = time.perf_counter()
        segmentation.train(packed, concepts, k, epochs=args.epochs)
        joint = time.perf_counter() - start
        start = time.perf_counter()
        one_at_a_time(lambda: examples, concepts, k, args.epochs)
        alone = time.perf_counter() - start
    n_train = sum(ex.split == "train" for ex in examples)
    pairs = sum(len(ex.concept_ids) for ex in examples if ex.split == "train")
    print(
        f"alexnet conv5, {n_train} train images, {len(concepts)} concepts, {pairs} (image, concept) pairs, "
        f"{args.epochs} epochs"
    )
    print(
        f"jointly            {joint:7.2f} s   {joint / args.epochs / n_train * 1000:6.2f} s per epoch per 1,000 images"
    )
    print(f"one at a time      {alone:7.2f} s   same in-memory examples: speed-up {alone / joint:.1f}x")
    print(f"decoding once      {decode:7.2f} s   (read and packed before either run; not in the ratio)")
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"peak RSS           {peak_rss_mib():.0f} MiB")
    per_epoch = joint / args.epochs / n_train * 1000
    save_result(
        "embed",
        f"{alone / joint:.1f}x; {per_epoch:.2f} s per epoch per 1,000 images",
        {
            "train_images": n_train,
            "concepts": len(concepts),
            "pairs": pairs,
            "epochs": args.epochs,
            "joint_s": joint,
            "one_at_a_time_s": alone,
            "speedup": alone / joint,
            "decode_s": decode,
            "s_per_epoch_per_1000": per_epoch,
            "peak_rss_mib": peak_rss_mib(),
        },
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
