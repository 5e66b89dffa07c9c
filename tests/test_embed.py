"""Stage 3: Net2Vec embeddings against direct computations and planted truths."""

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from n2vdb import api
from n2vdb.embed import classification, segmentation
from n2vdb.embed.examples import SegExample
from n2vdb.embed.stage import sufficiency_grid, top_filters
from n2vdb.probe import TrainSettings


def planted_examples(n=160, k=12, size=7, members=(2, 5, 9), seed=0):
    """Concept 7's mask is the OR of filters `members`; concept 8 is filter 0 alone."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        binary = torch.rand(k, size, size, generator=gen) < 0.12
        union = binary[list(members)].any(0)
        ids, masks = [], []
        if union.any():
            ids.append(7); masks.append(union)
        if binary[0].any():
            ids.append(8); masks.append(binary[0])
        examples.append(SegExample(i, "train" if i % 4 else "val", binary, np.array(ids),
                                   torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)))
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
        fractions = [ex.masks[list(ex.concept_ids).index(concept)].float().mean().item()
                     for ex in examples if ex.split == "train" and concept in ex.concept_ids]
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


def test_joint_training_equals_one_concept_at_a_time():
    """With one batch per epoch, the joint trainer must give each concept exactly the weights that
    training it alone (its own images, alpha and loss) gives."""
    examples = planted_examples(n=24, k=6, size=5, members=(1, 3, 4))
    train = [ex for ex in examples if ex.split == "train"]
    k, lr, epochs, batch = 6, 0.01, 3, len(train)
    joint = segmentation.train(lambda: examples, [7, 8], k, epochs=epochs, lr=lr, batch_size=batch, seed=4)
    init = (torch.rand(k, 2, generator=torch.Generator().manual_seed(4)) * 2 - 1) / np.sqrt(k)
    alpha = segmentation.compute_alpha(lambda: examples, {7: 0, 8: 1})
    for j, concept in enumerate((7, 8)):
        w = init[:, j].clone().requires_grad_()
        optimiser = torch.optim.SGD([w], lr=lr, momentum=0.9)
        for _ in range(epochs):
            optimiser.zero_grad()
            loss = 0
            for ex in train:
                if concept not in ex.concept_ids:
                    continue
                mask = ex.masks[list(ex.concept_ids).index(concept)].float()
                logit = torch.einsum("khw,k->hw", ex.binary.float(), w)
                up = F.interpolate(logit[None, None], size=mask.shape, mode="bilinear", align_corners=True)[0, 0]
                m = torch.sigmoid(up)
                a = alpha[j]
                loss = loss - (a * mask * m + (1 - a) * (1 - mask) * (1 - m)).sum()
            (loss / batch).backward()
            optimiser.step()
        torch.testing.assert_close(joint.weights[:, j], w.detach(), rtol=1e-4, atol=1e-6)


def test_classification_planted_presence():
    gen = torch.Generator().manual_seed(0)
    n, k = 400, 10
    features = torch.rand(n, k, generator=gen)
    labels = torch.stack([features[:, 3] > 0.7, features[:, 6] > 0.4], dim=1)
    is_val = torch.arange(n) % 4 == 0
    result = classification.train(features * 5, labels, is_val, [11, 12], epochs=30)
    assert result.weights[:, 0].abs().argmax().item() == 3
    assert result.weights[:, 1].abs().argmax().item() == 6
    assert (result.val_accuracy > 0.9).all()
    assert (result.val_ap > 0.9).all()


def test_balanced_sample_and_average_precision():
    labels = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 1], [0, 1], [1, 1]], dtype=torch.bool)
    chosen = classification.balanced_sample(labels, torch.Generator().manual_seed(0))
    assert chosen[:, 0].sum() == 4 and chosen[labels[:, 0], 0].all()
    assert chosen[:, 1].sum() == 4 and chosen[~labels[:, 1], 1].all()
    # precision at each positive: 1/1, 2/3 -> AP = (1 + 2/3) / 2
    assert classification.average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == \
        pytest.approx((1 + 2 / 3) / 2)


def test_sufficiency_grid_and_top_filters():
    assert sufficiency_grid(256) == [1, 2, 4, 8, 16, 32, 64, 128]
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
    con = duckdb.connect(str(ingested_db), read_only=True)
    accuracy = con.execute("SELECT avg(val_score) FROM embeddings WHERE kind = 'classification'").fetchone()[0]
    assert accuracy > 0.5


def test_stage_writes_scores_and_sufficiency(tmp_path, synthetic_dir):
    db = tmp_path / "s.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    api.ingest("alexnet", "conv5", db, dataset="synthetic", weights="random", limit=30, workers=0,
               train=TrainSettings(epochs=2, sufficiency=True))
    con = duckdb.connect(str(db), read_only=True)
    grid = con.execute("SELECT kind, list(DISTINCT n_filters ORDER BY n_filters) FROM embeddings GROUP BY kind"
                       " ORDER BY kind").fetchall()
    assert grid == [(kind, [1, 2, 4, 8, 16, 32, 64, 128, 256]) for kind in ("classification", "segmentation")]
    nonzero = con.execute("SELECT n_filters, max(len(list_filter(weights, lambda w: w <> 0))) FROM embeddings"
                          " WHERE kind = 'segmentation' GROUP BY 1 ORDER BY 1").fetchall()
    assert all(count <= f for f, count in nonzero)
    methods = dict(con.execute("SELECT method, count(*) FROM image_concept_scores GROUP BY 1").fetchall())
    assert set(methods) == {"best_filter", "segmentation", "classification"}
    # per-image segmentation scores only on val images containing the concept
    wrong = con.execute("SELECT count(*) FROM image_concept_scores s JOIN images i USING (image_id)"
                        " WHERE s.method = 'segmentation' AND i.split <> 'val'").fetchone()[0]
    assert wrong == 0


def test_packed_cache_round_trips_and_shuffles_like_a_list():
    import random

    from n2vdb.embed.examples import cached

    examples = planted_examples(n=20, k=5, size=6, members=(1, 2, 3))
    packed = cached(lambda: iter(examples))
    assert packed.nbytes < sum(ex.binary.numel() + ex.masks.numel() for ex in examples) / 7
    for original, restored in zip(examples, packed()):
        assert restored.image_id == original.image_id and restored.split == original.split
        assert torch.equal(restored.binary, original.binary) and torch.equal(restored.masks, original.masks)
        assert list(restored.concept_ids) == list(original.concept_ids)
    order = [ex.image_id for ex in packed.train_order(random.Random(3))]
    expected = [ex.image_id for ex in examples if ex.split == "train"]
    random.Random(3).shuffle(expected)
    assert order == expected
    def streamed():
        return iter(examples)
    assert cached(streamed, budget_bytes=100) is streamed  # over budget: streams on every call instead
