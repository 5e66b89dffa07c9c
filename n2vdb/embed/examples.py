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


def store_examples(con, probe: Probe, dataset: BrodenDataset, pixel_concepts: set[int],
                   workers: int = 0) -> ExampleSource:
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
            binary = torch.from_numpy(codes).float() * torch.from_numpy(scales)[:, :, None, None] > thresholds
            for i, image_id in enumerate(ids):
                _, concept_ids, concept_masks = next(masks)
                keep = np.array([int(c) in pixel_concepts for c in concept_ids], dtype=bool)
                yield SegExample(int(image_id), split_of[int(image_id)], binary[i],
                                 concept_ids[keep], concept_masks[torch.from_numpy(keep)])

    return generate


class PackedExamples:
    """Decoded examples held in memory at one bit per binary-map value and mask pixel (8x smaller
    than bool tensors), unpacked one at a time as training reaches them."""

    def __init__(self) -> None:
        self.items: list[tuple] = []
        self.nbytes = 0

    def add(self, ex: SegExample) -> None:
        binary = np.packbits(ex.binary.numpy().ravel())
        masks = np.packbits(ex.masks.numpy().ravel())
        self.items.append((ex.image_id, ex.split, binary, tuple(ex.binary.shape), ex.concept_ids, masks,
                           tuple(ex.masks.shape)))
        self.nbytes += binary.nbytes + masks.nbytes

    def _unpack(self, index: int) -> SegExample:
        image_id, split, binary, binary_shape, concept_ids, masks, mask_shape = self.items[index]
        unpack = lambda bits, shape: torch.from_numpy(  # noqa: E731
            np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape))
        return SegExample(image_id, split, unpack(binary, binary_shape), concept_ids, unpack(masks, mask_shape))

    def __call__(self) -> Iterator[SegExample]:
        return (self._unpack(i) for i in range(len(self.items)))

    def train_order(self, rng) -> Iterator[SegExample]:
        """The train examples in a fresh random order."""
        chosen = [i for i, item in enumerate(self.items) if item[1] == "train"]
        rng.shuffle(chosen)
        return (self._unpack(i) for i in chosen)


def cached(source: ExampleSource, budget_bytes: int = 1 << 30) -> ExampleSource:
    """Keep decoded examples in memory, bit-packed, when they fit the budget (epochs then skip
    decoding: about 10 KB per AlexNet conv5 image); otherwise stream them again on every call, so
    memory stays bounded whatever the dataset's size."""
    kept = PackedExamples()
    for example in source():
        kept.add(example)
        if kept.nbytes > budget_bytes:
            return source
    kept.items.sort(key=lambda item: item[0])  # image order, whatever order they were stored in
    return kept
