"""The formulas' masks, packed: a bit per pixel, 64 pixels a word, per image.

A label's mask on an image (compexp's, vision/loader/data_loader/catalog.py): every pixel of the
chosen categories' PNGs that carries the label, OR'ed over channels (a category's parts) and over
categories; an image-level label (scene, texture) covers the whole image. A unit's mask is its
activation map resized with PIL's bilinear filter, above its threshold (as --iou-mode netdissect).

Images are grouped in chunks (Chunk): the pass kernel (kernel.py) reads one chunk at a time, and a
ChunkSpill keeps the chunks on disk between the search's passes, so memory holds one chunk whatever
the number of images.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from n2vdb.data.broden import BrodenDataset, ImageRow
from n2vdb.formulas.kernel import WHOLE
from n2vdb.stats import netdissect


def words(pixels: int) -> int:
    return (pixels + 63) // 64


def pack(masks: np.ndarray, n_words: int) -> np.ndarray:
    """bool [m, ...] -> uint64 [m, N_WORDS]: pixel p of a mask is bit p % 64 of word p // 64."""
    flat = np.ascontiguousarray(masks.reshape(len(masks), int(np.prod(masks.shape[1:]))), dtype=bool)
    packed = np.packbits(flat, axis=1, bitorder="little")
    out = np.zeros((len(masks), n_words * 8), np.uint8)
    out[:, : packed.shape[1]] = packed
    return out.view("<u8")


def unpack(bits: np.ndarray, pixels: int) -> np.ndarray:
    """The inverse of pack: uint64 [m, W] -> bool [m, PIXELS]."""
    return np.unpackbits(bits.view(np.uint8), axis=1, count=pixels, bitorder="little").astype(bool)


@dataclass
class ImageMasks:
    """One image's label side: its labels (indices into the search's label list, sorted), which of
    them cover it whole, and the others' masks."""

    image_id: int
    shape: tuple[int, int]
    labels: np.ndarray  # int32 [n] sorted
    whole: np.ndarray  # bool [n]
    masks: np.ndarray  # bool [n - whole.sum(), sh, sw], the pixel labels in order


def label_masks(dataset: BrodenDataset, categories: tuple[str, ...], index_of: dict[int, int], row: ImageRow):
    """ImageMasks of ROW over CATEGORIES; INDEX_OF maps label numbers to the search's label indices."""
    maps = dataset.label_maps(row, categories)
    whole = np.isin(maps.ids, maps.whole)
    labels = np.array([index_of[n] for n in maps.ids.tolist()], dtype=np.int32)
    return ImageMasks(row.image_id, maps.shape, labels, whole, maps.masks()[~whole])


def unit_masks(values: torch.Tensor, thresholds64: torch.Tensor, shape: tuple[int, int]):
    """(units that fire, bool masks [n, sh, sw]) of one image's maps VALUES [K, H, W]. A unit whose map
    never exceeds its threshold lights no pixel: PIL's bilinear upsampling is a convex combination."""
    fired = torch.nonzero(values.flatten(1).amax(dim=1).double() > thresholds64).flatten()
    if not len(fired):
        return np.zeros(0, np.int32), np.zeros((0, *shape), bool)
    on = netdissect.unit_masks(values[fired], thresholds64[fired], shape).numpy()
    keep = on.reshape(len(on), -1).any(axis=1)
    return fired.numpy()[keep].astype(np.int32), on[keep]


@dataclass
class Chunk:
    """A chunk of images in the kernel's layout: every row of bits is W words (images narrower than
    that are padded with zero words), and VALID marks each image's own pixels."""

    image_ids: np.ndarray  # int64 [n]
    valid: np.ndarray  # uint64 [n, W]
    pres_start: np.ndarray  # int64 [n + 1]: image i's labels are pres_*[pres_start[i]:pres_start[i + 1]]
    pres_label: np.ndarray  # int32 [P] label index, sorted within an image
    pres_row: np.ndarray  # int64 [P] row of lab_bits, or WHOLE
    lab_bits: np.ndarray  # uint64 [R, W]
    unit_start: np.ndarray  # int64 [K + 1]: unit u's rows are unit_*[unit_start[u]:unit_start[u + 1]]
    unit_img: np.ndarray  # int32 [Q] image index within the chunk
    unit_bits: np.ndarray  # uint64 [Q, W]


def make_chunk(images: list[ImageMasks], units: list[tuple[np.ndarray, np.ndarray]], n_units: int) -> Chunk:
    """The Chunk of IMAGES (label sides) and their UNITS ((unit ids, masks) per image, same order)."""
    n_words = max((words(m.shape[0] * m.shape[1]) for m in images), default=1)
    valid = np.concatenate([pack(np.ones((1, m.shape[0] * m.shape[1]), bool), n_words) for m in images])
    sizes = np.array([len(m.labels) for m in images], dtype=np.int64)
    pres_start = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    pres_label = np.concatenate([m.labels for m in images] + [np.zeros(0, np.int32)]).astype(np.int32)
    pres_row = np.full(len(pres_label), WHOLE, np.int64)
    bits, at = [], 0
    for i, m in enumerate(images):
        pixel_rows = np.flatnonzero(~m.whole) + pres_start[i]
        pres_row[pixel_rows] = np.arange(at, at + len(pixel_rows))
        at += len(pixel_rows)
        bits.append(pack(m.masks, n_words))
    unit_of = np.concatenate([u for u, _ in units] + [np.zeros(0, np.int32)]).astype(np.int64)
    unit_img = np.concatenate(
        [np.full(len(u), i, np.int32) for i, (u, _) in enumerate(units)] + [np.zeros(0, np.int32)]
    )
    unit_bits = np.concatenate([pack(m, n_words) for _, m in units] + [np.zeros((0, n_words), np.uint64)])
    order = np.argsort(unit_of, kind="stable")  # by unit, images in order within a unit
    return Chunk(
        np.array([m.image_id for m in images], dtype=np.int64),
        valid,
        pres_start,
        pres_label,
        pres_row,
        np.concatenate(bits + [np.zeros((0, n_words), np.uint64)]),
        np.searchsorted(unit_of[order], np.arange(n_units + 1)).astype(np.int64),
        unit_img[order],
        np.ascontiguousarray(unit_bits[order]),
    )


class ChunkSpill:
    """Chunks in a temporary file, read back one at a time by each pass of the search."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="n2vdb-formulas-")
        self.chunks = 0

    def add(self, chunk: Chunk) -> None:
        for f in fields(Chunk):
            np.save(self.file, getattr(chunk, f.name), allow_pickle=False)
        self.chunks += 1

    def __iter__(self) -> Iterator[Chunk]:
        self.file.seek(0)
        for _ in range(self.chunks):
            yield Chunk(*(np.load(self.file, allow_pickle=False) for _ in fields(Chunk)))

    def close(self) -> None:
        self.file.close()
