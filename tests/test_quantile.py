import numpy as np
import pytest
import torch

from n2vdb.stats.quantile import TopQuantile


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.995, 1.0])
def test_matches_numpy_linear_quantile(q):
    x = torch.relu(torch.randn(37, 6, 4, 5)) * torch.rand(1, 6, 1, 1)
    sketch = TopQuantile(q, 37 * 20)
    for part in x.split(5):
        sketch.add(part)
    expected = np.quantile(x.transpose(0, 1).reshape(6, -1).double().numpy(), q, axis=1)
    np.testing.assert_allclose(sketch.result().numpy(), expected, rtol=0, atol=1e-7)


def test_ties_and_zeros():
    x = torch.zeros(10, 3, 2, 2)
    x[0, 1] = 5.0
    sketch = TopQuantile(0.99, 40)
    sketch.add(x)
    np.testing.assert_allclose(
        sketch.result().numpy(), np.quantile(x.transpose(0, 1).reshape(3, -1).numpy(), 0.99, axis=1)
    )


def test_merge_equals_add_and_state_round_trip():
    x = torch.rand(30, 4, 3, 3)
    whole = TopQuantile(0.95, 270)
    whole.add(x)
    a, b = TopQuantile(0.95, 270), TopQuantile(0.95, 270)
    a.add(x[:11])
    b.add(x[11:])
    restored = TopQuantile.from_state_dict(a.state_dict())
    restored.merge(b)
    assert torch.equal(restored.result(), whole.result())


def test_refuses_incomplete_data():
    sketch = TopQuantile(0.9, 100)
    sketch.add(torch.rand(2, 3, 5, 5))
    with pytest.raises(ValueError, match="expected 100"):
        sketch.result()


@pytest.mark.parametrize("q", [0.5, 0.9, 0.995])
def test_codes_above_the_bound_give_the_result_of_every_value(q):
    """thresholds.add (only the codes above the sketch's bound dequantised, after the first batch)
    equals add() of every dequantised value, and so numpy's quantile; half the images hold few codes (ties)."""
    from n2vdb import activations as acts_store
    from n2vdb.stats.thresholds import add

    gen = torch.Generator().manual_seed(int(q * 1000))
    codes = torch.randint(0, 256, (60, 5, 4, 4), generator=gen, dtype=torch.uint8)
    codes[::2] //= 32  # ties: many equal values
    scales = torch.rand(60, 5, generator=gen) * 10.0 ** torch.randint(-3, 2, (60, 5), generator=gen).float()
    scales[:3, 0] = 0
    fast, dense = TopQuantile(q, 60 * 16), TopQuantile(q, 60 * 16)
    bounded = 0
    for c, s in zip(codes.split(7), scales.split(7)):
        bounded += fast.bound() is not None
        add(fast, c, s)
        dense.add(acts_store.dequantise(c, s))
    assert bounded >= 3
    assert torch.equal(fast.result(), dense.result())
    values = acts_store.dequantise(codes, scales).transpose(0, 1).reshape(5, -1).double().numpy()
    np.testing.assert_array_equal(fast.result().numpy(), np.quantile(values, q, axis=1))


@pytest.mark.parametrize("elements", [1, 64])
def test_selection_a_few_filters_at_a_time_gives_the_same_result(monkeypatch, elements):
    """_select selects over at most _SELECT_ELEMENTS pool values at a time (at least one filter): one
    filter, or a few, at a time give numpy's quantile still, by add() and by add_above()."""
    from n2vdb import activations as acts_store
    from n2vdb.stats import quantile
    from n2vdb.stats.thresholds import add

    monkeypatch.setattr(quantile, "_SELECT_ELEMENTS", elements)
    x = torch.relu(torch.randn(37, 6, 4, 5)) * torch.rand(1, 6, 1, 1)
    sketch = TopQuantile(0.9, 37 * 20)
    for part in x.split(5):
        sketch.add(part)
    expected = np.quantile(x.transpose(0, 1).reshape(6, -1).double().numpy(), 0.9, axis=1)
    np.testing.assert_allclose(sketch.result().numpy(), expected, rtol=0, atol=1e-7)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (40, 5, 4, 4), generator=gen, dtype=torch.uint8)
    scales = torch.rand(40, 5, generator=gen)
    fast = TopQuantile(0.95, 40 * 16)
    for c, s in zip(codes.split(6), scales.split(6)):
        add(fast, c, s)
    values = acts_store.dequantise(codes, scales).transpose(0, 1).reshape(5, -1).double().numpy()
    np.testing.assert_array_equal(fast.result().numpy(), np.quantile(values, 0.95, axis=1))


@pytest.mark.parametrize("candidates", [0, 5, 40])
def test_a_batch_with_many_values_above_the_bound_is_given_in_parts(monkeypatch, candidates):
    """Past thresholds._CANDIDATES values above the bound, a batch goes to the sketch in halves
    (down to one image): more add_above calls, each within the budget where one image allows it,
    and numpy's quantile still."""
    from n2vdb import activations as acts_store
    from n2vdb.stats import thresholds

    monkeypatch.setattr(thresholds, "_CANDIDATES", candidates)
    given: list[int] = []
    original = TopQuantile.add_above

    def counted(self, filters, values, count):
        given.append(len(values))
        return original(self, filters, values, count)

    monkeypatch.setattr(TopQuantile, "add_above", counted)
    gen = torch.Generator().manual_seed(candidates)
    codes = torch.randint(0, 256, (48, 4, 3, 3), generator=gen, dtype=torch.uint8)
    scales = torch.rand(48, 4, generator=gen)
    sketch = TopQuantile(0.8, 48 * 9)
    batches = list(zip(codes.split(16), scales.split(16)))
    for c, s in batches:
        thresholds.add(sketch, c, s)
    values = acts_store.dequantise(codes, scales).transpose(0, 1).reshape(4, -1).double().numpy()
    np.testing.assert_array_equal(sketch.result().numpy(), np.quantile(values, 0.8, axis=1))
    assert len(given) > len(batches) - 1  # the first batch fills the sketch; the others split
    one_image = 4 * 9
    assert all(n <= max(candidates, one_image) for n in given)
    if candidates < one_image:
        assert len(given) >= 2 * (len(batches) - 1)
