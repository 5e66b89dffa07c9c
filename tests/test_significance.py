"""The significance arithmetic on its own: the bootstrap weights, the Poisson bootstrap against a
plain resampling bootstrap, the intervals' coverage where the true IoU is known, p-values and
Benjamini-Hochberg q-values against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from n2vdb.significance import null, resample


def test_weights_are_poisson_and_keyed_by_image_not_by_batch():
    ids = np.arange(5000, 25000)
    w = resample.poisson_weights(7, ids, 50).astype(np.float64)
    assert w.mean() == pytest.approx(1.0, abs=0.01) and w.var() == pytest.approx(1.0, abs=0.02)
    assert (w == 0).mean() == pytest.approx(np.exp(-1), abs=0.005)
    # the same image draws the same weights alone, in any order, in any batch
    shuffled = np.random.default_rng(0).permutation(len(ids))
    assert np.array_equal(resample.poisson_weights(7, ids[shuffled], 50), w[shuffled])
    assert np.array_equal(resample.poisson_weights(7, ids[123:124], 50)[0], w[123])
    assert not np.array_equal(resample.poisson_weights(8, ids[:100], 50), w[:100])  # the seed matters
    # replicates of one image, and images of one replicate, are uncorrelated
    assert abs(np.corrcoef(w[:, 0], w[:, 1])[0, 1]) < 0.03
    assert abs(np.corrcoef(w[:-1, 0], w[1:, 0])[0, 1]) < 0.03


def _per_image(rng, n):
    """Per-image (intersection, union) counts: a unit overlapping a label on some images."""
    union = rng.integers(50, 500, n).astype(np.float64)
    rate = np.where(rng.random(n) < 0.3, rng.beta(2, 6, n), 0.0)
    return rng.binomial(union.astype(np.int64), rate).astype(np.float64), union


def _poisson_ratio_replicates(inter, union, ids, seed, replicates):
    """The replicates of one ratio, as the stage's sums make them (resample.RatioSums)."""
    sums = resample.RatioSums(1, replicates, seed)
    sums.add(np.zeros(len(ids), np.int64), ids, torch.from_numpy(inter), torch.from_numpy(union))
    assert sums.estimates()[0] == pytest.approx(inter.sum() / union.sum())
    return sums.replicate_ratios()[0]


def test_poisson_bootstrap_agrees_with_resampling_images():
    rng = np.random.default_rng(1)
    inter, union = _per_image(rng, 400)
    poisson = _poisson_ratio_replicates(inter, union, np.arange(400), 3, 4000)
    # the plain bootstrap: draw 400 images with replacement, 4000 times
    draws = rng.integers(0, 400, (4000, 400))
    plain = inter[draws].sum(axis=1) / union[draws].sum(axis=1)
    lo_p, hi_p = resample.percentile_interval(poisson, 0.95)
    lo_b, hi_b = np.quantile(plain, [0.025, 0.975])
    width = hi_b - lo_b
    assert abs(lo_p - lo_b) < 0.08 * width and abs(hi_p - hi_b) < 0.08 * width
    assert poisson.std() == pytest.approx(plain.std(), rel=0.06)


def test_percentile_intervals_cover_a_known_iou_at_their_level():
    """1,000 simulated datasets of 300 images whose population IoU, E[I] / E[U], is 0.075 exactly:
    rate 0 on 70% of images, Beta(2, 6) (mean 1/4) on the rest, independent of the union."""
    truth = 0.3 * 0.25
    rng = np.random.default_rng(2)
    covered = []
    for sim in range(1000):
        inter, union = _per_image(rng, 300)
        reps = _poisson_ratio_replicates(inter, union, sim * 1000 + np.arange(300), 0, 200)
        lower, upper = resample.percentile_interval(reps, 0.95)
        covered.append(lower <= truth <= upper)
    assert 0.92 <= np.mean(covered) <= 0.98


def test_percentile_interval_ignores_undefined_replicates():
    reps = np.array([[np.nan] * 4, [np.nan, 1.0, 2.0, 3.0]])
    lower, upper = resample.percentile_interval(reps, 0.5)
    assert np.isnan(lower[0]) and np.isnan(upper[0])
    assert (lower[1], upper[1]) == (1.5, 2.5)


def test_q_values_are_benjamini_hochberg():
    rng = np.random.default_rng(4)
    p = np.r_[rng.random(40), rng.random(10) * 1e-3, np.nan]
    q = resample.bh_q_values(p)
    assert np.isnan(q[-1])
    tested = p[:-1]
    m = len(tested)
    for alpha in (0.01, 0.05, 0.2):
        # BH's step-up rule: reject the k smallest, k the largest with p_(k) <= k alpha / m
        ordered = np.sort(tested)
        passing = np.flatnonzero(ordered <= np.arange(1, m + 1) * alpha / m)
        k = passing[-1] + 1 if len(passing) else 0
        assert (q[:-1] <= alpha).sum() == k
    assert np.all(q[:-1] >= tested) and np.all(q[:-1] <= 1)


def test_monte_carlo_p_is_never_zero():
    assert resample.monte_carlo_p(np.array([0, 9]), 9).tolist() == [0.1, 1.0]


def test_null_counts_compare_fractions_exactly():
    # observed 1/3 (S 1, A 4); draws 1/3 (S 2, A 8: a tie counts), 1/4 (S 1, A 5) and 1/2 (S 1, A 3)
    counts = null.NullCounts(np.array([[1, 2, 1, 1]]), np.array([[4, 8, 5, 3]]))
    assert counts.exceed().tolist() == [2]
    assert counts.observed().tolist() == [1 / 3]
    assert counts.null_mean().tolist() == pytest.approx([(1 / 3 + 1 / 4 + 1 / 2) / 3])


def test_block_permutations_are_reproducible_permutations():
    p = null.block_permutations(3, 5, 200, 7)
    assert np.array_equal(p, null.block_permutations(3, 5, 200, 7))
    assert all(sorted(row) == list(range(7)) for row in p.tolist())
    assert not np.array_equal(p, null.block_permutations(3, 6, 200, 7))
    # uniform: each image goes to each position about equally often
    assert np.abs(np.bincount(p[:, 0], minlength=7) / 200 - 1 / 7).max() < 0.07


@pytest.mark.parametrize(
    ("h", "w", "sh", "sw"), [(13, 13, 113, 113), (7, 9, 30, 41), (14, 14, 112, 112), (1, 6, 4, 20)]
)
def test_unit_masks_from_cell_patterns_are_the_upsampled_masks(h, w, sh, sw):
    from n2vdb.formulas.masks import pack, words
    from n2vdb.stats.iou import filter_masks

    gen = torch.Generator().manual_seed(h * w)
    values = torch.rand(6, h, w, generator=gen)
    thresholds = torch.full((6,), 0.8)
    bits, area = null._unit_masks(values, thresholds, (sh, sw), words(sh * sw))
    expected = filter_masks(values[None], thresholds, (sh, sw), "net2vec")[0].numpy()
    assert np.array_equal(bits, pack(expected, words(sh * sw)))
    assert area.tolist() == expected.reshape(6, -1).sum(axis=1).tolist()
