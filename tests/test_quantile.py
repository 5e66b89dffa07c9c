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
