"""Net2Vec classification embeddings (method.md section 5): image-level presence from pooled activations.

All concepts train at once (W [K, C]), each as the reference trains it alone: every epoch a concept
draws its own balanced sample (all images of its minority class plus as many of the majority), takes
it in the epoch's order in batches of BATCH_SIZE, averages the loss over each batch's own count, and
steps (momentum included) only on its own batches (n2vdb.embed.batches). On the CPU an epoch is one
compiled loop, concept by concept (cls_kernel.py); elsewhere torch steps, every concept's t-th batch
at once: the same updates, since a concept's batches touch only its own row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from n2vdb.embed import cls_kernel
from n2vdb.embed.batches import RowMomentum, own_batches


@dataclass
class ClsResult:
    concept_ids: np.ndarray
    weights: torch.Tensor  # [K, C]
    bias: torch.Tensor  # [C]
    train_accuracy: np.ndarray  # balanced accuracy on a balanced train sample
    val_accuracy: np.ndarray  # on the balanced val set (drawn once)
    val_ap: np.ndarray  # average precision on the whole (unbalanced) val set
    val_scores: torch.Tensor  # [N_val, C] probabilities


CHUNK_CONCEPTS = 64  # concepts drawn at once: [64, N] keys, not [C, N] int64 tensors


def balanced_sample(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """labels [N, C] bool -> selection [N, C] bool: per concept, the minority class and an equal draw of
    the majority (the majority images with the smallest of one uniform noise draw, ties to the lower
    index as a stable sort breaks them), a chunk of concepts at a time so memory stays at the noise
    plus one chunk however many concepts there are. In numpy after the draw: some 20 small
    operations per chunk, which torch would split over its threads for no gain."""
    n, c = labels.shape
    noise = torch.rand(n, c, generator=gen).numpy()
    positive = labels.numpy()
    n_pos = positive.sum(0)
    minority = np.where(n_pos <= n - n_pos, positive, ~positive)  # [N, C]
    size = np.minimum(n_pos, n - n_pos)
    chosen = minority.copy()
    # One unique key per image in the stable sort's order: a non-negative float orders as its bit
    # pattern, then the index breaks ties. The SIZE smallest keys are the draw, so a partial sort
    # does; concepts go in order of size, so a chunk's k fits all of its concepts.
    index = np.arange(n, dtype=np.int64)
    by_size = np.argsort(size, kind="stable")
    for lo in range(0, c, CHUNK_CONCEPTS):
        cols = by_size[lo : lo + CHUNK_CONCEPTS]
        k = int(size[cols].max())
        if k == 0:
            continue
        keys = noise[:, cols].T.view(np.int32).astype(np.int64) * n + index  # [chunk, N]
        keys[minority[:, cols].T] = np.iinfo(np.int64).max
        part = np.argpartition(keys, k - 1, axis=1)[:, :k]  # the k smallest, in no order
        smallest = np.take_along_axis(part, np.take_along_axis(keys, part, 1).argsort(axis=1), 1)
        take = np.arange(k) < size[cols][:, None]
        chosen[smallest[take], np.broadcast_to(cols[:, None], smallest.shape)[take]] = True
    chosen[:, size == 0] = False  # a concept on every image or on none has no balanced sample
    return torch.from_numpy(chosen)


def uses_compiled_steps(device: torch.device) -> bool:
    """Whether training on DEVICE runs each epoch as cls_kernel's compiled CPU loop."""
    return device.type == "cpu"


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


def train(
    features: torch.Tensor,
    labels: torch.Tensor,
    is_val: torch.Tensor,
    concept_ids: Sequence[int],
    *,
    epochs: int = 30,
    lr: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    keep: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> ClsResult:
    """features [N, K] pooled activations, labels [N, C] bool, is_val [N] bool. The draws (samples,
    orders, initial weights) come from one CPU generator on any DEVICE, so a seed gives the same
    training wherever the arithmetic runs; the steps run on DEVICE."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    features = features.float()
    labels = labels.bool()
    n_filters, n_concepts = features.shape[1], labels.shape[1]
    train_x, train_y = features[~is_val], labels[~is_val]
    val_x, val_y = features[is_val], labels[is_val]
    val_selection = balanced_sample(val_y, gen)
    bound = 1 / np.sqrt(n_filters)
    weights = (torch.rand(n_filters, n_concepts, generator=gen) * 2 - 1) * bound
    if keep is not None:
        keep = keep.float()
        weights = weights * keep
    # Trained as [C, K] rows: a step reads and moves only the rows of the concepts that have a batch.
    rows_w = weights.T.contiguous().to(device)
    keep_rows = None if keep is None else keep.T.contiguous().to(device)
    bias = torch.zeros(n_concepts, device=device)
    on_device = train_x.to(device)
    sgd_w, sgd_b = RowMomentum(rows_w), RowMomentum(bias)
    step_size = max(1, epochs // 2)  # lr x 0.1 halfway, as the reference's StepLR
    targets = train_y.to(device)  # bool: a float copy of [N, C] grew with images x concepts
    for epoch in range(epochs):
        lr_now = lr * 0.1 ** (epoch // step_size)
        selection = balanced_sample(train_y, gen)
        order = torch.randperm(len(train_x), generator=gen)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        images, cols = (t.numpy() for t in torch.nonzero(selection, as_tuple=True))
        if uses_compiled_steps(device):  # the same steps, concept by concept in one compiled loop
            velocity_w, velocity_b = sgd_w.velocity, sgd_b.velocity
            cls_kernel.epoch(
                images,
                cols,
                rank.numpy(),
                on_device,
                targets,
                rows_w,
                bias,
                velocity_w,
                velocity_b,
                keep_rows,
                batch_size,
                lr_now,
                sgd_w.momentum,
            )
            continue
        for chosen, scale in own_batches(cols, rank.numpy()[images], batch_size):
            img = torch.from_numpy(images[chosen]).to(device)
            step_cols = cols[chosen]
            col = torch.from_numpy(step_cols).to(device)
            stepped, slot = (torch.from_numpy(a).to(device) for a in np.unique(step_cols, return_inverse=True))
            x = on_device.index_select(0, img)
            logits = (x * rows_w.index_select(0, col)).sum(1) + bias[col]
            # d BCE-with-logits / d logit = sigmoid(z) - y, over the batch's own count
            residual = (torch.sigmoid(logits) - targets[img, col].float()) * torch.from_numpy(scale).float().to(device)
            grad_w = torch.zeros(len(stepped), n_filters, device=device).index_add_(0, slot, x * residual[:, None])
            if keep_rows is not None:
                grad_w *= keep_rows[stepped]
            sgd_w.step(rows_w, stepped, grad_w, lr_now)
            sgd_b.step(bias, stepped, torch.zeros(len(stepped), device=device).index_add_(0, slot, residual), lr_now)
    weights = rows_w.T.contiguous().cpu()
    with torch.no_grad():
        b = bias.cpu()
        val_logits = val_x @ weights + b
        train_logits = train_x @ weights + b
        train_acc = _accuracy(train_logits, train_y, balanced_sample(train_y, gen))
        val_acc = _accuracy(val_logits, val_y, val_selection)
        probs = torch.sigmoid(val_logits)
    ap = np.array([average_precision(probs[:, j].numpy(), val_y[:, j].numpy()) for j in range(n_concepts)])
    return ClsResult(np.asarray(concept_ids), weights, b, train_acc, val_acc, ap, probs)
