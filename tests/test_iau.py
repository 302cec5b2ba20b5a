"""IAU: the gradient-restriction penalty, the one-step update as the official code takes it, the
claim in miniature against Retrain, and bad input."""

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from forgetcore.evaluation import unlearning as ev
from forgetcore.unlearning import IAU, Retrain, UnlearnData
from forgetcore.unlearning.iau import gradient_restriction

SEEDS = (0, 1, 2)  # chosen before looking


@pytest.fixture(scope="module")
def setups():
    torch.set_num_threads(1)
    out = {}
    for s in SEEDS:
        data = ev.full_class("digits", 3, s)
        model = ev.train_original(data, "mlp", s, epochs=5)
        ref = copy.deepcopy(model)
        Retrain(seed=s, epochs=5).fit(ref, data)
        out[s] = (data, model, ref)
    return out


def test_penalty_is_the_sum_of_per_tensor_norms_with_double_backprop():
    model = ev.make_model("mlp", (1, 8, 8), 10, 0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss = F.cross_entropy(model(x), y)
    pen = gradient_restriction(0.5)(model, loss)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    per_tensor = sum(float(g.norm()) for g in grads)
    glob = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    assert float(pen.detach()) == pytest.approx(0.5 * per_tensor, rel=1e-5)
    assert abs(per_tensor - glob) > 1e-3  # the test can tell the two norms apart
    hv = torch.autograd.grad(pen, list(model.parameters()))  # second order: the penalty trains the weights
    assert sum(float(h.abs().sum()) for h in hv) > 0


def test_one_step_is_a_fresh_adam_sign_step_and_batching_is_sample_weighted(setups):
    data, model, _ = setups[0]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    IAU().fit(a, data)
    IAU(batch_size=50).fit(b, data)
    params = list(model.parameters())
    xr, yr = data.retain.tensors
    xf, yf = data.forget.tensors
    g = torch.autograd.grad(F.cross_entropy(model(xr), yr) - F.cross_entropy(model(xf), yf), params)
    with torch.no_grad():
        for pa, pb, p0, gi in zip(a.parameters(), b.parameters(), params, g):
            assert torch.allclose(pa, pb, atol=2e-6)
            big = gi.abs() > 1e-5  # Adam's eps (1e-8) only matters for tinier gradients
            step = (pa - p0)[big]
            # a fresh Adam's first step: lr * sign, descending retain loss minus forget loss
            assert torch.allclose(step, -1e-3 * torch.sign(gi[big]), rtol=0.01, atol=1e-7)

def test_claim_forget_accuracy_falls_toward_retrain_while_test_holds(setups):
    """One step (official lr 1e-3) on full-class digits: forget accuracy falls toward Retrain's
    (0 here) by >= 0.1 on every seed, test accuracy within 2 points. The paper's second claim, that
    a GR-trained original lands closer to Retrain after the step, does NOT show at this scale: with
    alpha in {0.005, 0.05, 0.2} the GR model ends no closer (measured, see the issue note), so it is
    not asserted."""
    drops, test_drops = [], []
    for s in SEEDS:
        data, model, ref = setups[s]
        before, after = ev.evaluate(model, data), None
        m = copy.deepcopy(model)
        IAU().fit(m, data)
        after = ev.evaluate(m, data)
        r = ev.evaluate(ref, data)
        assert r["forget_acc"] < after["forget_acc"] < before["forget_acc"] - 0.1
        drops.append(before["forget_acc"] - after["forget_acc"])
        test_drops.append(before["test_acc"] - after["test_acc"])
    print(f"\nIAU forget drop {drops}, test drop {test_drops}")
    assert max(test_drops) <= 0.02 and statistics.mean(drops) >= 0.15


def test_bad_input_leaves_the_model_unchanged(setups):
    data, model, _ = setups[0]
    with pytest.raises(ValueError, match="^lr: "):
        IAU(lr=0.0)
    with pytest.raises(ValueError, match="^batch_size: "):
        IAU(batch_size=0)
    m = copy.deepcopy(model)
    before = [p.clone() for p in m.parameters()]
    x, y = data.forget.tensors
    bad = UnlearnData(forget=TensorDataset(torch.full_like(x, float("nan")), y), retain=data.retain)
    with pytest.raises(ValueError, match="^data: the retain-minus-forget gradient is not finite"):
        IAU().fit(m, bad)
    with pytest.raises(TypeError, match="^data: expected an UnlearnData"):
        IAU().fit(m, (data.forget, data.retain))
    with pytest.raises(TypeError, match="^model: "):
        IAU().fit("model", data)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    with pytest.raises(ValueError, match="^alpha: "):
        gradient_restriction(-1.0)
