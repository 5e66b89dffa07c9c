"""The speed arrangements of embedding training (fused gradient, reused chunk buffers, row-wise
updates) against plain formulations and autograd on small random data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from n2vdb.embed import classification, segmentation
from n2vdb.embed.batches import RowMomentum
from n2vdb.embed.examples import iter_blocks

from helpers import classification_one_at_a_time, random_examples


@pytest.mark.parametrize("loss", ["paper", "loglik"])
@pytest.mark.parametrize("with_workspace", [False, True])
def test_loss_gradient_equals_autograd(loss, with_workspace):
    gen = torch.Generator().manual_seed(1)
    p, sh, sw = 4, 7, 9
    logits = torch.randn(p, sh, sw, generator=gen) * 3
    labels = torch.rand(p, sh, sw, generator=gen) < 0.4
    alpha = torch.rand(p, generator=gen)
    scale = torch.rand(p, generator=gen)
    z = logits.clone().requires_grad_()
    (scale * segmentation.concept_loss(z, labels.float(), alpha, loss)).sum().backward()
    workspace = torch.full((p, sh, sw), float("nan")) if with_workspace else None
    got = segmentation.loss_gradient(logits.clone(), labels, alpha, scale, loss, workspace=workspace)
    torch.testing.assert_close(got, z.grad, rtol=1e-5, atol=1e-7)


def test_loss_gradient_rejects_an_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation.loss_gradient(
            torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), torch.ones(1), torch.ones(1), "l2"
        )


def _block(gen, n=5, k=4, h=3, w=5, sh=8, sw=11):
    return next(iter_blocks(random_examples(gen, n, (k, h, w), (sh, sw)), 100))


def test_reused_chunk_buffers_do_not_leak_between_chunks():
    """A geometry that has already served a larger chunk (its buffers full of that chunk's values)
    gives a chunk the same gradient, and the same logits, as a fresh one; a chunk larger than
    CHUNK_PAIRS grows the buffers."""
    gen = torch.Generator().manual_seed(2)
    block = _block(gen)
    column = {1: 0, 2: 1, 4: 2}
    pairs, cols = segmentation._pairs_in(block, column, train_only=True)
    weights, bias = torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)  # concept rows [C, K]
    alpha, scale = torch.rand(3, generator=gen), torch.rand(len(pairs), generator=gen)

    def gradient(geo, chosen):
        grad_w, grad_b = torch.zeros(3, 4), torch.zeros(3)
        segmentation._accumulate(
            block, pairs[chosen], cols[chosen], weights, bias, alpha, scale[chosen], "paper", geo, grad_w, grad_b
        )
        return grad_w, grad_b

    used = segmentation._Geometry(block, torch.device("cpu"))
    gradient(used, np.arange(len(pairs)))
    part = np.arange(1, len(pairs), 2)
    for got, want in zip(gradient(used, part), gradient(segmentation._Geometry(block, torch.device("cpu")), part)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    logits, _ = segmentation._upsampled_logits(block, pairs[part], cols[part], weights, bias, used)
    small = torch.zeros(len(part), 4, 3, 5)
    for i, p in enumerate(pairs[part]):
        small[i] = block.example(int(block.pair_image[p])).binary.float()
    direct = torch.einsum("pkhw,pk->phw", small, weights[cols[part]]) + bias[cols[part]][:, None, None]
    want = F.interpolate(direct[:, None], size=(8, 11), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    big = segmentation.CHUNK_PAIRS + 3
    assert used.buffers(big)[0].shape == (big, 8, 11)


def test_row_momentum_is_torch_sgd_per_row():
    """Each row moves as its own torch.optim.SGD(momentum=0.9) would, stepped only when it had a
    batch (to float rounding: SGD adds -lr v in one fused operation); on a numpy array (the CPU
    trainer's) bit for bit as on a tensor."""
    gen = torch.Generator().manual_seed(3)
    c, k = 6, 4
    start = torch.randn(c, k, generator=gen)
    on_torch, on_numpy = start.clone(), start.numpy().copy()
    rows_torch, rows_numpy = RowMomentum(on_torch), RowMomentum(on_numpy)
    own = [start[j].clone().requires_grad_() for j in range(c)]
    optimisers = [torch.optim.SGD([w], lr=0.1, momentum=0.9) for w in own]
    for stepped_rows in ([0, 2], [2, 3, 5], [1], [0, 2, 5]):
        grad = torch.randn(c, k, generator=gen)
        rows_torch.step(on_torch, torch.tensor(stepped_rows), grad[stepped_rows], 0.1)
        rows_numpy.step(on_numpy, np.array(stepped_rows), grad.numpy()[stepped_rows], 0.1)
        for j in stepped_rows:
            own[j].grad = grad[j].clone()
            optimisers[j].step()
    torch.testing.assert_close(on_torch, torch.stack([w.detach() for w in own]), rtol=1e-6, atol=1e-7)
    assert not torch.equal(on_torch, start)
    assert np.array_equal(on_numpy, on_torch.numpy())


def test_classification_with_keep_equals_masked_sgd_per_concept():
    """keep [K, C] restricts each concept to its filters: per concept, torch's SGD with the masked
    weights' gradients zeroed gives the joint weights (the row-wise path's masking)."""
    gen = torch.Generator().manual_seed(4)
    n, k, batch, epochs, lr, seed = 80, 6, 8, 4, 0.1, 11
    features = torch.rand(n, k, generator=gen)
    is_val = torch.arange(n) % 4 == 0
    labels = torch.stack([features[:, 0] > 0.6, features[:, 2] + features[:, 3] > 1.1], 1)
    keep = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [0, 0]], dtype=torch.float)
    joint = classification.train(
        features, labels, is_val, [5, 6], epochs=epochs, lr=lr, batch_size=batch, seed=seed, keep=keep
    )
    assert torch.equal(joint.weights[keep == 0], torch.zeros(int((keep == 0).sum())))
    reference = classification_one_at_a_time(
        features, labels, is_val, epochs=epochs, lr=lr, batch=batch, seed=seed, keep=keep
    )
    for j, (w, b) in enumerate(reference):
        torch.testing.assert_close(joint.weights[:, j], w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(joint.bias[j], b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_keep", [False, True])
def test_compiled_classification_epochs_equal_the_torch_steps(monkeypatch, with_keep):
    """The CPU's compiled epoch (concept by concept) and the torch steps other devices run (every
    concept's t-th batch at once) give the same weights, keep included."""
    gen = torch.Generator().manual_seed(12)
    n, k = 120, 7
    features = torch.rand(n, k, generator=gen)
    is_val = torch.arange(n) % 5 == 0
    labels = torch.rand(n, 4, generator=gen) < torch.tensor([0.05, 0.3, 0.5, 0.8])
    keep = (torch.rand(k, 4, generator=gen) < 0.6).float() if with_keep else None
    args = dict(epochs=6, lr=0.1, batch_size=8, seed=2, keep=keep)
    compiled = classification.train(features, labels, is_val, [1, 2, 3, 4], **args)
    monkeypatch.setattr(classification, "uses_compiled_steps", lambda device: False)
    steps = classification.train(features, labels, is_val, [1, 2, 3, 4], **args)
    torch.testing.assert_close(compiled.weights, steps.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.bias, steps.bias, rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        compiled.weights, classification.train(features, labels, is_val, [1, 2, 3, 4], **{**args, "epochs": 1}).weights
    )
