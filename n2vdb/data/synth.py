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
    "red": (220, 30, 30), "green": (40, 180, 60), "blue": (40, 70, 220),
    "yellow": (235, 215, 40), "white": (245, 245, 245), "black": (20, 20, 20),
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
        labels.append((number, f"{name}-c", "color")); number += 1
    for name in MATERIALS:
        labels.append((number, name, "material")); number += 1
    for name in sorted({s for names in SCENES.values() for s in names}):
        labels.append((number, f"{name}-s", "scene")); number += 1
    for name in TEXTURES:
        labels.append((number, name, "texture")); number += 1
    number = 300
    for name in SHAPES:
        labels.append((number, name, "object")); number += 1
    for shape in SHAPES:
        for part in PARTS:
            labels.append((number, f"{shape}-{part}", "part")); number += 1
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
        cells: dict[str, str] = {}
        for category, planes in (
            ("color", [color_seg]), ("object", [object_seg]), ("material", [material_seg]),
            ("part", [part1, part2]),
        ):
            paths = []
            for k, plane in enumerate(planes, start=1):
                if plane.any():
                    suffix = f"{category}_{k}" if len(planes) > 1 else category
                    rel = f"{stem}_{suffix}.png"
                    _encode(plane).save(root / "images" / rel)
                    paths.append(rel)
                    for n in np.unique(plane[plane > 0]):
                        counts[int(n)] = counts.get(int(n), 0) + 1
            cells[category] = ";".join(paths)
        scene_numbers = [numbers[f"{s}-s"] for s in SCENES[material]]
        cells["scene"] = ";".join(str(n) for n in scene_numbers)
        cells["texture"] = str(numbers[texture])
        for n in (*scene_numbers, numbers[texture]):
            counts[n] = counts.get(n, 0) + 1
        rows.append({"image": f"{stem}.jpg", "split": _split(stem), "ih": size, "iw": size, "sh": seg, "sw": seg,
                     **cells})
    _write_csvs(root, rows, counts)
    return root


def _write_csvs(root: Path, rows: list[dict], counts: dict[int, int]) -> None:
    columns = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "material", "part", "scene", "texture"]
    with (root / "index.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    table = label_table()
    with (root / "label.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        writer.writerow([0, "-", "-", 0, 0, ""])
        for number, name, category in table:
            writer.writerow([number, name, f"{category}({counts.get(number, 0)})", counts.get(number, 0), "", ""])
    with (root / "category.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "first", "last", "count", "frequency"])
        for category in ("color", "object", "material", "part", "scene", "texture"):
            nums = [n for n, _, c in table if c == category]
            writer.writerow([category, min(nums), max(nums), len(nums), sum(counts.get(n, 0) for n in nums)])
