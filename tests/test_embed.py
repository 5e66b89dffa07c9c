"""Stage 3: Net2Vec embeddings against direct computations and planted truths."""

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from n2vdb import api
from n2vdb.embed import classification, segmentation
from n2vdb.embed.examples import SegExample
from n2vdb.embed.stage import parse_grid, sufficiency_grid, top_filters
from n2vdb.errors import UsageError
from n2vdb.probe import TrainSettings

from helpers import classification_one_at_a_time, random_examples, run_cli


def planted_examples(n=160, k=12, size=7, members=(2, 5, 9), seed=0):
    """Concept 7's mask is the OR of filters `members`; concept 8 is filter 0 alone."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        binary = torch.rand(k, size, size, generator=gen) < 0.12
        union = binary[list(members)].any(0)
        ids, masks = [], []
        if union.any():
            ids.append(7)
            masks.append(union)
        if binary[0].any():
            ids.append(8)
            masks.append(binary[0])
        examples.append(
            SegExample(
                i,
                "train" if i % 4 else "val",
                binary,
                np.array(ids),
                torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool),
            )
        )
    return examples


def test_planted_or_of_three_filters_is_found():
    examples = planted_examples()
    result = segmentation.train(lambda: examples, [7, 8], 12, epochs=30, lr=0.05, batch_size=16)
    top3 = set(result.weights[:, 0].topk(3).indices.tolist())
    assert top3 == {2, 5, 9}
    assert result.val_iou[0] > 0.9
    assert result.weights[:, 1].argmax().item() == 0 and result.val_iou[1] > 0.9


def test_alpha_matches_direct_computation():
    examples = planted_examples(n=40)
    alpha = segmentation.compute_alpha(lambda: examples, {7: 0, 8: 1})
    for j, concept in enumerate((7, 8)):
        fractions = [
            ex.masks[list(ex.concept_ids).index(concept)].float().mean().item()
            for ex in examples
            if ex.split == "train" and concept in ex.concept_ids
        ]
        assert alpha[j].item() == pytest.approx(1 - np.mean(fractions), rel=1e-6)


@pytest.mark.parametrize("kind", ["paper", "loglik"])
def test_loss_matches_pixel_loop(kind):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 5, generator=gen)
    labels = (torch.rand(3, 4, 5, generator=gen) > 0.5).float()
    alpha = torch.tensor([0.2, 0.7, 0.9])
    got = segmentation.concept_loss(logits, labels, alpha, kind)
    for c in range(3):
        total = 0.0
        for p in range(20):
            z, y, a = logits[c].flatten()[p].item(), labels[c].flatten()[p].item(), alpha[c].item()
            m = 1 / (1 + np.exp(-z))
            if kind == "paper":
                total += a * y * m + (1 - a) * (1 - y) * (1 - m)
            else:
                total += a * y * np.log(m) + (1 - a) * (1 - y) * np.log(1 - m)
        assert got[c].item() == pytest.approx(-total, rel=1e-5)


def rare_and_frequent_examples(n=40, k=6, size=5, seed=2):
    """planted_examples plus concept 9 in one train image and concept 10 in two (and one val image)."""
    examples = planted_examples(n=n, k=k, size=size, members=(1, 3, 4), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    train = [i for i, ex in enumerate(examples) if ex.split == "train"]
    val = [i for i, ex in enumerate(examples) if ex.split == "val"]
    extra = {train[3]: [9], train[5]: [10], train[17]: [10], val[0]: [10]}
    for i, concepts in extra.items():
        ex = examples[i]
        new_masks = torch.rand(len(concepts), size, size, generator=gen) < 0.4
        examples[i] = SegExample(
            ex.image_id,
            ex.split,
            ex.binary,
            np.concatenate([ex.concept_ids, concepts]),
            torch.cat([ex.masks, new_masks]),
        )
    return examples


def reference_one_concept(
    examples, concept, k, *, init, alpha, lr, epochs, batch, orders, loss="paper", use_bias=False
):
    """The reference's recipe for one concept, written plainly: its own train images in the epoch's
    order, batches of BATCH, loss summed over pixels and divided by the batch's own count, autograd
    through F.interpolate, torch's SGD with momentum."""
    train = [ex for ex in examples if ex.split == "train"]
    w = init.clone().requires_grad_()
    b = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.SGD([w, b] if use_bias else [w], lr=lr, momentum=0.9)
    for epoch in range(epochs):
        mine = [train[r] for r in np.argsort(orders[epoch]) if concept in train[r].concept_ids]
        for start in range(0, len(mine), batch):
            chunk = mine[start : start + batch]
            optimiser.zero_grad()
            total = 0
            for ex in chunk:
                y = ex.masks[list(ex.concept_ids).index(concept)].float()
                logit = torch.einsum("khw,k->hw", ex.binary.float(), w) + b
                z = F.interpolate(logit[None, None], size=y.shape, mode="bilinear", align_corners=True)[0, 0]
                if loss == "paper":
                    m = torch.sigmoid(z)
                    total = total - (alpha * y * m + (1 - alpha) * (1 - y) * (1 - m)).sum()
                else:
                    total = total - (alpha * y * F.logsigmoid(z) + (1 - alpha) * (1 - y) * F.logsigmoid(-z)).sum()
            (total / len(chunk)).backward()
            optimiser.step()
    return w.detach(), b.detach()


@pytest.mark.parametrize("loss,use_bias", [("paper", False), ("loglik", True)])
def test_joint_training_equals_one_concept_at_a_time(loss, use_bias):
    """Joint training must give every concept, rare (1 or 2 train images) or frequent, exactly the
    weights that the reference's per-concept training gives: own batches, own count, own steps."""
    examples = rare_and_frequent_examples()
    concepts = [7, 8, 9, 10]
    k, lr, epochs, batch, seed = 6, 0.01, 4, 4, 4
    joint = segmentation.train(
        lambda: examples, concepts, k, epochs=epochs, lr=lr, batch_size=batch, seed=seed, loss=loss, use_bias=use_bias
    )
    gen = torch.Generator().manual_seed(seed)
    init = (torch.rand(k, len(concepts), generator=gen) * 2 - 1) / np.sqrt(k)
    n_train = sum(ex.split == "train" for ex in examples)
    orders = [segmentation.epoch_order(gen, n_train) for _ in range(epochs)]
    alpha = segmentation.compute_alpha(lambda: examples, {c: j for j, c in enumerate(concepts)})
    counts = {c: sum(c in ex.concept_ids for ex in examples if ex.split == "train") for c in concepts}
    assert counts[9] == 1 and counts[10] == 2 and counts[7] > 3 * batch
    for j, concept in enumerate(concepts):
        w, b = reference_one_concept(
            examples,
            concept,
            k,
            init=init[:, j],
            alpha=alpha[j],
            lr=lr,
            epochs=epochs,
            batch=batch,
            orders=orders,
            loss=loss,
            use_bias=use_bias,
        )
        torch.testing.assert_close(joint.weights[:, j], w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(joint.bias[j], b, rtol=1e-4, atol=1e-6)
        assert not torch.equal(w, init[:, j])  # it trained


@pytest.mark.parametrize("loss", ["paper", "loglik"])
def test_fast_gradient_equals_autograd_through_interpolate(loss):
    """The scatter / matrix-upsampling / written-out gradient path against autograd on the plain
    formulation, on non-square maps and masks (so the two axes cannot be confused)."""
    from n2vdb.embed.examples import iter_blocks

    gen = torch.Generator().manual_seed(5)
    k, h, w, sh, sw = 5, 4, 6, 9, 13
    examples = random_examples(gen, 6, (k, h, w), (sh, sw), concepts=lambda i: [3, 8] if i % 2 else [8])
    block = next(iter_blocks(examples, 100))
    column = {3: 0, 8: 1}
    weights = torch.randn(k, 2, generator=gen)
    bias = torch.randn(2, generator=gen)
    alpha = torch.tensor([0.7, 0.9])
    pairs, cols = segmentation._pairs_in(block, column, train_only=True)
    scale = torch.rand(len(pairs), generator=gen)
    geo = segmentation._Geometry(block, torch.device("cpu"))
    grad_w, grad_b = torch.zeros(k, 2), torch.zeros(2)
    grad_rows = grad_w.T.contiguous()
    segmentation._accumulate(
        block, pairs, cols, weights.T.contiguous(), bias, alpha, scale, loss, geo, grad_rows, grad_b
    )
    grad_w.copy_(grad_rows.T)
    torch.testing.assert_close(
        geo.up(torch.eye(6)[None, :4].repeat(2, 1, 1)),
        F.interpolate(
            torch.eye(6)[None, None, :4].repeat(2, 1, 1, 1), size=(sh, sw), mode="bilinear", align_corners=True
        )[:, 0],
    )
    w_ref, b_ref = weights.clone().requires_grad_(), bias.clone().requires_grad_()
    total = 0
    for p, c, s in zip(pairs, cols, scale):
        ex = examples[block.pair_image[p]]
        y = ex.masks[list(ex.concept_ids).index(block.pair_concept[p])].float()
        logit = torch.einsum("khw,k->hw", ex.binary.float(), w_ref[:, c]) + b_ref[c]
        z = F.interpolate(logit[None, None], size=(sh, sw), mode="bilinear", align_corners=True)[0, 0]
        total = total + s * segmentation.concept_loss(z, y, alpha[c], loss)
    total.backward()
    torch.testing.assert_close(grad_w, w_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_b, b_ref.grad, rtol=1e-4, atol=1e-5)


def test_classification_planted_presence():
    gen = torch.Generator().manual_seed(0)
    n, k = 400, 10
    features = torch.rand(n, k, generator=gen)
    labels = torch.stack([features[:, 3] > 0.7, features[:, 6] > 0.4], dim=1)
    is_val = torch.arange(n) % 4 == 0
    result = classification.train(features * 5, labels, is_val, [11, 12], epochs=30)
    assert result.weights[:, 0].abs().argmax().item() == 3
    assert result.weights[:, 1].abs().argmax().item() == 6
    # 30 epochs of the reference's own-batch steps (fewer than one per joint batch) leave a
    # threshold error of a few percent on a 0.4 cut; ranking is near perfect.
    assert (result.val_accuracy > 0.85).all()
    assert (result.val_ap > 0.9).all()


def test_classification_joint_equals_one_concept_at_a_time():
    """Per concept, the reference's recipe written plainly (its balanced sample in the epoch's order,
    batches of its own, mean BCE over each batch, torch's SGD and StepLR) gives the joint weights, for
    a concept with one positive train image, one with two, and a frequent one."""
    gen = torch.Generator().manual_seed(3)
    n, k, batch, epochs, lr, seed = 120, 5, 8, 4, 0.1, 7
    features = torch.rand(n, k, generator=gen)
    is_val = torch.arange(n) % 4 == 0
    train_rows = torch.nonzero(~is_val).squeeze(1)
    labels = torch.zeros(n, 3, dtype=torch.bool)
    labels[train_rows[5], 0] = True
    labels[train_rows[[9, 40]], 1] = True
    labels[:, 2] = features[:, 1] > 0.5
    labels[torch.nonzero(is_val).squeeze(1)[:2], :2] = True
    joint = classification.train(features, labels, is_val, [1, 2, 3], epochs=epochs, lr=lr, batch_size=batch, seed=seed)
    reference = classification_one_at_a_time(features, labels, is_val, epochs=epochs, lr=lr, batch=batch, seed=seed)
    for j, (w, b) in enumerate(reference):
        torch.testing.assert_close(joint.weights[:, j], w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(joint.bias[j], b, rtol=1e-4, atol=1e-6)


def _balanced_by_stable_sort(labels, noise):
    """The draw by definition: per concept, the minority and the majority images first in a stable
    sort of the noise, as many as the minority."""
    chosen = torch.zeros_like(labels)
    for j in range(labels.shape[1]):
        pos = labels[:, j]
        minority = pos if pos.sum() <= (~pos).sum() else ~pos
        size = int(minority.sum())
        if size == 0 or size == len(pos):
            continue
        majority = torch.nonzero(~minority).flatten()
        order = torch.argsort(noise[majority, j], stable=True)
        chosen[minority, j] = True
        chosen[majority[order[:size]], j] = True
    return chosen


@pytest.mark.parametrize("ties", [False, True])
def test_balanced_sample_equals_a_stable_sort_per_concept(monkeypatch, ties):
    """The partial sort by (noise bits, index) draws what a stable sort of each concept's noise
    draws, ties included (TIES: noise rounded to 1/8, so most draws tie)."""
    gen = torch.Generator().manual_seed(5)
    labels = torch.rand(300, 150, generator=gen) < torch.rand(150, generator=gen) ** 3
    labels[:, 0], labels[:, 1] = False, True  # no balanced sample
    real_rand = torch.rand
    if ties:
        monkeypatch.setattr(torch, "rand", lambda *a, **kw: (real_rand(*a, **kw) * 8).floor() / 8)
    noise = torch.rand(*labels.shape, generator=torch.Generator().manual_seed(6))
    got = classification.balanced_sample(labels, torch.Generator().manual_seed(6))
    assert torch.equal(got, _balanced_by_stable_sort(labels, noise))
    assert got.any(0).sum() > 100  # most concepts have a draw to compare


@pytest.mark.parametrize("draw_elements, short", [(1 << 20, False), (7, False), (400, True)])
def test_balanced_draw_in_chunks_equals_a_stable_sort(monkeypatch, draw_elements, short):
    """Drawn a few rows at a time (DRAW_ELEMENTS) and with cuts too low to hold the draw (SHORT: every
    concept replays the noise), the sample is still the stable sort's, and the generator is left where
    one torch.rand(N, C) leaves it."""
    monkeypatch.setattr(classification, "DRAW_ELEMENTS", draw_elements)
    if short:
        monkeypatch.setattr(classification, "CUT_SIGMAS", -50.0)
        monkeypatch.setattr(classification, "CUT_EXTRA", -10.0)
    gen = torch.Generator().manual_seed(8)
    labels = torch.rand(90, 40, generator=gen) < torch.rand(40, generator=gen) ** 2
    labels[:, 0], labels[:, 1] = False, True
    expected_gen = torch.Generator().manual_seed(9)
    noise = torch.rand(*labels.shape, generator=expected_gen)
    got_gen = torch.Generator().manual_seed(9)
    draws = classification.BalancedDraws(labels)
    images, cols = draws(got_gen)
    got = torch.zeros_like(labels)
    got[images, cols] = True
    assert len(images) == int(got.sum())  # no pair twice
    assert torch.equal(got, _balanced_by_stable_sort(labels, noise))
    assert torch.equal(torch.rand(5, generator=got_gen), torch.rand(5, generator=expected_gen))


def test_classification_in_chunks_equals_one_piece(monkeypatch):
    """The noise drawn a few rows at a time and the val images scored a few concepts at a time give
    bit for bit what one [N, C] draw and one block give (on data small enough to be one of each at
    the defaults)."""
    gen = torch.Generator().manual_seed(13)
    n, k, c = 150, 6, 9
    features = torch.rand(n, k, generator=gen)
    labels = torch.rand(n, c, generator=gen) < torch.linspace(0.02, 0.7, c)
    is_val = torch.rand(n, generator=gen) < 0.3
    args = dict(epochs=3, lr=0.1, batch_size=8, seed=4)
    whole = classification.train(features, labels, is_val, list(range(c)), **args)
    monkeypatch.setattr(classification, "DRAW_ELEMENTS", 20)
    monkeypatch.setattr(classification, "EVAL_ELEMENTS", 20)
    monkeypatch.setattr(classification, "EVAL_MIN_CONCEPTS", 2)
    assert len(classification._concept_blocks(int(is_val.sum()), c)) == 5
    chunked = classification.train(features, labels, is_val, list(range(c)), **args)
    for name in ("weights", "bias"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    for name in ("train_accuracy", "val_accuracy", "val_ap", "present_rows", "present_cols", "present_scores"):
        assert np.array_equal(getattr(whole, name), getattr(chunked, name), equal_nan=True), name
    assert np.isfinite(whole.val_ap).all() and (whole.train_accuracy > 0).all()


def test_classification_scores_match_float64_brute_force(monkeypatch):
    """Accuracies, average precision and the val images' present-concept scores of the trained
    weights, recomputed from one float64 product: the balanced samples replayed from the seed."""
    monkeypatch.setattr(classification, "EVAL_ELEMENTS", 64)  # several blocks of concepts
    gen = torch.Generator().manual_seed(21)
    n, k, c, seed = 240, 13, 11, 3
    features = torch.rand(n, k, generator=gen)
    labels = torch.rand(n, c, generator=gen) < torch.linspace(0.05, 0.6, c)
    is_val = torch.rand(n, generator=gen) < 0.35
    epochs = 2
    result = classification.train(features, labels, is_val, list(range(c)), epochs=epochs, seed=seed)
    logits = features.double().numpy() @ result.weights.double().numpy() + result.bias.double().numpy()
    y = labels.numpy()
    train_rows, val_rows = np.flatnonzero(~is_val.numpy()), np.flatnonzero(is_val.numpy())
    # the generator's draws in train's order: val sample, initial weights, per epoch a sample and an
    # order, then the train sample scored
    replay = torch.Generator().manual_seed(seed)
    val_i, val_j = classification.BalancedDraws(labels, val_rows)(replay)
    torch.rand(k, c, generator=replay)
    draw = classification.BalancedDraws(labels, train_rows)
    for _ in range(epochs):
        draw(replay)
        torch.randperm(len(train_rows), generator=replay)
    train_i, train_j = draw(replay)

    def accuracy(rows, cols):
        right = (logits[rows, cols] > 0) == y[rows, cols]
        return np.array([right[cols == j].mean() for j in range(c)])

    np.testing.assert_array_equal(result.train_accuracy, accuracy(train_rows[train_i], train_j))
    np.testing.assert_array_equal(result.val_accuracy, accuracy(val_rows[val_i], val_j))
    rows, cols = np.nonzero(y[val_rows])
    np.testing.assert_array_equal(result.present_rows, val_rows[rows])
    np.testing.assert_array_equal(result.present_cols, cols)
    probs = 1 / (1 + np.exp(-logits[val_rows]))
    np.testing.assert_allclose(result.present_scores, probs[rows, cols], rtol=1e-5)
    ap = [classification.average_precision(probs[:, j], y[val_rows, j]) for j in range(c)]
    np.testing.assert_allclose(result.val_ap, ap, rtol=1e-12)


def test_balanced_sample_and_average_precision():
    labels = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 1], [0, 1], [1, 1]], dtype=torch.bool)
    chosen = classification.balanced_sample(labels, torch.Generator().manual_seed(0))
    # Any draw holds every minority member, as many of the majority, and nothing where a class is
    # empty; over many draws each majority member is as likely as the others (the properties, not a
    # replay of the implementation's own noise).
    many = torch.rand(50, 7, generator=torch.Generator().manual_seed(1)) < torch.linspace(0, 1, 7)
    many[:, 0] = False
    draws, counts = 400, torch.zeros(50, 7)
    for seed in range(draws):
        got = classification.balanced_sample(many, torch.Generator().manual_seed(seed))
        counts += got
        for j in range(7):
            pos = many[:, j]
            size = min(int(pos.sum()), int((~pos).sum()))
            minority = pos if pos.sum() <= (~pos).sum() else ~pos
            assert got[minority, j].all() if size else not got[:, j].any(), (seed, j)
            assert int(got[~minority, j].sum()) == size, (seed, j)
    for j in range(1, 7):
        pos = many[:, j]
        minority = pos if pos.sum() <= (~pos).sum() else ~pos
        expected = int(minority.sum()) / int((~minority).sum())
        assert (counts[~minority, j] / draws - expected).abs().max() < 0.12, j
    assert chosen[:, 0].sum() == 4 and chosen[labels[:, 0], 0].all()
    assert chosen[:, 1].sum() == 4 and chosen[~labels[:, 1], 1].all()
    # precision at each positive: 1/1, 2/3 -> AP = (1 + 2/3) / 2
    assert classification.average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(
        (1 + 2 / 3) / 2
    )


def test_sufficiency_grid_and_top_filters():
    assert sufficiency_grid(256) == [*range(1, 129), 160, 192, 224]  # the reference's segmentation grid
    assert sufficiency_grid(256, "classification") == [1, 2, 3, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 80, 100, 128]
    assert sufficiency_grid(96, "classification") == [1, 2, 3, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 80]
    assert sufficiency_grid(256, grid=(300, 4, 1, 4)) == [1, 4]
    assert parse_grid("8, 1,2") == (1, 2, 8)
    for bad in ("1,x", "0,2", ","):
        with pytest.raises(UsageError, match="sufficiency_grid"):
            parse_grid(bad)
    w = torch.tensor([[0.1, -3.0], [-2.0, 0.2], [0.5, 1.0]])
    assert top_filters(w, 1).tolist() == [[0, 1], [1, 0], [0, 0]]
    examples = planted_examples()
    full = segmentation.train(lambda: examples, [7, 8], 12, epochs=20, lr=0.05)
    three = segmentation.train(lambda: examples, [7, 8], 12, epochs=20, lr=0.05, keep=top_filters(full.weights, 3))
    one = segmentation.train(lambda: examples, [7, 8], 12, epochs=20, lr=0.05, keep=top_filters(full.weights, 1))
    assert (three.weights[:, 0] != 0).sum() == 3
    assert three.val_iou[0] > 0.9 > one.val_iou[0]


def test_embeddings_beat_single_filters_on_the_builtin_set(ingested_db):
    """The paper's headline on the built-in concept set (alexnet conv5, random weights)."""
    table = api.query("single-vs-embedding", ingested_db).to_pylist()
    overall = [r for r in table if r["category"] == "all"][0]
    assert overall["concepts"] >= 15
    assert overall["embedding_iou"] > overall["single_filter_iou"]


def test_stage_writes_scores_and_sufficiency(tmp_path, synthetic_dir):
    db = tmp_path / "s.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    api.ingest(
        "alexnet",
        "conv5",
        db,
        dataset="synthetic",
        weights="random",
        limit=30,
        workers=0,
        train=TrainSettings(epochs=2, sufficiency=True, sufficiency_grid=(1, 4, 300)),
    )
    con = duckdb.connect(str(db), read_only=True)
    grid = con.execute(
        "SELECT kind, list(DISTINCT n_filters ORDER BY n_filters) FROM embeddings GROUP BY kind ORDER BY kind"
    ).fetchall()
    assert grid == [(kind, [1, 4, 256]) for kind in ("classification", "segmentation")]  # 300 > K: capped
    nonzero = con.execute(
        "SELECT n_filters, max(len(list_filter(weights, lambda w: w <> 0))) FROM embeddings"
        " WHERE kind = 'segmentation' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert all(count <= f for f, count in nonzero)
    methods = dict(con.execute("SELECT method, count(*) FROM image_concept_scores GROUP BY 1").fetchall())
    assert set(methods) == {"best_filter", "segmentation", "classification"}
    # per-image segmentation scores only on val images containing the concept
    wrong = con.execute(
        "SELECT count(*) FROM image_concept_scores s JOIN images i USING (image_id)"
        " WHERE s.method = 'segmentation' AND i.split <> 'val'"
    ).fetchone()[0]
    assert wrong == 0


def test_cache_round_trips_in_image_order_and_streams_over_budget():
    from n2vdb.embed.examples import CachedBlocks, cached

    examples = planted_examples(n=20, k=5, size=6, members=(1, 2, 3))
    shuffled = examples[::-1]
    packed = cached(lambda: iter(shuffled))
    assert isinstance(packed, CachedBlocks)
    # 4 bytes per on value of a binary map, one bit per mask pixel (rows padded to bytes)
    assert packed.nbytes == sum(4 * int(ex.binary.sum()) + len(ex.concept_ids) * ((36 + 7) // 8) for ex in examples)
    restored = list(packed())
    assert [ex.image_id for ex in restored] == [ex.image_id for ex in examples]  # image order
    for original, back in zip(examples, restored):
        assert back.split == original.split
        assert torch.equal(back.binary, original.binary) and torch.equal(back.masks, original.masks)
        assert list(back.concept_ids) == list(original.concept_ids)

    def streamed():
        return iter(examples)

    # over budget: spilled to a file, read back on every call (tests/test_memory.py)
    assert cached(streamed, budget_bytes=100).spilled_bytes == packed.nbytes
    # cached and streamed sources train to the same weights (one block either way)
    a = segmentation.train(packed, [7, 8], 5, epochs=2, lr=0.05, batch_size=4)
    b = segmentation.train(streamed, [7, 8], 5, epochs=2, lr=0.05, batch_size=4)
    torch.testing.assert_close(a.weights, b.weights)
    np.testing.assert_allclose(a.val_iou, b.val_iou)


def test_evaluate_matches_direct_iou():
    examples = planted_examples(n=30, k=6, size=5, members=(1, 3, 4))
    weights = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    per_image: list = []
    train_iou, val_iou = segmentation.evaluate(lambda: examples, {7: 0, 8: 1}, weights, torch.zeros(2), per_image)
    per_image = set(zip(*(np.concatenate(c).tolist() for c in zip(*per_image))))
    for j, concept in enumerate((7, 8)):
        for split, got in (("train", train_iou[j]), ("val", val_iou[j])):
            inter = union = 0
            for ex in examples:
                if ex.split != split or concept not in ex.concept_ids:
                    continue
                y = ex.masks[list(ex.concept_ids).index(concept)]
                z = F.interpolate(
                    torch.einsum("khw,k->hw", ex.binary.float(), weights[:, j])[None, None],
                    size=y.shape,
                    mode="bilinear",
                    align_corners=True,
                )[0, 0]
                inter += int(((z > 0) & y).sum())
                union += int(((z > 0) | y).sum())
                if split == "val":
                    assert (ex.image_id, concept, int(((z > 0) & y).sum()), int(((z > 0) | y).sum())) in per_image
            assert got == pytest.approx(inter / union)


def test_sufficiency_grid_is_part_of_the_probe_key():
    from dataclasses import replace

    from n2vdb.probe import ProbeSpec

    spec = ProbeSpec(
        model="m", layer="l", module="l", relu=True, weights="w", dataset_id=1, input_size=8, mean=(0.0,), std=(1.0,)
    )
    other = replace(spec, train=TrainSettings(sufficiency_grid=(1, 2)))
    assert spec.key != other.key and spec.extraction_key == other.extraction_key
    assert "sufficiency_grid" not in spec.settings()["train"]  # keys of older probes are unchanged


def test_bad_sufficiency_grid_is_a_one_line_error(tmp_path):
    result = run_cli(
        "ingest", "alexnet", "conv5", "--sufficiency", "--sufficiency-grid", "1,two", "--db", tmp_path / "x.duckdb"
    )
    assert result.returncode != 0 and "--sufficiency-grid" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.duckdb").exists()


def test_an_image_without_pixel_concepts_joins_a_block():
    """It has no (image, concept) pairs, but its row stays in the block (a regression: the empty mask
    stack could not be reshaped)."""
    from n2vdb.embed.examples import PairBlock, SegExample

    block = PairBlock((2, 3, 3), (4, 4))
    block.add(
        SegExample(
            0,
            "train",
            torch.zeros(2, 3, 3, dtype=torch.bool),
            np.zeros(0, np.int64),
            torch.zeros(0, 4, 4, dtype=torch.bool),
        )
    )
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 1, 2] = True
    block.add(SegExample(1, "val", torch.ones(2, 3, 3, dtype=torch.bool), np.array([7]), masks))
    assert block.nbytes > 0 and len(block._ids) == 2 and [len(a) for a in block._active] == [0, 18]
    assert [int(p.sum()) for p in block._pixels] == [0, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_store_examples_are_the_dequantised_maps_and_decoded_masks(ingested_db, synthetic_dir, workers):
    """store_examples compares codes with per-image cutoffs and keeps the workers' packed masks; the
    same examples, built the long way: dequantised activations > thresholds, and each image's
    concept masks decoded and filtered to the pixel concepts."""
    from n2vdb import activations as acts_store
    from n2vdb.data.broden import BrodenDataset
    from n2vdb.embed.examples import packed, store_examples
    from n2vdb.probe import load
    from n2vdb.store import read_connection

    dataset = BrodenDataset.open(synthetic_dir)
    with read_connection(ingested_db) as con:
        probe = load(con, 1)
        pixel = {c for (c,) in con.execute("SELECT concept_id FROM concepts WHERE level = 'pixel'").fetchall()}
        pixel = set(sorted(pixel)[::2])  # some of them, so the filtering shows
        got = list(store_examples(con, probe, dataset, pixel, workers)())
        shape = (probe.n_filters, probe.height, probe.width)
        thresholds = acts_store.thresholds(con, probe.probe_id).view(1, -1, 1, 1)
        want = []
        for ids, codes, scales in acts_store.iter_codes(con, probe.activation_probe, shape):
            for image_id, binary in zip(ids, acts_store.dequantise(codes, scales) > thresholds):
                row = dataset.rows[int(image_id)]
                concepts, masks = dataset.masks(row)
                keep = np.isin(concepts, sorted(pixel))
                masks = torch.from_numpy(masks[keep])
                want.append(packed(SegExample(int(image_id), row.split, binary, concepts[keep], masks)))
    assert len(got) == len(want) == len(dataset.rows)
    assert sum(len(w.active) for w in want) > 0 and sum(len(w.concept_ids) for w in want) > 0
    for g, w in zip(got, want):
        assert (g.image_id, g.split, g.map_shape, tuple(g.mask_shape)) == (
            w.image_id,
            w.split,
            w.map_shape,
            w.mask_shape,
        )
        np.testing.assert_array_equal(g.active, w.active)
        np.testing.assert_array_equal(g.concept_ids, w.concept_ids)
        np.testing.assert_array_equal(g.bits, w.bits)


def test_classification_inputs_are_the_stored_pairs(ingested_db):
    """Labels, splits and usable concepts against a direct reading of the tables, pair by pair."""
    from n2vdb.embed.stage import classification_inputs
    from n2vdb.probe import load
    from n2vdb.store import read_connection

    with read_connection(ingested_db) as con:
        probe = load(con, 1)
        ids, features, labels, is_val, concepts = classification_inputs(con, probe, probe.dataset_id)
        split = dict(con.execute("SELECT image_id, split FROM images").fetchall())
        pairs = set(con.execute("SELECT image_id, concept_id FROM image_concepts").fetchall())
        n_images = con.execute("SELECT count(*) FROM activations WHERE probe_id = ?", [1]).fetchone()[0]
    assert list(ids) == sorted(ids) and len(ids) == n_images == len(features)
    assert is_val.tolist() == [split[int(i)] == "val" for i in ids]
    train = [int(i) for i, v in zip(ids, is_val) if not v]
    want = []
    for c in sorted({c for _, c in pairs}):
        n_pos = sum((i, c) in pairs for i in train)
        if 0 < n_pos < len(train):
            want.append(c)
    assert concepts.tolist() == want and len(want) > 3
    expected = torch.tensor([[(int(i), c) in pairs for c in want] for i in ids])
    assert torch.equal(labels, expected)


def test_keep_columns_compacts_in_place_as_fancy_indexing_would():
    """The usable label columns moved to the front of each row in the matrix's own buffer, a few
    rows at a time, equal matrix[:, keep]; all kept is the matrix itself."""
    from n2vdb.embed.stage import _keep_columns

    rng = np.random.default_rng(5)
    matrix = rng.random((23, 11)) < 0.4
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0], bool)
    expected = matrix[:, keep].copy()
    got = _keep_columns(matrix, keep, rows_at_once=4)
    assert got.flags.c_contiguous and np.shares_memory(got, matrix)
    np.testing.assert_array_equal(got, expected)
    whole = rng.random((5, 3)) < 0.5
    assert _keep_columns(whole, np.ones(3, bool)) is whole
