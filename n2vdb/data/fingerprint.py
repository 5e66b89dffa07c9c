"""A fingerprint of what `data add` imported: probes key images by their index.csv row, so a directory
that changes after registration must be refused, never mixed (README "Datasets").

It holds the sha256 of every CSV file of the format (index.csv, label.csv, category.csv, c_*.csv) and
one digest of the byte size of every mask index.csv lists: masks were decoded into image_concepts at
registration and are read again by the IoU and training stages, so a replaced mask would disagree with
the stored pixel counts. Images are not fingerprinted: replacing an unreadable image by a good copy of
the same image is the fix that keeps every id, and a size check would forbid it; their order and
paths are covered by index.csv.
"""

from __future__ import annotations

import hashlib
import os

from n2vdb.data.broden import BrodenDataset

MASKS = "masks"
_CHUNK = 1 << 20


def csv_files(dataset: BrodenDataset) -> list[str]:
    names = ["index.csv", "label.csv", "category.csv"]
    names += sorted(p.name for p in dataset.root.glob("c_*.csv"))
    return [n for n in names if (dataset.root / n).is_file()]


def take(dataset: BrodenDataset) -> dict[str, tuple[str, int]]:
    """file -> (sha256, bytes); a file the format allows but the directory lacks has no entry."""
    entries = {}
    for name in csv_files(dataset):
        digest, size = hashlib.sha256(), 0
        with (dataset.root / name).open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        entries[name] = (digest.hexdigest(), size)
    digest, total = hashlib.sha256(), 0
    images = os.path.join(dataset.root, "images")  # BrodenDataset.open has checked every path stays inside
    for row in dataset.rows:
        for rels in row.masks.values():
            for rel in rels:
                try:
                    size = os.stat(os.path.join(images, rel)).st_size
                except OSError:
                    size = -1  # a missing mask fails the import itself; this keeps the digest defined
                digest.update(f"{rel}\t{size}\n".encode())
                total += max(size, 0)
    entries[MASKS] = (digest.hexdigest(), total)
    return entries


def differences(recorded: dict[str, tuple[str, int]], now: dict[str, tuple[str, int]]) -> list[str]:
    """What changed, in words: 'index.csv changed', 'c_color.csv was added', ..."""
    said = []
    for name in sorted(set(recorded) | set(now), key=lambda n: (n == MASKS, n)):
        if name not in now:
            said.append(f"{name} was removed")
        elif name not in recorded:
            said.append(f"{name} was added")
        elif recorded[name][0] != now[name][0]:
            if name != MASKS:
                said.append(f"{name} changed")
            elif "index.csv changed" not in said:  # a new index.csv lists other masks anyway
                said.append("a mask file changed")
    return said
