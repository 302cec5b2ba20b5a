import pytest
import torch

from forgetcore import datasets


@pytest.mark.parametrize("name,n,hw", [("digits", 1797, 8), ("mnist", 5000, 28)])
def test_embedded_data_is_real_and_scaled(name, n, hw):
    x, y = datasets.load(name)
    assert x.shape == (n, 1, hw, hw) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_unknown_name():
    with pytest.raises(ValueError, match="^name: expected one of"):
        datasets.load("cifar")


def test_stratified_split_is_seeded_disjoint_and_covering():
    _, y = datasets.load("digits")
    a = datasets.stratified_split(y, [0.6, 0.2, 0.2], seed=3)
    b = datasets.stratified_split(y, [0.6, 0.2, 0.2], seed=3)
    c = datasets.stratified_split(y, [0.6, 0.2, 0.2], seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])
    allidx = torch.cat(a)
    assert len(allidx) == len(y) and len(torch.unique(allidx)) == len(y)
    for part, frac in zip(a, [0.6, 0.2, 0.2]):
        counts = torch.bincount(y[part], minlength=10).float()
        assert torch.allclose(counts / torch.bincount(y).float(), torch.full((10,), frac), atol=0.02)


def test_split_fractions_checked():
    with pytest.raises(ValueError, match="^fractions"):
        datasets.stratified_split(torch.zeros(5, dtype=torch.long), [0.5, 0.6], seed=0)
