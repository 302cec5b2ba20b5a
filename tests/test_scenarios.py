"""Scenarios: the splits partition the real data by class and by seed; domain streams transform it."""

import pytest
import torch

from forgetcore import datasets
from forgetcore.continual import Scenario, scenarios


def _rows(ds):
    return {tuple(r.tolist()) for r in ds.tensors[0].flatten(1)}


@pytest.mark.parametrize("mode", ["class", "task"])
def test_split_partitions_classes_and_data(mode):
    s = scenarios.split("digits", n_tasks=5, mode=mode, seed=0)
    assert isinstance(s, Scenario) and len(s) == 5
    assert (s.mode, s.name, s.n_classes, s.input_shape) == (mode, f"split-digits-{mode}", 10, (1, 8, 8))
    assert [t.classes for t in s] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    x, y = datasets.load("digits")
    total = 0
    for i, t in enumerate(s):
        assert t.id == i
        for part in (t.train, t.val, t.test):
            xs, ys = part.tensors
            assert xs.dtype == torch.float32 and ys.dtype == torch.int64
            assert xs.shape[1:] == (1, 8, 8)
            assert set(ys.tolist()) == set(t.classes)  # stratified: every split holds every class
            total += len(ys)
        # the three splits are disjoint (no image appears in two)
        tr, va, te = _rows(t.train), _rows(t.val), _rows(t.test)
        assert not (tr & te) and not (tr & va) and not (va & te)
        n = int(torch.isin(y, torch.tensor(t.classes)).sum())
        assert len(t.train) + len(t.val) + len(t.test) == n
        assert len(t.test) == pytest.approx(0.2 * n, abs=2)
        assert len(t.val) == pytest.approx(0.1 * n, abs=2)
    assert total == len(y)


def test_split_is_fixed_by_seed():
    a, b, c = (scenarios.split(seed=s) for s in (3, 3, 4))
    assert all(torch.equal(p.train.tensors[0], q.train.tensors[0]) for p, q in zip(a, b))
    assert not torch.equal(a[0].train.tensors[0], c[0].train.tensors[0])


def test_split_class_order_and_mnist():
    s = scenarios.split("mnist", n_tasks=2, class_order=[9, 8, 7, 6, 5, 0, 1, 2, 3, 4], seed=1,
                        val_fraction=0.0, test_fraction=0.5)
    assert [t.classes for t in s] == [[9, 8, 7, 6, 5], [0, 1, 2, 3, 4]]
    assert s.input_shape == (1, 28, 28) and len(s[0].val) == 0
    assert sum(len(t.train) + len(t.test) for t in s) == 5000


def test_permuted_keeps_pixels_and_labels():
    s = scenarios.permuted("digits", n_tasks=3, seed=5)
    assert s.mode == "domain" and all(t.classes == list(range(10)) for t in s)
    x0, y0 = s[0].test.tensors
    base = scenarios.split("digits", n_tasks=1, seed=5)[0].test.tensors[0]
    assert torch.equal(x0, base)  # task 0 is the original images
    for t in s[1:]:
        xt, yt = t.test.tensors
        assert torch.equal(yt, y0) and not torch.equal(xt, x0)
        # the same permutation for every image: recover it from one and apply it to all
        assert torch.equal(torch.sort(xt.flatten(1), 1).values, torch.sort(x0.flatten(1), 1).values)
    assert torch.equal(scenarios.permuted(n_tasks=3, seed=5)[2].train.tensors[0], s[2].train.tensors[0])
    assert not torch.equal(scenarios.permuted(n_tasks=3, seed=6)[2].train.tensors[0], s[2].train.tensors[0])


def test_rotated_angles():
    s = scenarios.rotated("digits", n_tasks=3, seed=0, angles=[0, 90, 180])
    x0 = s[0].train.tensors[0]
    assert torch.allclose(s[1].train.tensors[0], torch.rot90(x0, 1, (2, 3)), atol=1e-5)
    assert torch.allclose(s[2].train.tensors[0], torch.rot90(x0, 2, (2, 3)), atol=1e-5)
    d = scenarios.rotated(n_tasks=4)
    x = d[1].test.tensors[0]  # 45 degrees by default for 4 tasks: not a rot90, but mass stays
    assert not torch.allclose(x, d[0].test.tensors[0]) and x.min() >= 0


@pytest.mark.parametrize("call,match,exc", [
    (lambda: scenarios.split("cifar10"), "^dataset: expected one of", ValueError),
    (lambda: scenarios.split(mode="domain"), "^mode: expected 'class' or 'task'", ValueError),
    (lambda: scenarios.split(n_tasks=3), r"^n_tasks: expected a divisor of the 10 classes .*got 3", ValueError),
    (lambda: scenarios.split(n_tasks=0), "^n_tasks: expected an int >= 1", ValueError),
    (lambda: scenarios.split(n_tasks=2.0), "^n_tasks: expected an int", TypeError),
    (lambda: scenarios.split(seed="0"), "^seed: expected an int", TypeError),
    (lambda: scenarios.split(val_fraction=0.5, test_fraction=0.5), "^val_fraction:", ValueError),
    (lambda: scenarios.split(test_fraction=0.0), "^test_fraction:", ValueError),
    (lambda: scenarios.split(class_order=[0, 1, 2]), "^class_order: expected a permutation", ValueError),
    (lambda: scenarios.permuted("svhn"), "^dataset:", ValueError),
    (lambda: scenarios.rotated(n_tasks=2, angles=[0]), r"^angles: expected one angle per task \(2\)", ValueError),
    (lambda: scenarios.rotated(n_tasks=2, angles=[0, float("nan")]), r"^angles\[1\]: expected a finite", ValueError),
])
def test_bad_input(call, match, exc):
    with pytest.raises(exc, match=match):
        call()
