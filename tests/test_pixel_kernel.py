"""The compiled per-pixel loop of segmentation training (n2vdb/embed/pixel_kernel.py) against
autograd through F.interpolate and the loss, and its sigmoid against torch's."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from n2vdb.embed import pixel_kernel, segmentation, threads
from n2vdb.embed.examples import iter_blocks

from helpers import random_examples


@pytest.mark.parametrize(("n_in", "n_out"), [(2, 2), (2, 9), (3, 8), (13, 113), (7, 7), (5, 3)])
def test_taps_rebuild_the_interpolation_matrix(n_in, n_out):
    a = segmentation.upsample_matrix(n_in, n_out)
    low, weight, first = pixel_kernel.taps(a)
    rebuilt = torch.zeros(n_out, n_in)
    rebuilt[torch.arange(n_out), torch.from_numpy(low)] += torch.from_numpy(1 - weight)
    rebuilt[torch.arange(n_out), torch.from_numpy(low + 1)] += torch.from_numpy(weight)
    torch.testing.assert_close(rebuilt, a, rtol=0, atol=1e-6)
    for r in range(n_in - 1):  # the outputs of each low tap, as the loop walks them
        assert np.array_equal(np.arange(first[r], first[r + 1]), np.flatnonzero(low == r))


def test_taps_refuse_a_matrix_that_is_no_interpolation():
    with pytest.raises(ValueError, match="two-tap"):
        pixel_kernel.taps(torch.full((4, 3), 1 / 3))


def test_sigmoid_agrees_with_torch_over_the_whole_range():
    """With loglik, no mask pixel, inside 0 and outside 1, a row's gradient is the sigmoid itself,
    so the vectorised exp is checked directly, its clamped tails included."""
    z = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([-87.5, -87.0, 0.0, 87.0, 87.5])]).numpy()
    scratch, two_n = np.empty_like(z), np.empty(len(z), np.int32)
    mask = np.zeros(len(z), bool)
    want = torch.sigmoid(torch.from_numpy(z).double()).float()
    for t in (0, 1):  # all of the row's gradient goes below (t = 0) or above (t = 1)
        below, above = np.zeros_like(z), np.zeros_like(z)
        x0, x1 = (z, -z) if t == 0 else (-z, z)
        zero, one = np.float32(0), np.float32(1)
        pixel_kernel._row_gradient(x0, x1, np.float32(t), mask, zero, one, True, scratch, two_n, below, above)
        torch.testing.assert_close(torch.from_numpy(above if t else below), want, rtol=2e-6, atol=1e-30)
        assert not (below if t else above).any()


@pytest.mark.parametrize("loglik", [False, True])
def test_a_cells_recurrence_equals_an_exp_per_row(loglik):
    """_cell_gradient carries e^-z from row to row; _row_gradient computes it at every pixel."""
    rows = pixel_kernel.taps(segmentation.upsample_matrix(13, 113))
    rng = np.random.default_rng(3)
    width = 113
    x0, x1 = (rng.uniform(-25, 25, width).astype(np.float32) for _ in range(2))
    a, b = int(rows.first[5]), int(rows.first[6])
    labels = rng.random((113, width)) < 0.3
    inside, outside = np.float32(-0.7), np.float32(0.2)
    scratch = [np.empty(width, np.float32), np.empty(width, np.float32), np.empty(width, np.int32)]
    want = np.zeros((2, width), np.float32)
    for i in range(a, b):
        pixel_kernel._row_gradient(
            x0, x1, rows.weight[i], labels[i], inside, outside, loglik, scratch[0], scratch[2], *want
        )
    got = np.zeros((2, width), np.float32)
    pixel_kernel._cell_gradient(x0, x1, rows.weight, a, b, labels, inside, outside, loglik, *scratch, *got)
    assert b - a >= 9
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())


def test_taps_refuse_uneven_spacing():
    a = torch.zeros(4, 3)
    for i, (low, t) in enumerate([(0, 0.0), (0, 0.2), (1, 0.5), (1, 1.0)]):
        a[i, low], a[i, low + 1] = 1 - t, t
    with pytest.raises(ValueError, match="evenly spaced"):
        pixel_kernel.taps(a)


def _block(gen, k, h, w, sh, sw, n=6):
    return next(iter_blocks(_examples(gen, k, h, w, sh, sw, n), 100))


def _examples(gen, k, h, w, sh, sw, n):
    return random_examples(
        gen,
        n,
        (k, h, w),
        (sh, sw),
        split=lambda i: "val" if i % 5 == 4 else "train",
        on=0.4,
        labelled=lambda i: 0.1 + 0.3 * (i % 2),
    )


def _autograd(block, pairs, cols, weights, bias, alpha, scale, loss):
    """d/dW, d/db of sum_p scale_p loss_p, straight from the definition: dense maps, F.interpolate."""
    w, b = weights.clone().requires_grad_(), bias.clone().requires_grad_()
    k, h, wd = block.map_shape
    maps = torch.stack([block.example(int(block.pair_image[p])).binary.float() for p in pairs])
    small = torch.einsum("pkhw,pk->phw", maps, w[:, cols].T) + b[cols][:, None, None]
    up = F.interpolate(small[:, None], size=block.mask_shape, mode="bilinear", align_corners=True)[:, 0]
    labels = block.labels(pairs).float()
    (scale * segmentation.concept_loss(up, labels, alpha[cols], loss)).sum().backward()
    return w.grad, b.grad


@pytest.mark.parametrize("loss", ["paper", "loglik"])
@pytest.mark.parametrize(
    ("k", "h", "w", "sh", "sw", "spread"),
    [(4, 3, 5, 8, 11, 1.0), (6, 13, 13, 113, 113, 1.0), (6, 13, 13, 113, 113, 12.0), (6, 13, 13, 113, 113, 40.0)],
)
def test_fused_gradient_equals_autograd_and_the_torch_path(loss, k, h, w, sh, sw, spread):
    """SPREAD 1 keeps every cell on the exp's recurrence, 12 mixes cells on it with cells past its
    limit (an exp per pixel), 40 puts most logits far into the sigmoid's flat tails (beyond the
    exp's clamp)."""
    gen = torch.Generator().manual_seed(7)
    block = _block(gen, k, h, w, sh, sw)
    column = {1: 0, 2: 1, 4: 2}
    pairs, cols = segmentation._pairs_in(block, column, train_only=True)
    weights, bias = torch.randn(k, 3, generator=gen) * spread, torch.randn(3, generator=gen)
    alpha, scale = torch.rand(3, generator=gen), torch.rand(len(pairs), generator=gen)

    def accumulate(fused):
        geo = segmentation._Geometry(block, torch.device("cpu"))
        geo.fused = fused
        grad_w, grad_b = torch.zeros(k, 3), torch.zeros(3)
        grad_rows = grad_w.T.contiguous()
        segmentation._accumulate(
            block, pairs, cols, weights.T.contiguous(), bias, alpha, scale, loss, geo, grad_rows, grad_b
        )
        grad_w.copy_(grad_rows.T)
        return grad_w, grad_b

    want_w, want_b = _autograd(block, pairs, cols, weights, bias, alpha, scale, loss)
    fused, plain = accumulate(True), accumulate(False)
    for got in (fused, plain):
        torch.testing.assert_close(got[0], want_w, rtol=1e-4, atol=1e-3 * want_w.abs().max().item() * 1e-2)
        torch.testing.assert_close(got[1], want_b, rtol=1e-4, atol=1e-3 * want_b.abs().max().item() * 1e-2)
    assert fused[0].abs().sum() > 0  # the comparison is not between zeros


def test_training_on_the_cpu_runs_the_kernel(monkeypatch):
    """The trainer's CPU path goes through the compiled loop (a broken kernel changes the weights),
    and the torch passes give the same weights to float rounding."""
    gen = torch.Generator().manual_seed(8)
    examples = _examples(gen, 5, 3, 4, 9, 10, n=12)

    def source():
        return iter(examples)

    args = dict(epochs=3, lr=0.05, batch_size=4, use_bias=True, seed=3)
    fused = segmentation.train(source, [1, 2, 4], 5, **args)
    monkeypatch.setattr(segmentation, "uses_pixel_kernel", lambda device: False)
    plain = segmentation.train(source, [1, 2, 4], 5, **args)
    torch.testing.assert_close(fused.weights, plain.weights, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused.bias, plain.bias, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(segmentation, "uses_pixel_kernel", lambda device: True)
    monkeypatch.setattr(pixel_kernel, "coefficients", lambda a, k, loss: (np.zeros(len(a), np.float32),) * 2)
    frozen = segmentation.train(source, [1, 2, 4], 5, **args)
    assert not torch.allclose(frozen.weights, plain.weights, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_concept_parts_never_split_a_concept(n):
    rng = np.random.default_rng(n)
    for _ in range(50):
        cols = np.sort(rng.integers(0, rng.integers(1, 9), rng.integers(0, 40)))
        parts = threads.concept_parts(cols, n)
        assert parts[0] == 0 and parts[-1] == len(cols) and np.all(np.diff(parts) > 0) | (len(cols) == 0)
        assert len(parts) - 1 <= max(n, 1)
        for a, b in zip(parts[1:-1], parts[1:-1] - 1):
            assert cols[a] != cols[b]  # a cut falls between two concepts


def test_threads_give_the_same_gradient_bit_for_bit(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    block = _block(gen, 6, 13, 13, 113, 113, n=12)
    column = {1: 0, 2: 1, 4: 2}
    pairs, cols = segmentation._pairs_in(block, column, train_only=True)
    weights, bias = torch.randn(3, 6, generator=gen), torch.randn(3, generator=gen)
    alpha, scale = torch.rand(3, generator=gen), torch.rand(len(pairs), generator=gen)
    geo = segmentation._Geometry(block, torch.device("cpu"))
    grads = []
    for n_threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=n_threads: n)
        grad_w, grad_b = torch.zeros(3, 6), torch.zeros(3)
        segmentation._accumulate(block, pairs, cols, weights, bias, alpha, scale, "paper", geo, grad_w, grad_b)
        grads.append((grad_w, grad_b))
    for grad_w, grad_b in grads[1:]:
        assert torch.equal(grad_w, grads[0][0]) and torch.equal(grad_b, grads[0][1])


def test_predicted_counts_equal_a_dense_count_and_the_torch_path(monkeypatch):
    """Pixels with sigmoid(upsampled logit) > 0.5, and those inside the mask, counted per pair from
    dense F.interpolate maps; segmentation.evaluate's IoUs are the same on both paths."""
    gen = torch.Generator().manual_seed(10)
    k = 6
    examples = _examples(gen, k, 13, 13, 113, 113, n=10)
    block = next(iter_blocks(examples, 100))
    column = {1: 0, 2: 1, 4: 2}
    pairs, cols = segmentation._pairs_in(block, column, train_only=False)
    weights, bias = torch.randn(3, k, generator=gen), torch.randn(3, generator=gen) * 0.5
    geo = segmentation._Geometry(block, torch.device("cpu"))
    inter, predicted = pixel_kernel.predicted_counts(
        block, pairs, cols, weights, bias, geo.rows, geo.columns, geo.on_values(block)
    )
    maps = torch.stack([block.example(int(block.pair_image[p])).binary.float() for p in pairs])
    small = torch.einsum("pkhw,pk->phw", maps, weights[cols]) + bias[cols][:, None, None]
    up = F.interpolate(small[:, None].double(), size=(113, 113), mode="bilinear", align_corners=True)[:, 0]
    positive = up > 0
    assert np.array_equal(predicted, positive.sum((1, 2)).numpy())
    assert np.array_equal(inter, (positive & block.labels(pairs)).sum((1, 2)).numpy())
    assert 0 < predicted.sum() < positive.numel()  # neither all on nor all off

    def source():
        return iter(examples)

    fused = segmentation.evaluate(source, column, weights.T, bias)
    monkeypatch.setattr(segmentation, "uses_pixel_kernel", lambda device: False)
    plain = segmentation.evaluate(source, column, weights.T, bias)
    for got, want in zip(fused, plain):
        np.testing.assert_array_equal(got, want)
