"""The built-in concept set: a generated Broden-format directory a CNN can see concepts in.

Every image has a background material with a texture overlay (image-level texture label), one to
three coloured shapes (objects, with colours as pixel-level colour labels), and parts of each shape
in two overlapping channels (part_1: upper / lower half; part_2: the shape's border), plus an
image-level scene that depends on the material. Label numbers for objects and parts sit above 255,
so the R + 256*G encoding is exercised. Files are real JPEGs and PNGs, written like Broden's.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from n2vdb.errors import DatasetError

COLORS = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
MATERIALS = {"grass": (70, 120, 40), "sand": (200, 180, 130), "water": (40, 100, 160), "brick": (150, 70, 50)}
SCENES = {"grass": ("meadow",), "sand": ("beach",), "water": ("sea", "beach"), "brick": ("street",)}
TEXTURES = ("striped", "dotted", "smooth")
SHAPES = ("circle", "square", "triangle")
PARTS = ("upper", "lower", "border")


def label_table() -> list[tuple[int, str, str]]:
    """(number, name, category). Objects and parts are numbered from 300 to cross the 255 boundary."""
    labels: list[tuple[int, str, str]] = []
    number = 1
    for name in COLORS:
        labels.append((number, f"{name}-c", "color"))
        number += 1
    for name in MATERIALS:
        labels.append((number, name, "material"))
        number += 1
    for name in sorted({s for names in SCENES.values() for s in names}):
        labels.append((number, f"{name}-s", "scene"))
        number += 1
    for name in TEXTURES:
        labels.append((number, name, "texture"))
        number += 1
    number = 300
    for name in SHAPES:
        labels.append((number, name, "object"))
        number += 1
    for shape in SHAPES:
        for part in PARTS:
            labels.append((number, f"{shape}-{part}", "part"))
            number += 1
    return labels


def _shape_mask(kind: str, cx: float, cy: float, r: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    # upward triangle: apex at top, base at bottom
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] so both resolutions rasterise the same geometry."""
    ys = (np.arange(h)[:, None] + 0.5) / h
    xs = (np.arange(w)[None, :] + 0.5) / w
    return ys, xs


def _encode(labels: np.ndarray) -> Image.Image:
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return Image.fromarray(rgb)


def _write_planes(root: Path, stem: str, color, object_, material, parts) -> tuple[dict[str, str], set[int]]:
    """Save an image's label planes as Broden mask PNGs (parts in numbered channels); return the
    index.csv cells (category -> ';'-joined paths) and the label numbers present."""
    cells: dict[str, str] = {}
    present: set[int] = set()
    for category, planes in (("color", [color]), ("object", [object_]), ("material", [material]), ("part", parts)):
        paths = []
        for k, plane in enumerate(planes, start=1):
            if plane.any():
                rel = f"{stem}_{category}_{k}.png" if len(planes) > 1 else f"{stem}_{category}.png"
                _encode(plane).save(root / "images" / rel)
                paths.append(rel)
                present.update(int(n) for n in np.unique(plane[plane > 0]))
        cells[category] = ";".join(paths)
    return cells, present


def _split(name: str) -> str:
    return "train" if int(hashlib.md5(name.encode()).hexdigest(), 16) % 10 < 7 else "val"


def generate(root: str | Path, images: int = 300, size: int = 227, seed: int = 0) -> Path:
    """Write a Broden-format directory with IMAGES images of SIZE px (segmentations at SIZE // 2)."""
    root = Path(root)
    if images < 1 or size < 16:
        raise DatasetError("synth needs at least 1 image and a size of at least 16 px")
    if (root / "index.csv").exists():
        raise DatasetError(f"{root} already holds a dataset; choose an empty directory")
    (root / "images" / "synth").mkdir(parents=True, exist_ok=True)
    numbers = {name: number for number, name, _ in label_table()}
    rng = np.random.default_rng(seed)
    seg = max(1, size // 2)
    iy, ix = _grid(size, size)
    sy, sx = _grid(seg, seg)
    counts: dict[int, int] = {}
    rows = []
    for i in range(images):
        stem = f"synth/{i:06d}"
        material = list(MATERIALS)[rng.integers(len(MATERIALS))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        base = np.array(MATERIALS[material], np.float32)
        img = np.broadcast_to(base, (size, size, 3)).copy()
        img += rng.normal(0, 12, img.shape).astype(np.float32)
        if texture == "striped":
            img *= (0.75 + 0.25 * (np.sin(ix * 60 + iy * 10) > 0))[..., None]
        elif texture == "dotted":
            img *= (1 - 0.35 * ((np.sin(ix * 70) * np.sin(iy * 70)) > 0.6))[..., None]
        material_seg = np.full((seg, seg), numbers[material], np.int32)
        color_seg = np.zeros((seg, seg), np.int32)
        object_seg = np.zeros((seg, seg), np.int32)
        part1 = np.zeros((seg, seg), np.int32)
        part2 = np.zeros((seg, seg), np.int32)
        for _ in range(rng.integers(1, 4)):
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = list(COLORS)[rng.integers(len(COLORS))]
            r = rng.uniform(0.12, 0.28)
            cx, cy = rng.uniform(r, 1 - r, size=2)
            on_img = _shape_mask(shape, cx, cy, r, iy, ix)
            img[on_img] = np.array(COLORS[color], np.float32) + rng.normal(0, 8, (on_img.sum(), 3))
            on_seg = _shape_mask(shape, cx, cy, r, sy, sx)
            inner = _shape_mask(shape, cx, cy, r * 0.7, sy, sx)
            # Later shapes occlude earlier ones in every channel.
            for channel in (material_seg, color_seg, object_seg, part1, part2):
                channel[on_seg] = 0
            color_seg[on_seg] = numbers[f"{color}-c"]
            object_seg[on_seg] = numbers[shape]
            part1[on_seg & (sy < cy)] = numbers[f"{shape}-upper"]
            part1[on_seg & (sy >= cy)] = numbers[f"{shape}-lower"]
            part2[on_seg & ~inner] = numbers[f"{shape}-border"]
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"{stem}.jpg", quality=92)
        cells, present = _write_planes(root, stem, color_seg, object_seg, material_seg, (part1, part2))
        for n in present:
            counts[n] = counts.get(n, 0) + 1
        scene_numbers = [numbers[f"{s}-s"] for s in SCENES[material]]
        cells["scene"] = ";".join(str(n) for n in scene_numbers)
        cells["texture"] = str(numbers[texture])
        for n in (*scene_numbers, numbers[texture]):
            counts[n] = counts.get(n, 0) + 1
        rows.append(
            {"image": f"{stem}.jpg", "split": _split(stem), "ih": size, "iw": size, "sh": seg, "sw": seg, **cells}
        )
    _write_csvs(root, rows, counts)
    return root


def _write_csvs(root: Path, rows: list[dict], counts: dict[int, int]) -> None:
    columns = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "material", "part", "scene", "texture"]
    with (root / "index.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    _write_labels(root, label_table(), counts, ("color", "object", "material", "part", "scene", "texture"))


# -- the broden profile: Broden's shape and density ----------------------------------------------
#
# Broden (broden1_227) has six categories: 11 colours, 584 objects, 234 parts, 32 materials, 468
# scenes, 47 textures; label frequencies are long-tailed; an image carries ~30 pixel-level concepts
# (objects, their parts in two overlapping channels, materials, colours), one scene and a few
# textures. The profile reproduces those counts and densities so every stage can be measured at
# Broden's density; the pictures themselves are simple (shapes on textured regions).

BRODEN_CATEGORIES = {"color": 11, "object": 584, "part": 234, "material": 32, "scene": 468, "texture": 47}
BRODEN_COLORS = {
    "black": (20, 20, 20),
    "blue": (40, 70, 220),
    "brown": (120, 70, 30),
    "grey": (128, 128, 128),
    "green": (40, 180, 60),
    "orange": (240, 140, 20),
    "pink": (240, 150, 190),
    "purple": (120, 40, 160),
    "red": (220, 30, 30),
    "white": (245, 245, 245),
    "yellow": (235, 215, 40),
}
BRODEN_SIZE, BRODEN_SEG = 227, 113
ZIPF_EXPONENT = 1.0
PARTS_PER_OBJECT = 3  # part_1 holds the upper and lower parts, part_2 the border part


def broden_label_table() -> list[tuple[int, str, str]]:
    """(number, name, category), numbered from 1 in category order (objects and parts pass 255)."""
    labels, number = [], 1
    for category, count in BRODEN_CATEGORIES.items():
        names = list(BRODEN_COLORS) if category == "color" else [f"{category}{i:03d}" for i in range(count)]
        for name in names:
            labels.append((number, name, category))
            number += 1
    return labels


def _zipf(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** ZIPF_EXPONENT
    return p / p.sum()


class _Vocabulary:
    """Label numbers per category, their Zipf probabilities, and each object's fixed parts."""

    def __init__(self) -> None:
        table = broden_label_table()
        self.numbers = {c: np.array([n for n, _, cat in table if cat == c]) for c in BRODEN_CATEGORIES}
        self.probs = {c: _zipf(len(v)) for c, v in self.numbers.items()}
        parts_rng = np.random.default_rng(12345)
        self.parts_of = parts_rng.choice(
            self.numbers["part"], size=(len(self.numbers["object"]), PARTS_PER_OBJECT), p=self.probs["part"]
        )
        self.material_rgb = parts_rng.integers(40, 220, size=(len(self.numbers["material"]), 3))
        self.color_rgb = np.array(list(BRODEN_COLORS.values()), np.float32)

    def draw(self, rng: np.random.Generator, category: str, size: int | None = None) -> np.ndarray:
        """Indices into the category's labels, Zipf-distributed."""
        return rng.choice(len(self.numbers[category]), size=size, p=self.probs[category])


_VOCAB: _Vocabulary | None = None


def _broden_image(root: Path, index: int, seed: int) -> tuple[dict, dict[int, int]]:
    """Write image INDEX and its masks; returns its index.csv row and the labels it holds."""
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = _Vocabulary()
    vocab, size, seg = _VOCAB, BRODEN_SIZE, BRODEN_SEG
    rng = np.random.default_rng([seed, index])
    stem = f"broden/{index:06d}"
    iy, ix = _grid(size, size)
    sy, sx = _grid(seg, seg)
    # 2-4 material regions split by random lines; each region has a material and a colour.
    n_regions = int(rng.integers(2, 5))
    region_img = np.zeros((size, size), np.int32)
    region_seg = np.zeros((seg, seg), np.int32)
    for r in range(1, n_regions):
        angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3)
        nx, ny = np.cos(angle), np.sin(angle)
        region_img[(ix - 0.5) * nx + (iy - 0.5) * ny > offset] = r
        region_seg[(sx - 0.5) * nx + (sy - 0.5) * ny > offset] = r
    materials = vocab.draw(rng, "material", n_regions)
    region_colors = vocab.draw(rng, "color", n_regions)
    img = (0.5 * vocab.material_rgb[materials] + 0.5 * vocab.color_rgb[region_colors])[region_img].astype(np.float32)
    img += rng.normal(0, 10, img.shape).astype(np.float32)
    textures = vocab.draw(rng, "texture", int(rng.integers(0, 3)))
    for t in textures:
        freq = 20 + 4 * int(t % 12)
        img *= (0.8 + 0.2 * (np.sin(ix * freq + iy * (t % 5) * 7) > 0))[..., None]
    material_seg = vocab.numbers["material"][materials][region_seg]
    color_seg = vocab.numbers["color"][region_colors][region_seg]
    object_seg = np.zeros((seg, seg), np.int32)
    part1 = np.zeros((seg, seg), np.int32)
    part2 = np.zeros((seg, seg), np.int32)
    for obj in vocab.draw(rng, "object", int(rng.integers(6, 12))):
        shape = SHAPES[obj % len(SHAPES)]
        color = int(vocab.draw(rng, "color"))
        r = rng.uniform(0.08, 0.2)
        cx, cy = rng.uniform(r, 1 - r, size=2)
        on_img = _shape_mask(shape, cx, cy, r, iy, ix)
        img[on_img] = vocab.color_rgb[color] + rng.normal(0, 8, (int(on_img.sum()), 3))
        on_seg = _shape_mask(shape, cx, cy, r, sy, sx)
        inner = _shape_mask(shape, cx, cy, r * 0.7, sy, sx)
        upper, lower, border = vocab.parts_of[obj]
        material_seg[on_seg] = 0  # objects occlude the background's materials and each other
        color_seg[on_seg] = vocab.numbers["color"][color]
        object_seg[on_seg] = vocab.numbers["object"][obj]
        part1[on_seg & (sy < cy)] = upper
        part1[on_seg & (sy >= cy)] = lower
        part2[on_seg] = 0
        part2[on_seg & ~inner] = border
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"{stem}.jpg", quality=90)
    cells, present = _write_planes(root, stem, color_seg, object_seg, material_seg, (part1, part2))
    counts = dict.fromkeys(present, 1)
    scene = int(vocab.numbers["scene"][vocab.draw(rng, "scene")])
    texture_numbers = sorted({int(vocab.numbers["texture"][t]) for t in textures})
    cells["scene"] = str(scene)
    cells["texture"] = ";".join(str(n) for n in texture_numbers)
    for n in (scene, *texture_numbers):
        counts[n] = 1
    row = {"image": f"{stem}.jpg", "split": _split(stem), "ih": size, "iw": size, "sh": seg, "sw": seg, **cells}
    return row, counts


PROFILES = ("builtin", "broden")


def generate_profile(
    root: str | Path,
    profile: str = "builtin",
    images: int = 300,
    size: int = 227,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """The built-in concept set or the broden profile (227 px images, 113 px masks)."""
    if profile not in PROFILES:
        raise DatasetError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if profile == "builtin":
        return generate(root, images=images, size=size, seed=seed)
    if size != BRODEN_SIZE:
        raise DatasetError(f"the broden profile is {BRODEN_SIZE} px, as broden1_227; drop --size")
    return generate_broden(root, images=images, seed=seed, workers=workers)


def _broden_chunk(args: tuple[str, int, int, int]) -> list[tuple[dict, dict[int, int]]]:
    root, start, stop, seed = args
    return [_broden_image(Path(root), i, seed) for i in range(start, stop)]


def generate_broden(
    root: str | Path, images: int = 1000, seed: int = 0, workers: int | None = None, chunk: int = 64
) -> Path:
    """Write IMAGES images of the broden profile. Images are drawn independently (seeded by their
    index), made in chunks by worker processes and written to index.csv as they arrive, so memory
    stays flat and the output is the same for any number of workers."""
    import multiprocessing  # fork: workers need only numpy and PIL, and no __main__ guard in callers
    import os

    root = Path(root)
    if images < 1:
        raise DatasetError("synth needs at least 1 image")
    if (root / "index.csv").exists():
        raise DatasetError(f"{root} already holds a dataset; choose an empty directory")
    (root / "images" / "broden").mkdir(parents=True, exist_ok=True)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    jobs = [(str(root), s, min(s + chunk, images), seed) for s in range(0, images, chunk)]
    counts: dict[int, int] = {}
    columns = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "material", "part", "scene", "texture"]
    with (root / "index.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                results = pool.imap(_broden_chunk, jobs)
                _write_rows(writer, results, counts)
                # Workers leave on their own once the queue is closed. Leaving it to the context's
                # terminate() SIGTERMs them: one killed while holding the task queue's lock can leave
                # a worker the pool starts meanwhile waiting for it forever (a test run hung so).
                pool.close()
                pool.join()
        else:
            _write_rows(writer, map(_broden_chunk, jobs), counts)
    _write_labels(root, broden_label_table(), counts, BRODEN_CATEGORIES)
    return root


def _write_rows(writer: csv.DictWriter, results, counts: dict[int, int]) -> None:
    for part in results:
        for row, present in part:
            writer.writerow(row)
            for n in present:
                counts[n] = counts.get(n, 0) + 1


def _write_labels(root: Path, table: list[tuple[int, str, str]], counts: dict[int, int], categories) -> None:
    """label.csv and category.csv of either profile (CATEGORIES in the order category.csv lists them)."""
    with (root / "label.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        writer.writerow([0, "-", "-", 0, 0, ""])
        for number, name, category in table:
            writer.writerow([number, name, f"{category}({counts.get(number, 0)})", counts.get(number, 0), "", ""])
    with (root / "category.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "first", "last", "count", "frequency"])
        for category in categories:
            nums = [n for n, _, c in table if c == category]
            writer.writerow([category, min(nums), max(nums), len(nums), sum(counts.get(n, 0) for n in nums)])
