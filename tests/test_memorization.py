"""Feldman-Zhang memorisation/influence estimator: the masked mean differences, planted atypical
(mislabelled) digits get the highest scores, and the process pool gives identical results."""

import functools

import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from forgetcore import datasets
from forgetcore.evaluation import memorization as mz

SEEDS = (0, 1, 2)  # chosen before looking


def test_estimate_matches_the_definition():
    masks = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    corr = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0]], dtype=torch.bool)
    test = torch.tensor([[1], [0], [0], [1]], dtype=torch.bool)
    out = mz.estimate(masks, corr, test)
    # example 0: in runs 0,1 (correct 1,1) -> 1; out runs 2,3 (0,1) -> 0.5
    assert out["mem"][0] == pytest.approx(0.5)
    # example 1: in runs 1,2 (1,1) -> 1; out runs 0,3 (0,0) -> 0
    assert out["mem"][1] == pytest.approx(1.0)
    # influence of example 0 on the test point: in runs 0,1 -> 0.5; out runs 2,3 -> 0.5
    assert out["infl"].shape == (1, 2) and out["infl"][0, 0] == pytest.approx(0.0)
    assert out["infl"][0, 1] == pytest.approx(0.0 - 1.0)
    assert out["held_out"].tolist() == [2, 2]
    m = mz.subset_masks(50, 10, 0.7, seed=3)
    assert m.shape == (10, 50) and (m.sum(1) == 35).all()
    assert torch.equal(m, mz.subset_masks(50, 10, 0.7, seed=3)) and not torch.equal(m, mz.subset_masks(50, 10, 0.7, 4))


def test_claim_mislabelled_digits_get_the_highest_memorisation():
    """Digits with 5 % of training labels flipped; 1-NN (interpolates), 100 runs at ratio 0.7.
    Measured: mislabelled mem 0.98-1.00, the rest 0.06-0.07, 87-94 % of the top-k are the flipped ones."""
    x, y = datasets.load("digits")
    for s in SEEDS:
        tr, _ = datasets.stratified_split(y, (0.6, 0.4), s)
        yn, flipped = mz.noisy_labels(y[tr], 0.05, s)
        r = mz.memorization(x[tr], yn, KNeighborsClassifier(1), n_runs=100, seed=s)
        mem = r["mem"]
        print(f"\nseed {s}: mislabelled {float(mem[flipped].mean()):.3f}, others {float(mem[~flipped].mean()):.3f}, "
              f"top-k planted {mz.top_fraction(mem, flipped):.3f}")
        assert float(mem[flipped].mean()) >= 0.9 and float(mem[~flipped].mean()) <= 0.15
        assert mz.top_fraction(mem, flipped) >= 0.8
        assert int(r["held_out"].min()) >= 10  # every example was left out often enough


def test_process_pool_gives_identical_results_to_the_sequential_loop():
    x, y = datasets.load("digits")
    x = x[:120].reshape(120, -1)
    y = y[:120]
    factory = functools.partial(nn.Linear, 64, 10)  # picklable for spawned workers
    kw = dict(x_test=x[:10], y_test=y[:10], n_runs=4, recipe={"epochs": 2, "batch_size": 32}, chunk_runs=2, seed=1)
    seq = mz.memorization(x, y, factory, workers=1, **kw)
    par = mz.memorization(x, y, factory, workers=2, **kw)
    for k in ("mem", "infl", "train_correct", "test_correct", "masks"):
        assert torch.equal(seq[k], par[k]), k
    assert seq["infl"].shape == (10, 120)
    # runs differ from each other (initialisation and order are part of the algorithm)
    assert not all(torch.equal(seq["train_correct"][0], seq["train_correct"][j]) for j in range(1, 4))


def test_bad_input():
    x, y = datasets.load("digits")
    with pytest.raises(ValueError, match="^ratio: "):
        mz.subset_masks(10, 2, 1.0)
    with pytest.raises(ValueError, match="^n_runs: "):
        mz.subset_masks(10, 0)
    with pytest.raises(ValueError, match="^y: expected a 1-D tensor"):
        mz.memorization(x[:10], y[:9], KNeighborsClassifier(1))
    with pytest.raises(TypeError, match="^y: expected integer labels"):
        mz.memorization(x[:10], y[:10].float(), KNeighborsClassifier(1))
    with pytest.raises(ValueError, match="^x: expected finite"):
        mz.memorization(torch.full((10, 64), float("nan")), y[:10], KNeighborsClassifier(1))
    with pytest.raises(TypeError, match="^model: expected a scikit-learn estimator"):
        mz.memorization(x[:10], y[:10], 3)
    with pytest.raises(ValueError, match="^x_test: pass x_test and y_test together"):
        mz.memorization(x[:10], y[:10], KNeighborsClassifier(1), x_test=x[:3])
    with pytest.raises(ValueError, match="^workers: "):
        mz.memorization(x[:10], y[:10], KNeighborsClassifier(1), workers=0)
    with pytest.raises(ValueError, match="^masks: expected a 2-D bool"):
        mz.estimate(torch.ones(2, 2), torch.ones(2, 2))
