"""GU: first-order retain invariance of one projected step, and the claim in miniature:
on full-class forgetting over digits, at matched forget accuracy, GU + gradient ascent keeps
higher retain accuracy than gradient ascent alone."""

import copy
import statistics
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forgetcore import datasets
from forgetcore.unlearning.gu import GU


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts]).double()


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def batches(s):
    x, y = datasets.load("digits")
    s = s % 10
    r = slice(500 + s * 64, 564 + s * 64)
    return (x[s * 20:(s + 1) * 20], y[s * 20:(s + 1) * 20]), (x[r], y[r])


def step_cosines(gu, n_steps):
    """|cos(delta theta, g_r)| of each actual optimizer step, and of the step Adam would take
    with the denominator GU read (for Adam; equal to the actual one for SGD)."""
    model = small_model()
    params = list(model.parameters())
    opt = gu.make_optimizer(params)
    actual, predicted = [], []
    for s in range(n_steps):
        fb, rb = batches(s)
        opt.zero_grad()
        gu.direction(model, opt, fb, rb)
        g_r = flat(torch.autograd.grad(F.cross_entropy(model(rb[0]), rb[1]), params))
        if isinstance(opt, torch.optim.Adam) and opt.state:
            denom = []
            for p in params:
                st = opt.state[p]
                v_hat = st["exp_avg_sq"] / (1 - 0.999 ** float(st["step"]))
                denom.append(v_hat.sqrt() + 1e-8)
            pred = -flat([p.grad / d for p, d in zip(params, denom)])
        else:
            pred = -flat([p.grad for p in params])
        predicted.append(float((pred @ g_r).abs() / (pred.norm() * g_r.norm())))
        before = flat([p.detach() for p in params])
        opt.step()
        d = flat([p.detach() for p in params]) - before
        actual.append(float((d @ g_r).abs() / (d.norm() * g_r.norm())))
    return actual, predicted


def test_sgd_step_is_orthogonal_to_retain_gradient():
    actual, _ = step_cosines(GU(mode="gu", alpha=0.0, optimizer="sgd", geometry="euclidean", lr=0.1), 10)
    assert max(actual) <= 1e-6, actual
    plain, _ = step_cosines(GU(mode="none", alpha=0.0, optimizer="sgd", geometry="euclidean", lr=0.1), 10)
    assert statistics.median(plain) > 1e-2  # the test can fail: without projection it is not orthogonal


def test_adam_geometry_first_order_invariance():
    actual, predicted = step_cosines(GU(mode="gu", alpha=0.0, optimizer="adam", geometry="adam", lr=1e-3), 30)
    plain, _ = step_cosines(GU(mode="none", alpha=0.0, optimizer="adam", geometry="adam", lr=1e-3), 30)
    # With the denominator GU read, the whitened projection is exact (from the second step on).
    assert max(predicted[1:]) <= 1e-5, predicted
    # The actual step moves Adam's denominator by the new gradient after GU read it, so the
    # invariance only holds approximately. Stated tolerance: median |cos| over steps 10-30 at
    # most 0.1 and at most 0.3 of the unprojected step's.
    med, med_plain = statistics.median(actual[10:]), statistics.median(plain[10:])
    print(f"Adam beta1=0: median |cos(step, g_r)| GU {med:.3f} vs unprojected {med_plain:.3f}")
    assert med <= 0.1 and med <= 0.3 * med_plain


def test_multi_vector_variant_is_orthogonal_to_each_retain_gradient():
    model = small_model()
    params = list(model.parameters())
    gu = GU(mode="multi", geometry="euclidean", optimizer="sgd", alpha=0.0, max_retain_vectors=8)
    fb, rb = batches(1)
    out = gu.direction(model, gu.make_optimizer(params), fb, rb)
    assert out["rank"] == 8
    d = flat([p.grad for p in params])
    for i in range(8):
        gi = flat(torch.autograd.grad(F.cross_entropy(model(rb[0][i:i + 1]), rb[1][i:i + 1]), params))
        assert abs(float(d @ gi)) <= 1e-5 * float(d.norm() * gi.norm())


def test_bad_arguments():
    with pytest.raises(ValueError, match="^mode"):
        GU(mode="x")
    with pytest.raises(ValueError, match="^geometry"):
        GU(mode="multi", geometry="adam")
    with pytest.raises(ValueError, match="^gamma"):
        GU(gamma=0.0)
    model = small_model()
    gu = GU()
    opt = torch.optim.Adam(model.parameters(), betas=(0.9, 0.999))
    fb, rb = batches(0)
    with pytest.raises(ValueError, match="^optimizer: GU's Adam geometry needs beta1 = 0"):
        gu.direction(model, opt, fb, rb)
    with pytest.raises(TypeError, match="^data"):
        gu.fit(model, object())


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    x, y = datasets.load("digits")
    tr, te = datasets.stratified_split(y, [0.8, 0.2], 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        for idx in torch.randperm(len(tr), generator=g).split(64):
            i = tr[idx]
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    return model, x, y, tr, te


def accuracy(model, x, y, idx):
    with torch.no_grad():
        return float((model(x[idx]).argmax(1) == y[idx]).float().mean())


def test_gu_keeps_more_retain_accuracy_than_gradient_ascent_at_matched_forget(trained):
    base, x, y, tr, te = trained
    gains = []
    for cls in (3, 5, 8):
        f_idx, r_idx = tr[y[tr] == cls], tr[y[tr] != cls]
        data = SimpleNamespace(forget=datasets.subset(x, y, f_idx), retain=datasets.subset(x, y, r_idx))
        res = {}
        for mode in ("none", "gu"):  # "none" with alpha = 0 is plain gradient ascent in the same loop
            m = copy.deepcopy(base)
            out = GU(mode=mode, alpha=0.0, lr=1e-3, epochs=50, target_forget_acc=0.05, seed=0).fit(m, data)
            assert out["stopped_at_target"]
            res[mode] = (accuracy(m, x, y, f_idx), accuracy(m, x, y, r_idx), out["steps"])
        print(f"class {cls}: GA forget/retain/steps {res['none']} | GU+GA {res['gu']}")
        assert res["gu"][0] <= 0.05 and res["none"][0] <= 0.05  # matched forget accuracy
        gains.append(res["gu"][1] - res["none"][1])
    assert min(gains) >= 0.0 and statistics.mean(gains) >= 0.005, gains


def test_defaults_follow_the_spec():
    """gamma * P_perp(g_f) + alpha * g_r with gamma = alpha = 1; the multi-vector variant
    gamma = 0.125, alpha = 1, 4 retain vectors (the old default alpha = 0 dropped the retain term)."""
    gu = GU()
    assert (gu.gamma, gu.alpha) == (1.0, 1.0)
    multi = GU(mode="multi", geometry="euclidean")
    assert (multi.gamma, multi.alpha, multi.max_retain_vectors) == (0.125, 1.0, 4)
    # the retain term is in the default direction: it differs from the projected forget gradient alone
    model = small_model()
    params = list(model.parameters())
    fb, rb = batches(2)
    GU(optimizer="sgd", geometry="euclidean").direction(model, torch.optim.SGD(params, lr=0.1), fb, rb)
    with_r = flat([p.grad for p in params])
    GU(optimizer="sgd", geometry="euclidean", alpha=0.0).direction(model, torch.optim.SGD(params, lr=0.1), fb, rb)
    g_r = flat(torch.autograd.grad(F.cross_entropy(model(rb[0]), rb[1]), params))
    assert torch.allclose(with_r - flat([p.grad for p in params]), g_r, atol=1e-6)
