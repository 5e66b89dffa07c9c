"""Reading a Broden-format directory (method.md, "The Broden dataset format").

Layout: index.csv, label.csv, category.csv (optional) and images/ holding the images and mask PNGs.
A pixel-level cell of index.csv holds mask paths joined by ';' (several channels, e.g. part_1;part_2);
an image-level cell holds label numbers joined by ';'. A mask encodes label R + 256*G; 0 is unlabelled.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from n2vdb.errors import DatasetError

INDEX_FIXED = ("image", "split", "ih", "iw", "sh", "sw")
_CATEGORY_COUNT = re.compile(r"^\s*([^()]+?)\s*(?:\((\d+)\))?\s*$")


@dataclass(frozen=True)
class Label:
    number: int
    name: str
    category: str  # primary: the category with the largest count
    categories: tuple[str, ...]
    frequency: int | None
    coverage: float | None


@dataclass(frozen=True)
class ImageRow:
    image_id: int
    image: str  # relative to images/
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    masks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # category -> mask PNG paths
    labels: dict[str, tuple[int, ...]] = field(default_factory=dict)  # category -> image-level labels


def parse_categories(cell: str) -> tuple[str, tuple[str, ...]]:
    """'material(36);object(3)' -> ('material', ('material', 'object')): primary = largest count."""
    parsed = []
    for part in cell.split(";"):
        if not part.strip():
            continue
        match = _CATEGORY_COUNT.match(part)
        if not match:
            raise ValueError(f"bad category {part!r}")
        parsed.append((match[1], int(match[2]) if match[2] else 0))
    if not parsed:
        raise ValueError("empty category")
    # Stable max: the first listed wins a tie, as in label.csv order.
    primary = max(parsed, key=lambda item: item[1])[0]
    return primary, tuple(name for name, _ in parsed)


def _optional(value: str | None, kind):
    return kind(value) if value not in (None, "") else None


def read_labels(root: Path) -> dict[int, Label]:
    path = root / "label.csv"
    if not path.is_file():
        raise DatasetError(f"{root} has no label.csv: is it a Broden-format directory?")
    labels: dict[int, Label] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"number", "name", "category"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path}: header lacks {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            try:
                number = int(row["number"])
                if number == 0:
                    continue  # '-': unlabelled
                primary, categories = parse_categories(row["category"] or "")
                labels[number] = Label(
                    number, row["name"], primary, categories,
                    _optional(row.get("frequency"), int), _optional(row.get("coverage"), float),
                )
            except (TypeError, ValueError) as exc:
                raise DatasetError(f"{path} line {line}: malformed row ({exc})") from None
    return labels


def _int_cell(row: dict, key: str, path: Path, line: int) -> int:
    try:
        return int(row[key])
    except (TypeError, ValueError):
        raise DatasetError(f"{path} line {line}: column {key!r} is {row.get(key)!r}, expected an integer") from None


def read_index(root: Path) -> tuple[list[str], list[ImageRow]]:
    """Returns (category columns, rows). Each cell is classified as masks or labels by its content."""
    path = root / "index.csv"
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist")
    if not path.is_file():
        raise DatasetError(f"{root} has no index.csv: is it a Broden-format directory?")
    rows = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in INDEX_FIXED if c not in header]
        if missing:
            raise DatasetError(f"{path}: header lacks {', '.join(missing)}")
        categories = [c for c in header if c not in INDEX_FIXED]
        for line, row in enumerate(reader, start=2):
            if None in row or any(v is None for v in row.values()):
                raise DatasetError(f"{path} line {line}: expected {len(header)} columns")
            split = row["split"]
            if split not in ("train", "val"):
                raise DatasetError(f"{path} line {line}: split is {split!r}, expected train or val")
            masks, labels = {}, {}
            for category in categories:
                tokens = [t for t in row[category].split(";") if t]
                if not tokens:
                    continue
                if all(t.isdigit() for t in tokens):
                    labels[category] = tuple(int(t) for t in tokens)
                else:
                    masks[category] = tuple(tokens)
            sizes = [_int_cell(row, k, path, line) for k in ("ih", "iw", "sh", "sw")]
            if min(sizes) <= 0:
                raise DatasetError(f"{path} line {line}: image and segmentation sizes must be positive")
            rows.append(ImageRow(len(rows), row["image"], split, *sizes, masks=masks, labels=labels))
    if not rows:
        raise DatasetError(f"{path} lists no images")
    return categories, rows


def decode_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A Broden mask PNG as int32 label numbers (R + 256*G)."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"mask {path} is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"mask {path} cannot be decoded ({exc}); replace or remove that row") from None
    if rgb.shape[:2] != shape:
        raise DatasetError(f"mask {path} is {rgb.shape[1]}x{rgb.shape[0]}, index.csv says {shape[1]}x{shape[0]}")
    return rgb[..., 0].astype(np.int32) | (rgb[..., 1].astype(np.int32) << 8)


def concept_masks(root: Path, row: ImageRow, known: dict[int, Label] | set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(concept ids, bool masks [C, sh, sw]) of every concept in the image.

    A concept's mask is the OR over every channel of every category it appears in;
    an image-level label is an all-ones mask.
    """
    shape = (row.sh, row.sw)
    per_label: dict[int, np.ndarray] = {}
    for paths in row.masks.values():
        for rel in paths:
            codes = decode_mask(root / "images" / rel, shape)
            present = np.flatnonzero(np.bincount(codes.ravel()))
            for number in present[present > 0].tolist():
                hit = codes == number
                if number in per_label:
                    per_label[number] |= hit
                else:
                    per_label[number] = hit
    for numbers in row.labels.values():
        for number in numbers:
            per_label[number] = np.ones(shape, dtype=bool)
    unknown = sorted(n for n in per_label if n not in known)
    if unknown:
        raise DatasetError(
            f"image {row.image} (index.csv line {row.image_id + 2}) uses label {unknown[0]} missing from label.csv"
        )
    ids = np.array(sorted(per_label), dtype=np.int32)
    if not len(ids):
        return ids, np.zeros((0, *shape), dtype=bool)
    return ids, np.stack([per_label[i] for i in ids])


@dataclass
class BrodenDataset:
    """The metadata of a Broden-format directory; pixel data is decoded on demand."""

    root: Path
    categories: list[str]
    labels: dict[int, Label]
    rows: list[ImageRow]

    @classmethod
    def open(cls, root: str | Path) -> BrodenDataset:
        root = Path(root).expanduser().resolve()
        categories, rows = read_index(root)
        return cls(root, categories, read_labels(root), rows)

    def image_path(self, row: ImageRow) -> Path:
        return self.root / "images" / row.image

    def masks(self, row: ImageRow) -> tuple[np.ndarray, np.ndarray]:
        return concept_masks(self.root, row, self.labels)

    def concept_levels(self) -> dict[int, str]:
        """'image' for labels that only ever appear as image-level labels, else 'pixel'."""
        image_categories = set()
        pixel_categories = set()
        for row in self.rows:
            image_categories.update(row.labels)
            pixel_categories.update(row.masks)
        return {
            n: "image" if lab.category in image_categories and lab.category not in pixel_categories else "pixel"
            for n, lab in self.labels.items()
        }
