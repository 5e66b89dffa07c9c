"""Net2Vec segmentation embeddings (method.md section 4), all concepts trained at once.

One weight matrix W [K, C]; concept c's logit map is upsample(sum_k W[k, c] B_k + b_c). Each concept
sees only its own train images, its own alpha and its own loss: a mini-batch of images contributes,
for each concept, the loss summed over the batch images that contain that concept, divided by the
nominal batch size. Per epoch every concept therefore receives the same total gradient as the
reference code's per-concept batches of that size; only the step boundaries differ.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from n2vdb.embed.examples import ExampleSource, SegExample

LOSSES = ("paper", "loglik")


@dataclass
class SegResult:
    concept_ids: np.ndarray  # [C]
    weights: torch.Tensor  # [K, C]
    bias: torch.Tensor  # [C]
    alpha: torch.Tensor  # [C]
    train_iou: np.ndarray  # [C] set IoU (nan where the concept has no image in the split)
    val_iou: np.ndarray


def compute_alpha(source: ExampleSource, column: dict[int, int]) -> torch.Tensor:
    """alpha_c = 1 - mean over train images containing c of the fraction of pixels labelled c."""
    total = torch.zeros(len(column), dtype=torch.float64)
    count = torch.zeros(len(column), dtype=torch.float64)
    for ex in source():
        if ex.split != "train":
            continue
        for j, c in enumerate(ex.concept_ids):
            col = column.get(int(c))
            if col is not None:
                total[col] += ex.masks[j].double().mean()
                count[col] += 1
    return (1 - total / count.clamp_min(1)).float()


def concept_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor, kind: str = "paper") -> torch.Tensor:
    """Per-(image, concept) loss summed over pixels. logits, labels [..., sh, sw]; alpha broadcasts to [...]."""
    a = alpha[..., None, None]
    if kind == "paper":
        m = torch.sigmoid(logits)
        per_pixel = a * labels * m + (1 - a) * (1 - labels) * (1 - m)
    elif kind == "loglik":
        per_pixel = a * labels * F.logsigmoid(logits) + (1 - a) * (1 - labels) * F.logsigmoid(-logits)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    return -per_pixel.sum(dim=(-2, -1))


def _batch_terms(batch: Sequence[SegExample], column: dict[int, int], weights: torch.Tensor, bias: torch.Tensor):
    """Per segmentation size in the batch: (image index [P], concept columns [P], labels [P, sh, sw],
    logits [P, sh, sw]) for every (image, concept present in it) pair, and nothing else."""
    by_size: dict[tuple[int, int], list[SegExample]] = {}
    for ex in batch:
        if any(int(c) in column for c in ex.concept_ids):
            by_size.setdefault(tuple(ex.masks.shape[1:]), []).append(ex)
    for size, group in by_size.items():
        images, cols, labels = [], [], []
        for n, ex in enumerate(group):
            for j, c in enumerate(ex.concept_ids):
                col = column.get(int(c))
                if col is not None:
                    images.append(n)
                    cols.append(col)
                    labels.append(ex.masks[j])
        device = weights.device
        images_t, cols_t = torch.tensor(images, device=device), torch.tensor(cols, device=device)
        union, pair_to_union = torch.unique(cols_t, return_inverse=True)
        binary = torch.stack([ex.binary for ex in group]).to(device).float()  # [n, K, H, W]
        small = torch.einsum("nkhw,kc->nchw", binary, weights[:, union])  # [n, U, H, W], cheap at H x W
        pairs = small[images_t, pair_to_union] + bias[cols_t][:, None, None]  # [P, H, W]
        # Upsampling is linear, so logits are formed at H x W and upsampled once per (image, concept).
        logits = F.interpolate(pairs[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        yield images_t, cols_t, torch.stack(labels).to(device).float(), logits


def _epoch_order(source: ExampleSource, rng: random.Random, window: int = 512):
    """Train examples in a fresh random order: a full shuffle for cached examples, a bounded shuffle
    buffer for streamed ones (a full shuffle too when they number no more than the window)."""
    if hasattr(source, "train_order"):
        yield from source.train_order(rng)
        return
    buffer: list[SegExample] = []
    for ex in source():
        if ex.split != "train":
            continue
        buffer.append(ex)
        if len(buffer) >= window:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def train(source: ExampleSource, concept_ids: Sequence[int], n_filters: int, *, epochs: int = 30,
          lr: float = 1e-4, batch_size: int = 16, loss: str = "paper", use_bias: bool = False, seed: int = 0,
          keep: torch.Tensor | None = None, device: str | torch.device = "cpu") -> SegResult:
    """Train every concept's embedding jointly. keep [K, C] (0/1) restricts each concept to some filters.
    The weights live on DEVICE (a GPU where there is one); examples move there batch by batch."""
    concept_ids = np.asarray(concept_ids, dtype=np.int64)
    column = {int(c): j for j, c in enumerate(concept_ids)}
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(n_filters)
    init = ((torch.rand(n_filters, len(column), generator=gen) * 2 - 1) * bound).to(device)
    keep = torch.ones_like(init) if keep is None else keep.float().to(device)
    raw = (init * keep).requires_grad_()
    bias = torch.zeros(len(column), device=device, requires_grad=use_bias)
    params = [raw, bias] if use_bias else [raw]
    optimiser = torch.optim.SGD(params, lr=lr, momentum=0.9)
    alpha = compute_alpha(source, column).to(device)
    rng = random.Random(seed)
    for _ in range(epochs):
        batch: list[SegExample] = []
        for ex in _epoch_order(source, rng):
            batch.append(ex)
            if len(batch) == batch_size:
                _step(batch, column, raw * keep, bias, alpha, loss, batch_size, optimiser)
                batch = []
        if batch:
            _step(batch, column, raw * keep, bias, alpha, loss, batch_size, optimiser)
    weights = (raw * keep).detach()
    train_iou, val_iou = evaluate(source, column, weights, bias.detach())
    return SegResult(concept_ids, weights.cpu(), bias.detach().cpu().clone(), alpha.cpu(), train_iou, val_iou)


def _step(batch, column, weights, bias, alpha, loss_kind, batch_size, optimiser) -> None:
    optimiser.zero_grad()
    total = torch.zeros((), device=weights.device)
    for _, cols, labels, logits in _batch_terms(batch, column, weights, bias):
        total = total + concept_loss(logits, labels, alpha[cols], loss_kind).sum()
    if total.requires_grad:
        (total / batch_size).backward()
        optimiser.step()


@torch.no_grad()
def evaluate(source: ExampleSource, column: dict[int, int], weights: torch.Tensor, bias: torch.Tensor,
             per_image: list | None = None, device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Set IoU per concept and split of M = sigmoid(logits) > 0.5, over images containing the concept.
    per_image, if given, collects (image_id, concept_id, intersection, union) for val images."""
    c = len(column)
    inter = {s: np.zeros(c) for s in ("train", "val")}
    union = {s: np.zeros(c) for s in ("train", "val")}
    concept_of = {j: cid for cid, j in column.items()}
    if device is not None:
        weights, bias = weights.to(device), bias.to(device)
    for ex in source():
        for _, cols, labels, logits in _batch_terms([ex], column, weights, bias):
            pred = logits > 0  # sigmoid(x) > 0.5
            lab = labels > 0.5
            i = (pred & lab).flatten(1).sum(1).cpu().numpy()
            u = (pred | lab).flatten(1).sum(1).cpu().numpy()
            idx = cols.cpu().numpy()
            np.add.at(inter[ex.split], idx, i)
            np.add.at(union[ex.split], idx, u)
            if per_image is not None and ex.split == "val":
                for j, ii, uu in zip(idx, i, u):
                    per_image.append((ex.image_id, concept_of[int(j)], int(ii), int(uu)))
    iou = {s: np.where(union[s] > 0, inter[s] / np.maximum(union[s], 1), np.nan) for s in inter}
    return iou["train"], iou["val"]
