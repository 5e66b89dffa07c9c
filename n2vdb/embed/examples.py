"""Training examples for concept embeddings, streamed from the store and the dataset's masks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

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


ExampleSource = Callable[[], Iterable[SegExample]]


def store_examples(
    con, probe: Probe, dataset: BrodenDataset, pixel_concepts: set[int], workers: int = 0
) -> ExampleSource:
    """A re-iterable source of SegExamples: each call streams activations and masks again."""
    from n2vdb import activations as acts_store
    from n2vdb.stats.iou import iter_masks

    thresholds = acts_store.thresholds(con, probe.probe_id).view(1, -1, 1, 1)
    shape = (probe.n_filters, probe.height, probe.width)
    rows = [dataset.rows[i] for i in acts_store.stored_order(con, probe.activation_probe)]
    split_of = {r.image_id: r.split for r in rows}

    def generate() -> Iterator[SegExample]:
        masks = iter_masks(dataset, rows, workers)
        for ids, codes, scales in acts_store.iter_codes(con, probe.activation_probe, shape, batch=64):
            binary = acts_store.dequantise(codes, scales) > thresholds
            for i, image_id in enumerate(ids):
                _, concept_ids, concept_masks = next(masks)
                keep = np.array([int(c) in pixel_concepts for c in concept_ids], dtype=bool)
                yield SegExample(
                    int(image_id),
                    split_of[int(image_id)],
                    binary[i],
                    concept_ids[keep],
                    concept_masks[torch.from_numpy(keep)],
                )

    return generate


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

    def add(self, ex: SegExample) -> None:
        index = len(self._ids)
        active = np.flatnonzero(ex.binary.numpy().ravel()).astype(np.int32)
        # an image with no pixel concept has a [0, sh, sw] stack: its width must be stated, not inferred
        masks = ex.masks.numpy().reshape(len(ex.concept_ids), self.mask_shape[0] * self.mask_shape[1])
        bits = np.packbits(masks, axis=1)
        self._ids.append(ex.image_id)
        self._train.append(ex.split == "train")
        self._lengths.append(len(active))
        self._active.append(active)
        self._pair_image.append(np.full(len(ex.concept_ids), index, np.int32))
        self._pair_concept.append(np.asarray(ex.concept_ids, np.int64))
        self._bits.append(bits)
        self._pixels.append(masks.sum(1).astype(np.int64))
        self.nbytes += active.nbytes + bits.nbytes

    def finish(self, sort: bool = False) -> PairBlock:
        """Concatenate into the flat arrays training reads (call once, after the last add); SORT puts
        the images in image-id order, whatever order they were stored in."""
        if sort:
            order = np.argsort(np.asarray(self._ids, np.int64), kind="stable")
            for name in ("_ids", "_train", "_lengths", "_active", "_pair_concept", "_bits", "_pixels"):
                items = getattr(self, name)
                setattr(self, name, [items[i] for i in order])
            self._pair_image = [np.full(len(c), i, np.int32) for i, c in enumerate(self._pair_concept)]
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
        self.image_ids = np.asarray(self._ids, np.int64)
        self.is_train = np.asarray(self._train, bool)
        self.offsets = np.concatenate([[0], np.cumsum(self._lengths, dtype=np.int64)])
        self.active = cat(self._active, np.int32)
        self.pair_image = cat(self._pair_image, np.int32)
        self.pair_concept = cat(self._pair_concept, np.int64)
        row_bytes = (self.mask_shape[0] * self.mask_shape[1] + 7) // 8
        self.mask_bits = np.concatenate(self._bits) if self._bits else np.zeros((0, row_bytes), np.uint8)
        self.mask_pixels = cat(self._pixels, np.int64)
        del self._ids, self._train, self._lengths, self._active, self._pair_image, self._pair_concept
        del self._bits, self._pixels
        return self

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


def iter_blocks(examples: Iterable[SegExample], max_images: int) -> Iterator[PairBlock]:
    """Group examples into blocks of at most MAX_IMAGES images of one shape, in stream order."""
    open_blocks: dict[tuple, PairBlock] = {}
    counts: dict[tuple, int] = {}
    for ex in examples:
        key = (tuple(ex.binary.shape), tuple(ex.masks.shape[1:]))
        block = open_blocks.get(key)
        if block is None:
            block = open_blocks[key] = PairBlock(key[0], key[1])
            counts[key] = 0
        block.add(ex)
        counts[key] += 1
        if counts[key] >= max_images:
            yield open_blocks.pop(key).finish()
    for block in open_blocks.values():
        yield block.finish()


class CachedBlocks:
    """Decoded examples held in memory as pair blocks (bit-packed masks, sparse binary maps), so
    epochs neither decode masks nor re-read activations."""

    def __init__(self, blocks: list[PairBlock]) -> None:
        self.blocks = blocks
        self.nbytes = sum(b.nbytes for b in blocks)

    def __call__(self) -> Iterator[SegExample]:
        return (b.example(i) for b in self.blocks for i in range(len(b.image_ids)))


STREAM_BLOCK_IMAGES = 1024


def blocks_of(source: ExampleSource | CachedBlocks, max_images: int = STREAM_BLOCK_IMAGES) -> Iterable[PairBlock]:
    """The source's pair blocks: the cached ones, or blocks of the stream built afresh on each call."""
    if isinstance(source, CachedBlocks):
        return source.blocks
    return iter_blocks(source(), max_images)


def cached(source: ExampleSource, budget_bytes: int = 1 << 30) -> ExampleSource | CachedBlocks:
    """Keep decoded examples in memory when they fit the budget (about 1.6 KB per (image, concept)
    pair at 113 x 113 masks, plus 4 bytes per on value); otherwise stream them again on every call,
    so memory stays bounded whatever the dataset's size (training then shuffles within blocks of
    STREAM_BLOCK_IMAGES images)."""
    builders: dict[tuple, PairBlock] = {}
    total = 0
    for ex in source():
        key = (tuple(ex.binary.shape), tuple(ex.masks.shape[1:]))
        block = builders.setdefault(key, PairBlock(key[0], key[1]))
        before = block.nbytes
        block.add(ex)
        total += block.nbytes - before
        if total > budget_bytes:
            return source
    return CachedBlocks([b.finish(sort=True) for b in builders.values()])
