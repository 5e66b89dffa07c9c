"""Net2Vec segmentation embeddings (method.md section 4), all concepts trained at once.

One weight matrix W [K, C]; concept c's logit map is upsample(sum_k W[k, c] B_k + b_c). Training is
the reference's, concept by concept: each epoch draws one order of the train images; concept c takes
its own images in that order in batches of BATCH_SIZE (the last one smaller), its loss summed over a
batch's pixels and divided by that batch's own count, and SGD with momentum steps c only on its own
batches. Step t of the joint trainer is every concept's t-th batch at once, so each concept gets
exactly the updates training it alone would give (tests/test_embed.py checks this for a rare and a
frequent concept).

The arithmetic is arranged for speed, not changed:
- binary maps are sparse (a filter is on at ~0.5% of positions), so the H x W logits of a pair are a
  scatter of its concept's weights over the image's on values, and the gradient a gather back; the
  weights are held as concept rows [C, K], so both stay in one row;
- bilinear upsampling (align_corners=True) is linear and separable: up = A_h X A_w^T with fixed
  [sh, H] and [sw, W] matrices, and its backward is A_h^T G A_w;
- the loss's gradient with respect to the upsampled logits is written out (one sigmoid per pixel),
  so nothing per pixel is kept for autograd.
On the CPU, everything per pair is one compiled loop (pixel_kernel.py: the two-tap upsampling, the
sigmoid and the loss's derivative row by row in cache, and the adjoints), a whole step per call
(it unpacks each pair's mask bits itself, so nothing per pixel is held), with disjoint concepts in
threads. On other devices the same arithmetic is torch
passes over chunks of CHUNK_PAIRS in two reused [P, sh, sw] buffers: the two products, the sigmoid,
a per-label coefficient and aten's fused sigmoid_backward. Those five passes were 86% of CPU
training; the compiled loop does the work in about a fifth of their time. Measured and rejected
for the torch passes: torch.compile (5-10 s to compile, slower than the products on the CPU), a
lookup table for the coefficient (3%), chunk sizes 32-256 (within 5% above 64).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from n2vdb.embed import pixel_kernel
from n2vdb.embed.batches import RowMomentum, own_batches
from n2vdb.embed.examples import CachedBlocks, ExampleSource, PairBlock, blocks_of

LOSSES = ("paper", "loglik")
_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], np.uint8)
CHUNK_PAIRS = 128  # (image, concept) pairs per pass: 128 x 113 x 113 floats = 6.5 MB


@dataclass
class SegResult:
    concept_ids: np.ndarray  # [C]
    weights: torch.Tensor  # [K, C]
    bias: torch.Tensor  # [C]
    alpha: torch.Tensor  # [C]
    train_iou: np.ndarray  # [C] set IoU (nan where the concept has no image in the split)
    val_iou: np.ndarray
    images: int = 0  # images in the source
    train_pairs: int = 0  # train (image, concept) pairs of the trained concepts: one epoch's


def compute_alpha(source: ExampleSource | CachedBlocks, column: dict[int, int]) -> torch.Tensor:
    """alpha_c = 1 - mean over train images containing c of the fraction of pixels labelled c."""
    total = np.zeros(len(column))
    count = np.zeros(len(column))
    for block in blocks_of(source):
        pairs, cols = _pairs_in(block, column, train_only=True)
        sh, sw = block.mask_shape
        np.add.at(total, cols, block.mask_pixels[pairs] / (sh * sw))
        np.add.at(count, cols, 1)
    return torch.from_numpy(1 - total / np.maximum(count, 1)).float()


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


def loss_gradient(
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: torch.Tensor,
    scale: torch.Tensor,
    kind: str,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """d (scale_p * concept_loss_p) / d logits, computed in place of LOGITS [P, sh, sw] (which it
    overwrites; labels bool [P, sh, sw]; alpha, scale [P]; WORKSPACE, if given, a float buffer of
    LOGITS' shape it may use). With s = sigmoid(z):
    paper: L = -[a y s + (1-a)(1-y)(1-s)], so dL/dz = s (1-s) (y ? -a : 1-a);
    loglik: L = -[a y log s + (1-a)(1-y) log(1-s)], so dL/dz = y ? a (s-1) : (1-a) s.
    Three passes over the pixels: the sigmoid, the per-label coefficient, and one fused product
    (aten's sigmoid_backward is g s (1-s) in one pass)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    a, k = alpha[:, None, None], scale[:, None, None]
    s = logits.sigmoid_()
    coef = torch.empty_like(s) if workspace is None else workspace
    if kind == "paper":
        torch.where(labels, -a * k, (1 - a) * k, out=coef)
        return torch.ops.aten.sigmoid_backward.grad_input(coef, s, grad_input=s)
    s.mul_(torch.where(labels, a * k, (1 - a) * k, out=coef))
    return s.sub_(torch.where(labels, a * k, torch.zeros_like(a), out=coef))


def uses_pixel_kernel(device: torch.device) -> bool:
    """Whether training on DEVICE runs the per-pixel work as pixel_kernel's compiled CPU loop."""
    return device.type == "cpu"


def upsample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: 1-D bilinear interpolation with align_corners=True, read off torch's own."""
    eye = torch.eye(n_in, dtype=torch.float64)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=True)[0].T.float().contiguous()


class _Geometry:
    """The fixed maps of one block shape, on the training device, and two [CHUNK_PAIRS, sh, sw]
    buffers every chunk reuses (fresh multi-megabyte tensors per chunk cost page faults)."""

    def __init__(self, block: PairBlock, device: torch.device) -> None:
        k, h, w = block.map_shape
        self.k, self.hw = k, h * w
        self.h, self.w = h, w
        self.mask_shape = block.mask_shape
        self.a_h = upsample_matrix(h, block.mask_shape[0]).to(device)
        self.a_w = upsample_matrix(w, block.mask_shape[1]).to(device)
        self.device = device
        # On the CPU the per-pixel work is one compiled loop (pixel_kernel); elsewhere torch's passes.
        self.fused = uses_pixel_kernel(device)
        # The compiled loop keeps nothing per pixel, so it takes a step's pairs in one call.
        self.chunk_pairs = sys.maxsize if self.fused else CHUNK_PAIRS
        self.rows = pixel_kernel.taps(self.a_h) if self.fused else None
        self.columns = pixel_kernel.taps(self.a_w) if self.fused else None
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._on_values_of: PairBlock | None = None

    def on_values(self, block: PairBlock) -> tuple[np.ndarray, np.ndarray]:
        """pixel_kernel.split_on_values of BLOCK, kept while the trainer is on that block."""
        if self._on_values_of is not block:
            self._on_values_of, self._on_values = block, pixel_kernel.split_on_values(block, self.hw)
        return self._on_values

    def buffers(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two float [P, sh, sw] work buffers, overwritten by the next chunk."""
        if self._buffers is None or len(self._buffers[0]) < p:
            n = max(p, CHUNK_PAIRS)
            self._buffers = tuple(torch.empty(n, *self.mask_shape, device=self.device) for _ in range(2))
        return self._buffers[0][:p], self._buffers[1][:p]

    def up(self, small: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[P, H, W] -> [P, sh, sw] (into OUT if given): A_h X A_w^T as one flat product and one
        batched one (a broadcast matmul of small matrices is an order of magnitude slower on the CPU)."""
        p = small.shape[0]
        along_w = (small.reshape(p * self.h, self.w) @ self.a_w.T).view(p, self.h, -1)
        return torch.bmm(self.a_h.expand(p, -1, -1), along_w, out=out)

    def down(self, grad: torch.Tensor) -> torch.Tensor:
        """The adjoint: [P, sh, sw] -> [P, H, W], A_h^T G A_w."""
        p = grad.shape[0]
        along_h = torch.bmm(self.a_h.T.expand(p, -1, -1), grad)  # [P, H, sw]
        return (along_h.reshape(p * self.h, -1) @ self.a_w).view(p, self.h, self.w)


def _pairs_in(block: PairBlock, column: dict[int, int], train_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """(pair indices, their columns) of the block's pairs whose concept is being trained."""
    ids = np.fromiter(column, np.int64, len(column))
    cols = np.fromiter(column.values(), np.int64, len(column))
    order = np.argsort(ids)
    ids, cols = ids[order], cols[order]
    at = np.searchsorted(ids, block.pair_concept).clip(0, max(len(ids) - 1, 0))
    known = (ids[at] == block.pair_concept) if len(ids) else np.zeros(len(block.pair_concept), bool)
    if train_only:
        known &= block.is_train[block.pair_image]
    pairs = np.flatnonzero(known)
    return pairs, cols[at[pairs]]


def _entries(block: PairBlock, pairs: np.ndarray, cols: np.ndarray, geo: _Geometry):
    """For every on value of every pair's image, two flat indices (device tensors): into the chunk's
    [P * H * W] small logits (slot * H * W + position) and into the weight rows [C, K] (column * K +
    filter). The
    forward scatters W's entries by them and the backward gathers back, so they are computed once."""
    images = block.pair_image[pairs]
    starts, stops = block.offsets[images], block.offsets[images + 1]
    lengths = stops - starts
    slot = np.repeat(np.arange(len(pairs)), lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    filt, pos = np.divmod(block.active[np.repeat(starts, lengths) + within].astype(np.int64), geo.hw)
    small_at = torch.from_numpy(slot * geo.hw + pos).to(geo.device)
    weight_at = torch.from_numpy(cols[slot] * geo.k + filt).to(geo.device)
    return small_at, weight_at


def _small_logits(block, pairs, cols, weights, bias, geo):
    """Logits [P, H, W] of the pairs before upsampling (WEIGHTS: rows [C, K]), and the entries their
    backward needs."""
    small_at, weight_at = _entries(block, pairs, cols, geo)
    small = torch.zeros(len(pairs) * geo.hw, device=geo.device)
    small.index_add_(0, small_at, weights.view(-1).index_select(0, weight_at))
    cols_t = torch.from_numpy(cols).to(geo.device)
    small = small.view(len(pairs), geo.h, geo.w) + bias[cols_t][:, None, None]
    return small, (small_at, weight_at, cols_t)


def _upsampled_logits(block, pairs, cols, weights, bias, geo):
    """Logits [P, sh, sw] of the pairs (in GEO's buffer, overwritten by the next chunk), and the
    entries their backward needs."""
    small, entries = _small_logits(block, pairs, cols, weights, bias, geo)
    return geo.up(small, out=geo.buffers(len(pairs))[0]), entries


def _accumulate(block, pairs, cols, weights, bias, alpha, scale, loss_kind, geo, grad_w, grad_b=None):
    """Add the gradient of sum_p scale_p * loss_p over PAIRS to grad_w and grad_b [C] (if given).
    WEIGHTS and grad_w are concept rows [C, K]: a pair reads and writes one contiguous row."""
    if geo.fused:
        unused = grad_b is None
        grad_b = torch.zeros_like(bias) if unused else grad_b
        pixel_kernel.accumulate(
            block,
            pairs,
            cols,
            weights,
            bias,
            alpha,
            scale,
            loss_kind,
            geo.rows,
            geo.columns,
            geo.on_values(block),
            grad_w,
            grad_b,
        )
        return
    logits, (small_at, weight_at, cols_t) = _upsampled_logits(block, pairs, cols, weights, bias, geo)
    labels = block.labels(pairs).to(geo.device)
    g_up = loss_gradient(logits, labels, alpha[cols_t], scale, loss_kind, workspace=geo.buffers(len(pairs))[1])
    if grad_b is not None:  # upsampling preserves constants, so d/db is the sum over pixels
        grad_b.index_add_(0, cols_t, g_up.sum((1, 2)))
    g_small = geo.down(g_up).reshape(-1)
    grad_w.view(-1).index_add_(0, weight_at, g_small.index_select(0, small_at))


def epoch_order(gen: torch.Generator, n_train: int) -> np.ndarray:
    """The epoch's order of a block's train images (a uniform permutation; concept c's batches are
    its images taken in this order)."""
    return torch.randperm(n_train, generator=gen).numpy()


def train(
    source: ExampleSource | CachedBlocks,
    concept_ids: Sequence[int],
    n_filters: int,
    *,
    epochs: int = 30,
    lr: float = 1e-4,
    batch_size: int = 16,
    loss: str = "paper",
    use_bias: bool = False,
    seed: int = 0,
    keep: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    per_image: list | None = None,
) -> SegResult:
    """Train every concept's embedding jointly. keep [K, C] (0/1) restricts each concept to some filters.
    The weights live on DEVICE (a GPU where there is one); pairs move there chunk by chunk. PER_IMAGE,
    if given, collects the final evaluation's per-image val IoUs (see evaluate)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    device = torch.device(device)
    concept_ids = np.asarray(concept_ids, dtype=np.int64)
    column = {int(c): j for j, c in enumerate(concept_ids)}
    n_cols = len(column)
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(n_filters)
    init = ((torch.rand(n_filters, n_cols, generator=gen) * 2 - 1) * bound).to(device)
    # Held as concept rows [C, K]: each pair's scatter and gather stay in one row, and a step moves
    # only its concepts' rows (RowMomentum).
    keep = None if keep is None else keep.float().T.contiguous().to(device)
    weights = (init.T if keep is None else init.T * keep).contiguous()
    bias = torch.zeros(n_cols, device=device)
    grad_w, grad_b = torch.zeros_like(weights), torch.zeros_like(bias)
    # The step's bookkeeping (momentum, zeroing the moved gradient rows) is a few small operations
    # per step. On the CPU they run in numpy on views of the same memory: torch would split each over
    # its threads for no gain, and on a shared machine wait on the busy core at every one (measured:
    # training 4x slower at 2 threads).
    on_cpu = device.type == "cpu"
    params, grads = (
        ((weights.numpy(), bias.numpy()), (grad_w.numpy(), grad_b.numpy()))
        if on_cpu
        else (
            (weights, bias),
            (grad_w, grad_b),
        )
    )
    keep_rows = keep.numpy() if on_cpu and keep is not None else keep
    sgd_w, sgd_b = RowMomentum(params[0]), RowMomentum(params[1])
    alpha = compute_alpha(source, column).to(device)
    geometries: dict[tuple, _Geometry] = {}
    n_images = n_pairs = 0
    for epoch in range(epochs):
        for block in blocks_of(source):
            shape = (block.map_shape, block.mask_shape)
            geo = geometries.get(shape) or geometries.setdefault(shape, _Geometry(block, device))
            pairs, cols = _pairs_in(block, column, train_only=True)
            if epoch == 0:  # counted on the way (a pass of its own re-read every spilled block)
                n_images, n_pairs = n_images + len(block.image_ids), n_pairs + len(pairs)
            train_images = np.flatnonzero(block.is_train)
            order = np.zeros(len(block.image_ids), np.int64)
            order[train_images] = epoch_order(gen, len(train_images))
            for chosen, scale in own_batches(cols, order[block.pair_image[pairs]], batch_size):
                step_pairs, step_cols = pairs[chosen], cols[chosen]
                scale_t = torch.from_numpy(scale).float().to(device)
                for start in range(0, len(step_pairs), geo.chunk_pairs):
                    part = slice(start, start + geo.chunk_pairs)
                    _accumulate(
                        block,
                        step_pairs[part],
                        step_cols[part],
                        weights,
                        bias,
                        alpha,
                        scale_t[part],
                        loss,
                        geo,
                        grad_w,
                        grad_b if use_bias else None,
                    )
                moved = np.unique(step_cols) if on_cpu else torch.from_numpy(np.unique(step_cols)).to(device)
                grad_rows = grads[0][moved] if keep is None else grads[0][moved] * keep_rows[moved]
                sgd_w.step(params[0], moved, grad_rows, lr)
                if use_bias:
                    sgd_b.step(params[1], moved, grads[1][moved], lr)
                grads[0][moved], grads[1][moved] = 0, 0  # zero again for the next step
    weights = weights.T.contiguous()
    train_iou, val_iou = evaluate(source, column, weights, bias, per_image)
    return SegResult(concept_ids, weights.cpu(), bias.cpu().clone(), alpha.cpu(), train_iou, val_iou, n_images, n_pairs)


@torch.no_grad()
def evaluate(
    source: ExampleSource | CachedBlocks,
    column: dict[int, int],
    weights: torch.Tensor,
    bias: torch.Tensor,
    per_image: list | None = None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Set IoU per concept and split of M = sigmoid(logits) > 0.5, over images containing the concept.
    per_image, if given, collects (image_ids, concept_ids, intersections, unions) of val pairs, as
    arrays, one such tuple per chunk of pairs (held as arrays: tuples per pair grew with the dataset)."""
    c = len(column)
    inter = {s: np.zeros(c) for s in ("train", "val")}
    union = {s: np.zeros(c) for s in ("train", "val")}
    concept_of = np.zeros(c, np.int64)
    for cid, j in column.items():
        concept_of[j] = cid
    device = torch.device(device) if device is not None else weights.device
    weights, bias = weights.T.contiguous().to(device), bias.to(device)  # concept rows, as training holds them
    for block in blocks_of(source):
        geo = _Geometry(block, device)
        pairs, cols = _pairs_in(block, column, train_only=False)
        for start in range(0, len(pairs), geo.chunk_pairs):
            part = slice(start, start + geo.chunk_pairs)
            part_pairs, part_cols = pairs[part], cols[part]
            if geo.fused:
                on_values = geo.on_values(block)
                i, predicted = pixel_kernel.predicted_counts(
                    block, part_pairs, part_cols, weights, bias, geo.rows, geo.columns, on_values
                )
                u = predicted + block.mask_pixels[part_pairs] - i
            else:
                logits, _ = _upsampled_logits(block, part_pairs, part_cols, weights, bias, geo)
                # Counted on packed bits: sigmoid(x) > 0.5 packed, ANDed with the stored mask bits.
                pred = np.packbits((logits > 0).flatten(1).cpu().numpy(), axis=1)
                i = _POPCOUNT[pred & block.mask_bits[part_pairs]].sum(1, dtype=np.int64)
                u = _POPCOUNT[pred].sum(1, dtype=np.int64) + block.mask_pixels[part_pairs] - i
            is_train = block.is_train[block.pair_image[part_pairs]]
            for split, chosen in (("train", is_train), ("val", ~is_train)):
                np.add.at(inter[split], part_cols[chosen], i[chosen])
                np.add.at(union[split], part_cols[chosen], u[chosen])
            if per_image is not None:
                val = ~is_train
                image_ids = block.image_ids[block.pair_image[part_pairs[val]]]
                per_image.append(
                    (image_ids, concept_of[part_cols[val]], i[val].astype(np.int64), u[val].astype(np.int64))
                )
    iou = {s: np.where(union[s] > 0, inter[s] / np.maximum(union[s], 1), np.nan) for s in inter}
    return iou["train"], iou["val"]
