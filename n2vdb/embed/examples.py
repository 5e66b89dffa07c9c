"""Training examples for concept embeddings, streamed from the store and the dataset's masks."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from n2vdb.data.broden import BrodenDataset
from n2vdb.probe import Probe


@dataclass
class SegExample:
    image_id: int
    split: str
    binary: torch.Tensor  # bool [K, H, W]: activation > threshold
    concept_ids: np.ndarray  # [C] pixel-level concepts in the image
    masks: torch.Tensor  # bool [C, sh, sw]


class PackedExample(NamedTuple):
    """An example in the form a PairBlock keeps it, which is how the store streams them: decoded
    masks cross from the workers packed and stay packed."""

    image_id: int
    split: str
    map_shape: tuple[int, int, int]
    active: np.ndarray  # int32 flat indices (k * H * W + position) of the binary map's on values
    concept_ids: np.ndarray  # [C]
    bits: np.ndarray  # uint8 [C, bytes]: each mask flattened and np.packbits-ed
    mask_shape: tuple[int, int]


def packed(ex: SegExample | PackedExample) -> PackedExample:
    """EX as a PackedExample (as it is, if it is one)."""
    if isinstance(ex, PackedExample):
        return ex
    k, h, w = ex.binary.shape
    sh, sw = ex.masks.shape[1:]
    # an image with no pixel concept has a [0, sh, sw] stack: its width must be stated, not inferred
    masks = ex.masks.numpy().reshape(len(ex.concept_ids), sh * sw)
    active = np.flatnonzero(ex.binary.numpy().ravel()).astype(np.int32)
    return PackedExample(ex.image_id, ex.split, (k, h, w), active, ex.concept_ids, np.packbits(masks, axis=1), (sh, sw))


ExampleSource = Callable[[], Iterable[SegExample | PackedExample]]


def store_examples(
    con, probe: Probe, dataset: BrodenDataset, pixel_concepts: set[int], workers: int = 0
) -> ExampleSource:
    """A re-iterable source of PackedExamples: each call streams activations and masks again."""
    from n2vdb import activations as acts_store
    from n2vdb.data import pool
    from n2vdb.stats.thresholds import code_cutoffs

    thresholds = acts_store.thresholds(con, probe.probe_id)
    shape = (probe.n_filters, probe.height, probe.width)
    rows = [dataset.rows[i] for i in acts_store.stored_order(con, probe.activation_probe)]
    split_of = {r.image_id: r.split for r in rows}
    decode = partial(_packed_masks, dataset, np.array(sorted(pixel_concepts), np.int64))

    def on_values(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """bool [n, K, H, W]: activation > threshold, compared on the codes where that is exact."""
        cutoffs = code_cutoffs(torch.from_numpy(scales), thresholds)
        if cutoffs is None:
            return (acts_store.dequantise(codes, scales) > thresholds.view(1, -1, 1, 1)).numpy()
        return codes >= cutoffs.numpy().astype(np.int16)[:, :, None, None]

    def generate() -> Iterator[PackedExample]:
        masks = pool.decoded(decode, rows, workers)
        for ids, codes, scales in acts_store.iter_codes(con, probe.activation_probe, shape, batch=64):
            binary = on_values(codes, scales)
            for i, image_id in enumerate(ids):
                _, concept_ids, bits, mask_shape = next(masks)
                active = np.flatnonzero(binary[i]).astype(np.int32)
                yield PackedExample(
                    int(image_id), split_of[int(image_id)], shape, active, concept_ids, bits, tuple(mask_shape)
                )

    return generate


def _packed_masks(dataset: BrodenDataset, pixel_concepts: np.ndarray, row):
    """(image_id, pixel-level concept ids, their masks as packed bits [C, bytes], mask shape) of one
    row. Packed in the worker: its results cross a pipe, and packed masks are an eighth the bytes."""
    ids, masks = dataset.masks(row)
    keep = np.isin(ids, pixel_concepts)
    flat = masks[keep].reshape(int(keep.sum()), masks.shape[1] * masks.shape[2])
    return row.image_id, ids[keep], np.packbits(flat, axis=1), masks.shape[1:]


class PairBlock:
    """A block of images held as flat arrays for training: each image's binary map as the flat
    indices (k * H * W + position) of its on values (they are sparse: a filter is on at about 0.5% of
    positions at the default quantile), and one row of packed mask bits per (image, concept) pair.
    All images of a block share the map shape (K, H, W) and the segmentation shape (sh, sw)."""

    def __init__(self, map_shape: tuple[int, int, int], mask_shape: tuple[int, int]) -> None:
        self.map_shape, self.mask_shape = map_shape, mask_shape
        self._ids, self._train, self._lengths, self._active = [], [], [], []
        self._pair_image, self._pair_concept, self._bits, self._pixels = [], [], [], []
        self.nbytes = 0

    def add(self, ex: SegExample | PackedExample) -> None:
        index = len(self._ids)
        ex = packed(ex)
        active, bits = ex.active, ex.bits
        self._ids.append(ex.image_id)
        self._train.append(ex.split == "train")
        self._lengths.append(len(active))
        self._active.append(active)
        self._pair_image.append(np.full(len(ex.concept_ids), index, np.int32))
        self._pair_concept.append(np.asarray(ex.concept_ids, np.int64))
        self._bits.append(bits)
        self._pixels.append(np.bitwise_count(bits).sum(1, dtype=np.int64))
        self.nbytes += active.nbytes + bits.nbytes

    def finish(self, sort: bool = False) -> PairBlock:
        """Concatenate into the flat arrays training reads (call once, after the last add); SORT puts
        the images in image-id order, whatever order they were stored in."""
        for name, (parts, empty) in self.parts(sort).items():
            setattr(self, name, np.concatenate(parts) if parts else empty)
        del self._ids, self._train, self._lengths, self._active, self._pair_image, self._pair_concept
        del self._bits, self._pixels
        return self

    def parts(self, sort: bool = False) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
        """Each of _BLOCK_ARRAYS as (the parts that concatenate to it, the array when there are none),
        in image-id order if SORT: what finish joins, and what a block spilled unfinished writes
        one part after another (no joined copy beside its parts)."""
        if sort:
            order = np.argsort(np.asarray(self._ids, np.int64), kind="stable")
            for name in ("_ids", "_train", "_lengths", "_active", "_pair_concept", "_bits", "_pixels"):
                items = getattr(self, name)
                setattr(self, name, [items[i] for i in order])
            self._pair_image = [np.full(len(c), i, np.int32) for i, c in enumerate(self._pair_concept)]
        row_bytes = (self.mask_shape[0] * self.mask_shape[1] + 7) // 8
        return {
            "image_ids": ([np.asarray(self._ids, np.int64)], None),
            "is_train": ([np.asarray(self._train, bool)], None),
            "offsets": ([np.concatenate([[0], np.cumsum(self._lengths, dtype=np.int64)])], None),
            "active": (self._active, np.zeros(0, np.int32)),
            "pair_image": (self._pair_image, np.zeros(0, np.int32)),
            "pair_concept": (self._pair_concept, np.zeros(0, np.int64)),
            "mask_bits": (self._bits, np.zeros((0, row_bytes), np.uint8)),
            "mask_pixels": (self._pixels, np.zeros(0, np.int64)),
        }

    def labels(self, pairs: np.ndarray) -> torch.Tensor:
        """bool [P, sh, sw] masks of the given pairs."""
        sh, sw = self.mask_shape
        bits = np.unpackbits(self.mask_bits[pairs], axis=1, count=sh * sw)
        return torch.from_numpy(bits).view(torch.bool).view(len(pairs), sh, sw)

    def example(self, index: int) -> SegExample:
        """Image INDEX of the block as a SegExample again."""
        k, h, w = self.map_shape
        binary = np.zeros(k * h * w, bool)
        binary[self.active[self.offsets[index] : self.offsets[index + 1]]] = True
        pairs = np.flatnonzero(self.pair_image == index)
        return SegExample(
            int(self.image_ids[index]),
            "train" if self.is_train[index] else "val",
            torch.from_numpy(binary.reshape(k, h, w)),
            self.pair_concept[pairs],
            self.labels(pairs),
        )


def iter_blocks(
    examples: Iterable[SegExample | PackedExample], max_images: int, sort: bool = False
) -> Iterator[PairBlock]:
    """Group examples into blocks of at most MAX_IMAGES images of one shape, in stream order (SORT:
    each block in image-id order)."""
    return (block.finish(sort) for block in _open_blocks(examples, max_images))


def _open_blocks(examples: Iterable[SegExample | PackedExample], max_images: int) -> Iterator[PairBlock]:
    """iter_blocks' blocks, not yet finished."""
    open_blocks: dict[tuple, PairBlock] = {}
    counts: dict[tuple, int] = {}
    for ex in examples:
        ex = packed(ex)
        key = (tuple(ex.map_shape), tuple(ex.mask_shape))
        block = open_blocks.get(key)
        if block is None:
            block = open_blocks[key] = PairBlock(key[0], key[1])
            counts[key] = 0
        block.add(ex)
        counts[key] += 1
        if counts[key] >= max_images:
            yield open_blocks.pop(key)
    yield from open_blocks.values()


# The arrays a finished PairBlock trains from, in the order a spilled block stores them.
_BLOCK_ARRAYS = ("image_ids", "is_train", "offsets", "active", "pair_image", "pair_concept", "mask_bits", "mask_pixels")


class _SpilledBlock:
    """Where a block's arrays lie in the spill file: (name, dtype, shape, offset) each."""

    def __init__(self, block: PairBlock, file, parts: dict[str, tuple[list[np.ndarray], np.ndarray]]) -> None:
        """Write BLOCK's arrays, given as PARTS (PairBlock.parts, or a finished block's own arrays)."""
        self.map_shape, self.mask_shape, self.nbytes = block.map_shape, block.mask_shape, block.nbytes
        self.layout = []
        for name in _BLOCK_ARRAYS:
            pieces, empty = parts[name]
            first = pieces[0] if pieces else empty
            shape = (sum(len(p) for p in pieces), *first.shape[1:])
            self.layout.append((name, first.dtype, shape, file.tell()))
            for piece in pieces:
                file.write(np.ascontiguousarray(piece, first.dtype).data)
        self.n_images = self.layout[0][2][0]

    @classmethod
    def finished(cls, block: PairBlock, file) -> _SpilledBlock:
        return cls(block, file, {name: ([getattr(block, name)], None) for name in _BLOCK_ARRAYS})

    def load(self, file) -> PairBlock:
        block = PairBlock.__new__(PairBlock)
        block.map_shape, block.mask_shape, block.nbytes = self.map_shape, self.mask_shape, self.nbytes
        for name, dtype, shape, offset in self.layout:
            array = np.empty(shape, dtype)  # read into place: no second copy of a large block
            if array.nbytes:
                file.seek(offset)
                if file.readinto(memoryview(array).cast("B")) != array.nbytes:
                    raise OSError("the example cache's spill file is shorter than what was written to it")
            setattr(block, name, array)
        return block


class CachedBlocks:
    """Decoded examples as pair blocks (bit-packed masks, sparse binary maps), decoded once, so epochs
    neither decode masks nor re-read activations: all held in memory when they fit the budget, else
    all spilled to an anonymous temporary file (gone when it is closed or the process ends, by any
    signal) and read back one block at a time on each pass."""

    def __init__(self, blocks: list[PairBlock | _SpilledBlock], spill=None) -> None:
        self._blocks, self._spill = blocks, spill
        self.nbytes = sum(b.nbytes for b in blocks)
        self.spilled_bytes = sum(b.nbytes for b in blocks if isinstance(b, _SpilledBlock))

    @property
    def blocks(self) -> Iterator[PairBlock]:
        """The blocks in order. A spilled one is loaded when it is reached and its arrays are let go
        when the next is asked for (before that one is read), so one is in memory at a time, however
        long the caller's loop variable holds it: a spilled block is good until the next is reached."""
        for block in self._blocks:
            if not isinstance(block, _SpilledBlock):
                yield block
                continue
            loaded = block.load(self._spill)
            yield loaded
            for name in _BLOCK_ARRAYS:
                delattr(loaded, name)

    def __call__(self) -> Iterator[SegExample]:
        return (b.example(i) for b in self.blocks for i in range(len(b.image_ids)))

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None


STREAM_BLOCK_IMAGES = 1024
# One block of Broden-density images is ~50 MB. A dataset whose blocks do not all fit is spilled
# whole: keeping the first blocks in memory beside the one read back made peak RSS grow with the
# dataset until the budget was full (measured: +115 MB from 1,000 to 4,000 images at 256MB; spilled
# blocks come back from the page cache each epoch).
CACHE_MEMORY_DEFAULT = "64MB"


def blocks_of(source: ExampleSource | CachedBlocks, max_images: int = STREAM_BLOCK_IMAGES) -> Iterable[PairBlock]:
    """The source's pair blocks: the cached ones, or blocks of the stream built afresh on each call."""
    if isinstance(source, CachedBlocks):
        return source.blocks
    return iter_blocks(source(), max_images)


def cache_budget() -> int:
    """Bytes of decoded examples kept in memory: N2VDB_CACHE_MEMORY (e.g. 256MB, 1GB, 0), default 64MB."""
    from n2vdb.errors import N2vdbError

    text = os.environ.get("N2VDB_CACHE_MEMORY", CACHE_MEMORY_DEFAULT).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?i?B?)", text, re.IGNORECASE)
    if not match:
        raise N2vdbError(f"N2VDB_CACHE_MEMORY={text!r} is not a size: give one like 256MB, 1GB or 0")
    unit = match[2].upper().replace("I", "").rstrip("B")
    return int(float(match[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def cached(
    source: ExampleSource, budget_bytes: int | None = None, max_images: int = STREAM_BLOCK_IMAGES
) -> CachedBlocks:
    """Decode the source once into blocks of at most MAX_IMAGES images (in stream order, each sorted
    by image id), all kept in memory if they fit BUDGET_BYTES (default: cache_budget(); about 1.6 KB
    per (image, concept) pair at 113 x 113 masks, plus 4 bytes per on value), else all spilled to a
    temporary file (in TMPDIR) that every pass reads back block by block. The blocks are the same
    whatever the budget, so training is too; memory holds the budget or one block, the larger."""
    budget = cache_budget() if budget_bytes is None else budget_bytes
    blocks: list[PairBlock | _SpilledBlock] = []
    spill = None
    in_memory = 0
    try:
        for block in _open_blocks(source(), max_images):
            if spill is None and in_memory + block.nbytes <= budget:
                blocks.append(block.finish(sort=True))
                in_memory += block.nbytes
                continue
            if spill is None:  # the blocks kept so far go to the file too
                spill = tempfile.TemporaryFile(prefix="n2vdb-cache-")
                blocks = [_SpilledBlock.finished(b, spill) for b in blocks]
            blocks.append(_SpilledBlock(block, spill, block.parts(sort=True)))
            del block  # its parts: the next block is decoded without them
        if spill is not None:
            spill.flush()
    except BaseException:
        if spill is not None:
            spill.close()
        raise
    return CachedBlocks(blocks, spill)
