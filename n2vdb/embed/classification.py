"""Net2Vec classification embeddings (method.md section 5): image-level presence from pooled activations.

All concepts train at once (W [K, C]); each epoch every concept draws its own balanced sample (all
images of its minority class plus as many of the majority), and a mini-batch contributes, per
concept, only the images of that concept's sample, scaled by the nominal batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ClsResult:
    concept_ids: np.ndarray
    weights: torch.Tensor  # [K, C]
    bias: torch.Tensor  # [C]
    train_accuracy: np.ndarray  # balanced accuracy on a balanced train sample
    val_accuracy: np.ndarray  # on the balanced val set (drawn once)
    val_ap: np.ndarray  # average precision on the whole (unbalanced) val set
    val_scores: torch.Tensor  # [N_val, C] probabilities


def balanced_sample(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """labels [N, C] bool -> selection [N, C] bool: per concept, the minority class and an equal draw of the majority."""
    n, c = labels.shape
    chosen = torch.zeros(n, c, dtype=torch.bool)
    noise = torch.rand(n, c, generator=gen)
    for j in range(c):
        pos = labels[:, j]
        n_pos = int(pos.sum())
        n_neg = n - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        minority = pos if n_pos <= n_neg else ~pos
        size = min(n_pos, n_neg)
        chosen[minority, j] = True
        majority = torch.nonzero(~minority).squeeze(1)
        pick = majority[torch.argsort(noise[majority, j])[:size]]
        chosen[pick, j] = True
    return chosen


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean of the precision at the rank of each positive (scores sorted descending)."""
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = labels[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / n_pos)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, selection: torch.Tensor) -> np.ndarray:
    correct = ((logits > 0) == labels) & selection
    n = selection.sum(0)
    return torch.where(n > 0, correct.sum(0) / n.clamp_min(1), torch.nan).numpy()


def train(features: torch.Tensor, labels: torch.Tensor, is_val: torch.Tensor, concept_ids: Sequence[int], *,
          epochs: int = 30, lr: float = 0.1, batch_size: int = 64, seed: int = 0,
          keep: torch.Tensor | None = None) -> ClsResult:
    """features [N, K] pooled activations, labels [N, C] bool, is_val [N] bool."""
    gen = torch.Generator().manual_seed(seed)
    features = features.float()
    labels = labels.bool()
    n_filters, n_concepts = features.shape[1], labels.shape[1]
    train_x, train_y = features[~is_val], labels[~is_val]
    val_x, val_y = features[is_val], labels[is_val]
    val_selection = balanced_sample(val_y, gen)
    bound = 1 / np.sqrt(n_filters)
    keep = torch.ones(n_filters, n_concepts) if keep is None else keep.float()
    raw = ((torch.rand(n_filters, n_concepts, generator=gen) * 2 - 1) * bound * keep).requires_grad_()
    bias = torch.zeros(n_concepts, requires_grad=True)
    optimiser = torch.optim.SGD([raw, bias], lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=max(1, epochs // 2), gamma=0.1)
    for _ in range(epochs):
        selection = balanced_sample(train_y, gen).float()
        order = torch.randperm(len(train_x), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            sel = selection[idx]
            if not sel.any():
                continue
            logits = train_x[idx] @ (raw * keep) + bias
            loss = F.binary_cross_entropy_with_logits(logits, train_y[idx].float(), reduction="none")
            optimiser.zero_grad()
            ((loss * sel).sum() / batch_size).backward()
            optimiser.step()
        schedule.step()
    with torch.no_grad():
        weights = (raw * keep).detach()
        b = bias.detach().clone()
        val_logits = val_x @ weights + b
        train_logits = train_x @ weights + b
        train_acc = _accuracy(train_logits, train_y, balanced_sample(train_y, gen))
        val_acc = _accuracy(val_logits, val_y, val_selection)
        probs = torch.sigmoid(val_logits)
    ap = np.array([average_precision(probs[:, j].numpy(), val_y[:, j].numpy()) for j in range(n_concepts)])
    return ClsResult(np.asarray(concept_ids), weights, b, train_acc, val_acc, ap, probs)
