"""Continual-evaluation (stability-gap) metrics and MLLM-CTBench metrics on hand-built sequences
with hand-computed answers; the per-iteration evaluation plugin's subsets and resume."""

import math

import pytest
import torch

from forgetcore.continual import Scenario, Trainer, scenarios
from forgetcore.evaluation import continual as m

# Two tasks. Evaluations 0-3 while learning task 0 (the first is the pre-update point), 4-8 while
# learning task 1 (4 is task 1's pre-update point). Task 0 dips from 0.9 to 0.3, recovers to 0.7.
CURVES = {
    "step": [0, 1, 2, 3, 3, 4, 5, 6, 7],
    "task": [0, 0, 0, 0, 1, 1, 1, 1, 1],
    "acc": [[0.1, None], [0.5, None], [0.8, None], [0.9, None],
            [0.9, 0.0], [0.3, 0.4], [0.5, 0.7], [0.6, 0.8], [0.7, 0.9]],
}


def test_min_acc_and_wc_acc():
    # task 0 while task 1 learns: 0.9, 0.3, 0.5, 0.6, 0.7 -> min 0.3 (its own training excluded)
    assert m.min_acc(CURVES, per_task=True) == {0: pytest.approx(0.3)}
    assert m.min_acc(CURVES) == pytest.approx(0.3)
    # WC-ACC: mean of the current task's last accuracy and the previous tasks' minima
    assert m.wc_acc(CURVES) == pytest.approx((0.9 + 0.3) / 2)


def test_windowed_forgetting_and_plasticity():
    # task 0's sequence: 0.1 0.5 0.8 0.9 0.9 0.3 0.5 0.6 0.7
    # w=2 (consecutive pairs): largest drop 0.9->0.3 = 0.6; largest rise 0.1->0.5 = 0.4
    assert m.windowed_forgetting(CURVES, window=2) == pytest.approx(0.6)
    assert m.windowed_plasticity(CURVES, window=2) == pytest.approx(0.4)
    # w=3: drop 0.9->0.3 still 0.6; rise 0.1->0.8 = 0.7
    assert m.windowed_plasticity(CURVES, window=3) == pytest.approx(0.7)
    # w=10 covers everything: rise 0.1 -> 0.9 = 0.8
    assert m.windowed_plasticity(CURVES, window=10) == pytest.approx(0.8)
    # the official code's averaging includes the current task 1: 0.0 .4 .7 .8 .9, no drop, rise 0.9
    assert m.windowed_forgetting(CURVES, window=2, average="all", per_task=True) == {
        0: pytest.approx(0.6), 1: pytest.approx(0.0)}
    assert m.windowed_forgetting(CURVES, window=2, average="all") == pytest.approx(0.3)
    assert m.windowed_plasticity(CURVES, window=10, average="all") == pytest.approx((0.8 + 0.9) / 2)


def test_lca():
    # first 2 evaluations of each task while it learns: task 0 (0.1, 0.5), task 1 (0.0, 0.4)
    assert m.lca(CURVES, beta=2) == pytest.approx((0.3 + 0.2) / 2)
    # beta 5: only task 1 has 5 such evaluations (0, .4, .7, .8, .9)
    assert m.lca(CURVES, beta=5) == pytest.approx(2.8 / 5)
    assert math.isnan(m.lca(CURVES, beta=6))
    s = m.stability_gap(CURVES, window=2, beta=2)
    assert s == pytest.approx({"min_acc": 0.3, "wc_acc": 0.6, "wf": 0.6, "wp": 0.4, "lca": 0.25})


def test_bad_curves_and_arguments():
    with pytest.raises(ValueError, match="^curves"):
        m.min_acc({"acc": [[0.1]]})
    with pytest.raises(ValueError, match="^curves"):
        m.min_acc({"task": [0, 0], "acc": [[0.1]]})
    with pytest.raises(ValueError, match="^curves"):
        m.wc_acc({"task": [0], "acc": [[float("inf")]]})
    with pytest.raises(ValueError, match="^window"):
        m.windowed_forgetting(CURVES, window=1)
    with pytest.raises(ValueError, match="^average"):
        m.windowed_forgetting(CURVES, average="mean")
    with pytest.raises(ValueError, match="^beta"):
        m.lca(CURVES, beta=0)


def test_ctbench_metrics_hand_computed():
    # only the diagonal and the last row are needed (MLLM-CTBench evaluates only those)
    P = [[0.8, None, None], [float("nan"), 0.6, None], [0.5, 0.7, 0.9]]
    out = m.ctbench_metrics(P)
    assert out["AP"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert out["forget"] == pytest.approx([-0.3, 0.1])  # signed: negative is forgetting
    assert out["BWT"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="^P"):
        m.ctbench_metrics([[0.5, 0.1]])
    with pytest.raises(ValueError, match="^P"):
        m.ctbench_metrics([[None, 0.1], [0.2, 0.3]])


def _two_tasks():
    sc = scenarios.split("digits", n_tasks=5, mode="class", seed=0)
    return Scenario(sc.tasks[:2], name="2", mode="class", n_classes=10, input_shape=(1, 8, 8), seed=0)


def _trainer(plugin):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    return Trainer(model, lambda mm: torch.optim.SGD(mm.parameters(), lr=0.05), [plugin], epochs=1,
                   batch_size=32, progress=False, eval_every=None)


def test_continual_evaluation_plugin_fixed_subset_and_resume(tmp_path):
    sc = _two_tasks()
    ev = m.ContinualEvaluation
    full = ev(subset_size=None)
    tr = _trainer(full)
    res = tr.fit(sc)
    c = full.curves
    n0 = len(sc[0].train) // 32 + (len(sc[0].train) % 32 > 0)
    assert c["task"].count(0) == 1 + n0  # the pre-update point plus every step
    assert c["acc"][0][1] is None and c["acc"][-1][1] is not None
    # on the full test set, the last point equals the trainer's own end-of-task accuracy
    assert c["acc"][-1][:2] == pytest.approx(res["R"][-1][:2])
    # a fixed subset is the same at every evaluation; resampling changes it (but is seeded)
    fixed, resampled = ev(subset_size=10, seed=3), ev(subset_size=10, resample=True, seed=3)
    assert torch.equal(fixed._subset(0, 70, 1), fixed._subset(0, 70, 9))
    assert not torch.equal(resampled._subset(0, 70, 1), resampled._subset(0, 70, 9))
    assert torch.equal(resampled._subset(0, 70, 9), ev(subset_size=10, resample=True, seed=3)._subset(0, 70, 9))
    # resume: pause, save, load into a new trainer, continue: same curves as the straight run
    p1 = ev(subset_size=20, resample=True, seed=1)
    t1 = _trainer(p1)
    t1.fit(sc, max_steps=5)
    torch.save(t1.state_dict(), tmp_path / "s.pt")
    p2 = ev(subset_size=20, resample=True, seed=1)
    t2 = _trainer(p2)
    t2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    t2.fit(sc)
    p3 = ev(subset_size=20, resample=True, seed=1)
    _trainer(p3).fit(sc)
    assert p2.curves == p3.curves
    with pytest.raises(ValueError, match="^every"):
        ev(every=0)
    with pytest.raises(TypeError, match="^resample"):
        ev(resample=1)
