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
    stored = acts_store.stored_image_ids(con, probe.activation_probe)
    rows = [r for r in dataset.rows if r.image_id in stored]
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


def cached(source: ExampleSource, budget_bytes: int = 2 << 30) -> ExampleSource:
    """Keep decoded examples in memory when they fit the budget (epochs then skip decoding);
    otherwise stream them again on every call, so memory never grows with the dataset."""
    kept: list[SegExample] = []
    used = 0
    for example in source():
        used += example.binary.numel() + example.masks.numel()
        if used > budget_bytes:
            return source
        kept.append(example)
    return lambda: kept
