"""Reading a Broden-format directory (method.md, "The Broden dataset format").

Layout: index.csv, label.csv, category.csv (optional) and images/ holding the images and mask PNGs.
A pixel-level cell of index.csv holds mask paths joined by ';' (several channels, e.g. part_1;part_2);
an image-level cell holds label numbers joined by ';'. A mask encodes label R + 256*G; 0 is unlabelled.
"""

from __future__ import annotations

import csv
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from n2vdb.data.names import file_stem, stem_key
from n2vdb.errors import DatasetError

INDEX_FIXED = ("image", "split", "ih", "iw", "sh", "sw")
_CATEGORY_COUNT = re.compile(r"^\s*([^()]+?)\s*(?:\((\d+)\))?\s*$")
# Image and segmentation sides, in px: Broden's largest release is 384 px, and one mask this size is
# already ~200 MB to decode; a larger declared size is a typo, not a dataset (it would end in a MemoryError).
MAX_SIDE = 8192
# Label numbers are stored as DuckDB INTEGERs (int32); 0 means unlabelled.
MAX_LABEL = 2**31 - 1


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


def _csv_rows(path: Path) -> Iterator:
    """A CSV file read as UTF-8 (a byte-order mark is skipped): yields its header, then (line, row)
    pairs. A repeated column name is refused, since a dict row would silently keep only its last cell."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise DatasetError(
                    f"{path}: the header names column {repeated[0]!r} more than once; keep one column per name"
                )
            yield header
            yield from enumerate(reader, start=2)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:
        raise DatasetError(f"{path} is not a readable CSV file ({exc})") from None


def read_labels(root: Path) -> dict[int, Label]:
    """label.csv; label numbers, names and the file names made from names must each be unique."""
    path = root / "label.csv"
    if not path.is_file():
        raise DatasetError(f"{root} has no label.csv: is it a Broden-format directory?")
    labels: dict[int, Label] = {}
    lines: dict[int, int] = {}  # label number -> line, to name both rows of a duplicate
    rows = _csv_rows(path)
    missing = {"number", "name", "category"} - set(next(rows))
    if missing:
        raise DatasetError(f"{path}: header lacks {', '.join(sorted(missing))}")
    for line, row in rows:
        try:
            number = int(row["number"])
            if number == 0:
                continue  # '-': unlabelled
            if not 0 < number <= MAX_LABEL:
                raise ValueError(f"label number {number} is outside 1..{MAX_LABEL}")
            if number in lines:
                raise DatasetError(
                    f"{path}: label number {number} appears on lines {lines[number]} and {line}; "
                    "each label needs its own number"
                )
            name = row["name"] or ""
            if not name.strip():
                raise ValueError("the name is empty")
            primary, categories = parse_categories(row["category"] or "")
            frequency = _optional(row.get("frequency"), int)
            if frequency is not None and not 0 <= frequency <= MAX_LABEL:
                raise ValueError(f"frequency {frequency} is outside 0..{MAX_LABEL}")
            labels[number] = Label(
                number,
                name,
                primary,
                categories,
                frequency,
                _optional(row.get("coverage"), float),
            )
            lines[number] = line
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{path} line {line}: malformed row ({exc})") from None
    _refuse_name_clashes(path, labels, lines)
    return labels


def _refuse_name_clashes(path: Path, labels: dict[int, Label], lines: dict[int, int]) -> None:
    """Concepts are looked up by name and written to files named after them: names must be unique,
    also after sanitising for file names and up to case."""
    seen: dict[str, Label] = {}
    for label in labels.values():
        key = stem_key(label.name)
        other = seen.get(key)
        if other is None:
            seen[key] = label
            continue
        where = f"lines {lines[other.number]} and {lines[label.number]}"
        if other.name == label.name:
            raise DatasetError(
                f"{path}: concept name {label.name!r} is used by labels {other.number} and "
                f"{label.number} ({where}); give each concept its own name"
            )
        raise DatasetError(
            f"{path}: concept names {other.name!r} and {label.name!r} ({where}) collide as file "
            f"names ({file_stem(label.name)!r}); rename one of them"
        )


def label_categories(labels: dict[int, Label]) -> set[str]:
    return {c for label in labels.values() for c in label.categories}


def _int_cell(row: dict, key: str, path: Path, line: int) -> int:
    try:
        value = int(row[key])
    except (TypeError, ValueError):
        raise DatasetError(f"{path} line {line}: column {key!r} is {row.get(key)!r}, expected an integer") from None
    if not 0 < value <= MAX_SIDE:
        raise DatasetError(
            f"{path} line {line}: column {key!r} is {value}; image and segmentation sizes must lie in 1..{MAX_SIDE} px"
        )
    return value


class _Paths:
    """Resolves the paths index.csv names (relative to images/), symlinks included, and refuses any
    that lead outside the dataset directory. Each folder is resolved once; a file costs one lstat."""

    def __init__(self, root: Path):
        self.root = os.path.realpath(root)
        self.images = os.path.join(self.root, "images")
        self._folders: dict[str, str] = {}

    def outside(self, rel: str) -> str | None:
        """Why REL is refused, or None when it resolves inside the dataset directory."""
        if os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
            return "is an absolute path"
        folder, _, name = rel.rpartition("/")
        try:
            if name in ("", ".", "..") or os.sep in name or (os.altsep and os.altsep in name):
                real = os.path.realpath(os.path.join(self.images, rel))
            else:
                if folder not in self._folders:
                    self._folders[folder] = os.path.realpath(os.path.join(self.images, folder))
                real = self._folders[folder] + os.sep + name
                if _is_link(real):
                    real = os.path.realpath(real)
        except ValueError:  # an embedded NUL byte
            return "is not a valid path"
        if not real.startswith(self.root + os.sep):
            return "resolves outside the dataset directory"
        return None


def _is_link(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False  # a missing file is reported where it is read


def dataset_file(root: Path, rel: str, paths: _Paths | None = None) -> Path:
    """ROOT/images/REL, refused when it resolves (symlinks included) outside ROOT: the read-side
    guard, for a directory that changed after it was checked. PATHS: a _Paths of ROOT to reuse across
    the files of one image (its folders resolved once)."""
    why = (paths or _Paths(root)).outside(rel)
    if why:
        raise DatasetError(f"{rel!r} in {root}/index.csv {why}; paths must stay inside the dataset directory")
    return root / "images" / rel


def check_directory(root: Path) -> Path:
    """ROOT/index.csv, or a one-line error saying what is wrong with ROOT."""
    if not root.exists():
        raise DatasetError(f"dataset directory {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; pass the dataset directory that holds index.csv")
    if not (root / "index.csv").is_file():
        raise DatasetError(f"{root} has no index.csv: is it a Broden-format directory?")
    return root / "index.csv"


def read_index(root: Path, categories_known: set[str] | None = None) -> tuple[list[str], list[ImageRow], list[str]]:
    """Returns (category columns, rows, ignored columns). Each cell is classified as masks or labels by its
    content. A column beyond the fixed ones is a category when label.csv names it as one (CATEGORIES_KNOWN;
    None = every column); other columns are ignored. Every path must stay inside ROOT."""
    path = check_directory(root)
    paths = _Paths(root)
    cells = _csv_rows(path)
    header = next(cells)
    missing = [c for c in INDEX_FIXED if c not in header]
    if missing:
        raise DatasetError(f"{path}: header lacks {', '.join(missing)}")
    categories = [c for c in header if c not in INDEX_FIXED and (categories_known is None or c in categories_known)]
    ignored = [c for c in header if c not in INDEX_FIXED and c not in categories]
    rows: list[ImageRow] = []
    for line, row in cells:
        if None in row or any(v is None for v in row.values()):
            raise DatasetError(f"{path} line {line}: expected {len(header)} columns")
        split = row["split"]
        if split not in ("train", "val"):
            raise DatasetError(f"{path} line {line}: split is {split!r}, expected train or val")
        if not row["image"]:
            raise DatasetError(f"{path} line {line}: column 'image' is empty")
        masks, labels = {}, {}
        for category in categories:
            tokens = [t for t in row[category].split(";") if t]
            if not tokens:
                continue
            if all(t.isascii() and t.isdigit() for t in tokens):
                numbers = tuple(int(t) for t in tokens)
                if max(numbers) > MAX_LABEL:
                    raise DatasetError(
                        f"{path} line {line}, column {category!r}: label number {max(numbers)} is "
                        f"above {MAX_LABEL}, the largest n2vdb stores"
                    )
                labels[category] = numbers
            else:
                masks[category] = tuple(tokens)
        for column, rel in (("image", row["image"]), *((c, t) for c, ts in masks.items() for t in ts)):
            why = paths.outside(rel)
            if why:
                raise DatasetError(
                    f"{path} line {line}, column {column!r}: {rel!r} {why}; paths in index.csv are "
                    "relative to images/ and must stay inside the dataset directory"
                )
        sizes = [_int_cell(row, k, path, line) for k in ("ih", "iw", "sh", "sw")]
        rows.append(ImageRow(len(rows), row["image"], split, *sizes, masks=masks, labels=labels))
    if not rows:
        raise DatasetError(f"{path} lists no images")
    return categories, rows, ignored


def decode_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A Broden mask PNG as int32 label numbers (R + 256*G)."""
    try:
        with Image.open(path) as img:
            if img.size != (shape[1], shape[0]):  # before decoding: a huge PNG is refused unread
                raise DatasetError(f"mask {path} is {img.size[0]}x{img.size[1]}, index.csv says {shape[1]}x{shape[0]}")
            img.load()
            # Packed as little-endian R, G, B, X words: the label R + 256*G is the low 16 bits.
            packed = (img if img.mode == "RGB" else img.convert("RGB")).tobytes("raw", "RGBX")
    except FileNotFoundError:
        raise DatasetError(f"mask {path} is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"mask {path} cannot be decoded ({exc}); replace the file, or remove that row "
            "before registering the directory"
        ) from None
    return (np.frombuffer(packed, np.dtype("<u4")).reshape(shape) & 0xFFFF).astype(np.int32)


@dataclass
class LabelMaps:
    """An image's labels as decoded, before any per-concept mask exists: each pixel-level channel's
    label numbers and the image-level numbers. Consumers that only count pixels per concept (the IoU
    stage) read these directly; masks() builds the bool masks."""

    ids: np.ndarray  # int32 [C] every concept in the image, sorted
    channels: list[np.ndarray]  # int32 [sh, sw] per mask PNG; 0 is unlabelled
    present: list[np.ndarray]  # int32 per channel: the label numbers it holds, sorted
    whole: np.ndarray  # int32 image-level numbers (all-ones masks), sorted
    shape: tuple[int, int]

    def local(self) -> np.ndarray:
        """label number -> its row in ids, -1 for none (index 0, unlabelled, is always -1)."""
        lut = np.full(int(self.ids.max(initial=0)) + 1, -1, np.int64)
        lut[self.ids] = np.arange(len(self.ids))
        lut[0] = -1
        return lut

    def masks(self) -> np.ndarray:
        """bool [C, sh, sw]: a concept's mask is the OR over every channel it appears in; an
        image-level label's is all ones."""
        masks = np.zeros((len(self.ids), self.shape[0] * self.shape[1]), dtype=bool)
        if len(self.ids):
            row_of = dict(zip(self.ids.tolist(), range(len(self.ids))))
            for codes, numbers in zip(self.channels, self.present):
                flat = codes.ravel()
                for number in numbers.tolist():
                    masks[row_of[number]] |= flat == number
            masks[np.searchsorted(self.ids, self.whole)] = True
        return masks.reshape(len(self.ids), *self.shape)


def label_maps(
    root: Path, row: ImageRow, known: dict[int, Label] | set[int], categories: tuple[str, ...] | None = None
) -> LabelMaps:
    """Every mask PNG of ROW decoded (of CATEGORIES only, where given), with the concepts they and its
    image-level cells name; a number missing from label.csv is refused."""
    shape, resolver = (row.sh, row.sw), _Paths(root)
    chosen = row.masks if categories is None else {c: row.masks[c] for c in categories if c in row.masks}
    scalars = row.labels if categories is None else {c: row.labels[c] for c in categories if c in row.labels}
    channels = [decode_mask(dataset_file(root, rel, resolver), shape) for paths in chosen.values() for rel in paths]
    per_channel = []
    for codes in channels:
        found = np.flatnonzero(np.bincount(codes.ravel()))
        per_channel.append(found[found > 0].astype(np.int32))
    present: set[int] = set()
    for found in per_channel:
        present.update(found.tolist())
    whole = sorted({number for numbers in scalars.values() for number in numbers})
    present.update(whole)
    unknown = sorted(n for n in present if n not in known)
    if unknown:
        raise DatasetError(
            f"image {row.image} (index.csv line {row.image_id + 2}) uses label {unknown[0]} missing from label.csv"
        )
    ids = np.array(sorted(present), dtype=np.int32)
    return LabelMaps(ids, channels, per_channel, np.array(whole, dtype=np.int32), shape)


def concept_masks(root: Path, row: ImageRow, known: dict[int, Label] | set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(concept ids, bool masks [C, sh, sw]) of every concept in the image (LabelMaps.masks)."""
    maps = label_maps(root, row, known)
    return maps.ids, maps.masks()


@dataclass
class BrodenDataset:
    """The metadata of a Broden-format directory; pixel data is decoded on demand."""

    root: Path
    categories: list[str]
    labels: dict[int, Label]
    rows: list[ImageRow]
    ignored_columns: list[str] = field(default_factory=list)  # index.csv columns label.csv names no category for

    @classmethod
    def open(cls, root: str | Path) -> BrodenDataset:
        root = Path(root).expanduser().resolve()
        check_directory(root)
        labels = read_labels(root)
        categories, rows, ignored = read_index(root, label_categories(labels))
        return cls(root, categories, labels, rows, ignored)

    def image_path(self, row: ImageRow) -> Path:
        return dataset_file(self.root, row.image)

    def masks(self, row: ImageRow) -> tuple[np.ndarray, np.ndarray]:
        return concept_masks(self.root, row, self.labels)

    def label_maps(self, row: ImageRow, categories: tuple[str, ...] | None = None) -> LabelMaps:
        return label_maps(self.root, row, self.labels, categories)

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
