"""The IoU stage's label side from decoded label numbers (no per-concept mask) equals the one from masks."""

import numpy as np
import pytest
import torch

from n2vdb.data.broden import LabelMaps
from n2vdb.stats import iou, upsample_patterns
from n2vdb.stats.thresholds import code_cutoffs


def random_maps(rng, shape, n_channels=4) -> LabelMaps:
    """Channels drawing from overlapping label sets (as Broden's two part channels share one), so that
    a label often sits at the same pixel in two channels; one image-level label is also a pixel label."""
    pools = [range(1, 6), range(4, 9), range(4, 9), range(20, 23)][:n_channels]
    channels = []
    for pool in pools:
        codes = rng.choice(list(pool), size=shape).astype(np.int32)
        codes[rng.random(shape) < 0.3] = 0
        channels.append(codes)
    whole = np.array([5, 40], np.int32)
    per_channel = [np.setdiff1d(np.unique(c), [0]).astype(np.int32) for c in channels]
    present = set(np.concatenate(per_channel).tolist()) | set(whole.tolist())
    return LabelMaps(np.array(sorted(present), np.int32), channels, per_channel, whole, shape)


def reference_masks(maps: LabelMaps) -> np.ndarray:
    """OR over channels, one label at a time; all ones for image-level labels."""
    out = []
    for number in maps.ids:
        mask = np.zeros(maps.shape, bool)
        for codes in maps.channels:
            mask |= codes == number
        out.append(mask | (number in maps.whole))
    return np.stack(out)


@pytest.mark.parametrize(
    "layer,shape", [((13, 13), (113, 113)), ((6, 6), (25, 25)), ((8, 8), (12, 31)), ((5, 7), (19, 23))]
)
def test_counts_from_label_numbers_equal_counts_from_masks(layer, shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(3):
        maps = random_maps(rng, shape)
        masks = maps.masks()
        assert np.array_equal(masks, reference_masks(maps))
        from_masks = iou.label_side(torch.from_numpy(masks), layer)
        from_numbers = iou.maps_side(maps, layer)
        assert from_masks.counts is not None and from_numbers.masks is None
        assert from_numbers.counts.dtype == from_masks.counts.dtype
        assert torch.equal(from_numbers.cells, from_masks.cells)
        assert torch.equal(from_numbers.counts, from_masks.counts)
        # The rows left out are exactly the all-zero ones of the dense counts.
        dense = upsample_patterns.label_counts(torch.from_numpy(masks), upsample_patterns.table(*layer, *shape))
        rows = dense.view(-1, 16)
        kept = torch.zeros(len(rows), dtype=torch.bool)
        kept[from_numbers.cells] = True
        assert torch.equal(rows[kept], from_numbers.counts.float()) and not rows[~kept].any()
        assert torch.equal(from_numbers.area, from_masks.area)
        assert torch.equal(from_numbers.area, torch.from_numpy(masks.reshape(len(masks), -1).sum(1)))


def test_no_table_or_no_concepts_falls_back_to_masks():
    rng = np.random.default_rng(0)
    maps = random_maps(rng, (9, 1))  # a 1-pixel side: no pattern table
    side = iou.maps_side(maps, (4, 1))
    assert side.counts is None and torch.equal(side.masks, torch.from_numpy(reference_masks(maps)))
    empty = LabelMaps(
        np.zeros(0, np.int32), [np.zeros((7, 7), np.int32)], [np.zeros(0, np.int32)], np.zeros(0, np.int32), (7, 7)
    )
    side = iou.maps_side(empty, (3, 3))
    assert side.masks.shape == (0, 7, 7) and len(side.area) == 0


def test_pixel_types_reproduce_the_pattern_table():
    """Every pixel's type column is its own on/off column in the table, and types are few."""
    tab, types = upsample_patterns.table(13, 13, 113, 113), upsample_patterns.pixel_types(13, 13, 113, 113)
    assert types.n_types <= 32
    order, on = tab.order.flatten(), tab.on.flatten(0, 1)
    real = order < 113 * 113
    cell = torch.arange(tab.cells).repeat_interleave(tab.order.shape[1])[real]
    key = torch.from_numpy(types.key)[order[real]]
    assert torch.equal(key // types.n_types, cell)
    assert torch.equal(torch.from_numpy(types.values)[key % types.n_types], on[real])


def test_code_cutoffs_threshold_codes_exactly_as_dequantised_values():
    """codes >= cutoffs equals dequantise(codes, scales) > thresholds for every code, with thresholds
    placed exactly on a code's product, one float above it, below zero, and scales from 1e-8 to 1e3."""
    from n2vdb import activations as acts_store

    gen = torch.Generator().manual_seed(0)
    n, k = 500, 8
    codes = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(n, k, 16, 16)
    scales = torch.rand(n, k, generator=gen) * 10.0 ** torch.randint(-8, 4, (n, k), generator=gen).float()
    scales[:5] = 0
    for trial in range(6):
        on_code = torch.randint(0, 256, (k,), generator=gen).float() * scales[trial * 80]
        thresholds = [on_code, torch.nextafter(on_code, torch.full_like(on_code, 1e30)), on_code - 1.0][trial % 3]
        cutoffs = code_cutoffs(scales, thresholds)
        assert cutoffs is not None and cutoffs.min() >= 0 and cutoffs.max() <= 256
        got = (codes >= cutoffs.clamp(max=255).to(torch.uint8)[..., None, None]) & (cutoffs <= 255)[..., None, None]
        assert torch.equal(got, acts_store.dequantise(codes, scales) > thresholds.view(1, -1, 1, 1))
    assert code_cutoffs(scales, thresholds.double()) is None


def test_tally_sums_in_float32_per_batch_equal_integer_sums(tmp_path, monkeypatch):
    """tally adds a batch in float32 where its sums stay below 2^24, else pair by pair in int64: the same totals."""
    import duckdb
    from test_iou import dense_probe

    from n2vdb import probe as probes
    from n2vdb.data.broden import BrodenDataset

    root, db, probe_id = dense_probe(tmp_path, seed=5, n_filters=5, quantile=0.7)
    con = duckdb.connect(str(db), read_only=True)
    probe, dataset = probes.load(con, probe_id), BrodenDataset.open(root)
    thresholds = iou.thresholds_for(con, probe_id, "net2vec")
    fast = iou.tally(con, probe, dataset, thresholds, "net2vec")
    monkeypatch.setattr(iou, "EXACT_FLOAT32", 0)
    exact = iou.tally(con, probe, dataset, thresholds, "net2vec")
    for split in ("train", "val"):
        assert fast.union[split].sum() > 0
        np.testing.assert_array_equal(fast.intersection[split], exact.intersection[split])
        np.testing.assert_array_equal(fast.union[split], exact.union[split])
