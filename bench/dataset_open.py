"""What the dataset checks cost on a Broden-sized index: opening (every path resolved, symlinks
included) and the fingerprint that ingest and merge verify (CSV sha256s, one stat per mask).

    PYTHONPATH=$PWD python3 bench/dataset_open.py [ROWS]

The directory is Broden-shaped (ROWS images with four masks each, spread over 40 folders) but its files
are empty: these steps only read index.csv and label.csv and stat the listed files.
"""

import csv
import sys
import tempfile
import time
from pathlib import Path

from n2vdb.data import fingerprint
from n2vdb.data.broden import BrodenDataset

from common import save_result


def build(root: Path, rows: int) -> None:
    columns = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "material", "part", "scene", "texture"]
    with (root / "label.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for i, category in enumerate(["color", "object", "material", "part", "scene", "texture"], start=1):
            writer.writerow([i, f"concept{i}", f"{category}(1)", 1, "", ""])
    with (root / "index.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for i in range(rows):
            folder = root / "images" / f"set{i % 40}"
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"set{i % 40}/{i:06d}"
            names = [
                f"{stem}.jpg",
                f"{stem}_color.png",
                f"{stem}_object.png",
                f"{stem}_part_1.png",
                f"{stem}_part_2.png",
            ]
            for name in names:
                (root / "images" / name).touch()
            writer.writerow(
                [names[0], "train", 224, 224, 112, 112, names[1], names[2], "", f"{names[3]};{names[4]}", "5", ""]
            )


def main(rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, rows)
        start = time.perf_counter()
        dataset = BrodenDataset.open(root)
        opened = time.perf_counter() - start
        start = time.perf_counter()
        fingerprint.take(dataset)
        took = time.perf_counter() - start
    print(f"{rows} rows, {rows * 5} paths: open {opened:.2f} s, fingerprint {took:.2f} s")
    save_result(
        "dataset_open",
        f"{rows:,} rows, {rows * 5:,} paths: open {opened:.1f} s; fingerprint {took:.1f} s",
        {"rows": rows, "paths": rows * 5, "open_s": opened, "fingerprint_s": took},
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 63000)
