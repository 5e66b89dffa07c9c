import atexit
import csv
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

os.environ["N2VDB_QUIET"] = "1"
os.environ.pop("N2VDB_DB", None)
# The built-in concept set and the shell history go to a home of this test process's own: never the
# user's ~/.cache, and no two pytest-xdist workers generating the built-in set into one directory.
os.environ["N2VDB_HOME"] = tempfile.mkdtemp(prefix="n2vdb-test-home-")
atexit.register(shutil.rmtree, os.environ["N2VDB_HOME"], ignore_errors=True)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # one worker per core: torch's threads would oversubscribe
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )


def write_mask(path: Path, labels: np.ndarray) -> None:
    """Encode label numbers as Broden does: R = n % 256, G = n // 256."""
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def write_image(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


COLUMNS = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "material", "part", "scene", "texture"]


def write_broden(root: Path, rows: list[dict], labels: list[tuple]) -> Path:
    """rows: dicts of index.csv cells; labels: (number, name, category cell)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "index.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
    with (root / "label.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        writer.writerow([0, "-", "-", 0, 0, ""])
        for number, name, category in labels:
            writer.writerow([number, name, category, 1, 0.5, ""])
    return root


@pytest.fixture
def edge_broden(tmp_path) -> tuple[Path, dict]:
    """A small Broden-format directory with every edge case of the format, and the truth about it.

    truth[(image_id, concept)] = labelled pixel count at segmentation size (OR over channels).
    """
    root = tmp_path / "edge"
    rng = np.random.default_rng(7)
    labels = [
        (1, "red-c", "color(2)"),
        (2, "dog", "object(5)"),
        (300, "wood", "material(4);object(9)"),
        (301, "leg", "part(3)"),
        (302, "head", "part(2)"),
        (5, "street-s", "scene(2)"),
        (6, "city-s", "scene(1)"),
        (7, "striped", "texture(1)"),
    ]
    rows, truth = [], {}
    sizes = [(40, 30, 20, 15), (33, 47, 17, 23), (50, 50, 25, 25), (21, 35, 11, 18)]
    for i, (ih, iw, sh, sw) in enumerate(sizes):
        stem = f"set/{i:03d}"
        write_image(root / "images" / f"{stem}.jpg", ih, iw, seed=i)
        row = {
            "image": f"{stem}.jpg",
            "split": "train" if i % 2 == 0 else "val",
            "ih": ih,
            "iw": iw,
            "sh": sh,
            "sw": sw,
        }
        if i == 3:  # a row with no labels at all
            rows.append(row)
            continue
        obj = rng.choice([0, 2, 300], size=(sh, sw))
        color = rng.choice([0, 1], size=(sh, sw))
        part1 = rng.choice([0, 301, 302], size=(sh, sw))
        part2 = rng.choice([0, 301], size=(sh, sw))  # overlaps part1's 301: OR, not sum
        write_mask(root / "images" / f"{stem}_object.png", obj)
        write_mask(root / "images" / f"{stem}_color.png", color)
        write_mask(root / "images" / f"{stem}_part_1.png", part1)
        write_mask(root / "images" / f"{stem}_part_2.png", part2)
        row.update(
            object=f"{stem}_object.png",
            color=f"{stem}_color.png",
            part=f"{stem}_part_1.png;{stem}_part_2.png",
            scene="5;6" if i == 0 else "5",
            texture="7" if i == 2 else "",
        )
        for concept, mask in (
            (1, color == 1),
            (2, obj == 2),
            (300, obj == 300),
            (302, part1 == 302),
            (301, (part1 == 301) | (part2 == 301)),
        ):
            if mask.any():
                truth[(i, concept)] = int(mask.sum())
        truth[(i, 5)] = sh * sw
        if i == 0:
            truth[(i, 6)] = sh * sw
        if i == 2:
            truth[(i, 7)] = sh * sw
        rows.append(row)
    write_broden(root, rows, labels)
    return root, truth


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """BUILD(dir) once per test run: under pytest-xdist the first worker builds it under a lock and
    the others wait and share it (the fixtures below are read-only; tests copy what they change)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / name  # the run's directory, above each worker's
    with FileLock(f"{folder}.lock"):
        done = folder / ".built"  # holds the built path, relative to FOLDER
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half way left this
            folder.mkdir()
            done.write_text(str(build(folder).relative_to(folder)))
    return folder / done.read_text()


def _generate_synthetic(folder: Path) -> Path:
    from n2vdb.data.synth import generate

    return generate(folder / "synthetic", images=80, size=227, seed=3)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return _built_once(tmp_path_factory, "synth", _generate_synthetic)


@pytest.fixture(scope="session")
def ingested_db(tmp_path_factory, synthetic_dir) -> Path:
    """One finished probe (alexnet conv5, random weights) on a small built-in concept set."""

    def ingest(folder: Path) -> Path:
        from n2vdb import api
        from n2vdb.probe import TrainSettings

        db = folder / "n2v.duckdb"
        api.add_dataset(synthetic_dir, "synthetic", db)
        api.ingest(
            "alexnet", "conv5", db, dataset="synthetic", weights="random", workers=0, train=TrainSettings(epochs=10)
        )
        return db

    return _built_once(tmp_path_factory, "db", ingest)


@pytest.fixture
def db_copy(tmp_path, ingested_db) -> Path:
    target = tmp_path / "copy.duckdb"
    shutil.copy(ingested_db, target)
    return target
