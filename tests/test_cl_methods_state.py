"""Issue 12's methods: exact resume from state_dict (torch.load weights_only), bad input named,
nothing half-changed when a method raises; herding and the View-Batch sampler; SCoLe's generator
statistics."""

import contextlib
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from forgetcore.continual import (
    ER,
    UER,
    WA,
    LogitMask,
    PowerLawRehearsal,
    Scenario,
    SCoLeReplay,
    Trainer,
    ViewBatch,
    scenarios,
)
from forgetcore.replay import PowerLawScheduler, herding, herding_per_class, view_batch_indices


@pytest.fixture(scope="module")
def split3():
    sc = scenarios.split("digits", n_tasks=5, mode="class", seed=0)
    return Scenario(sc.tasks[:3], name="3", mode="class", n_classes=10, input_shape=(1, 8, 8), seed=0)


def mlp(bias_head=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10, bias=bias_head))


def trainer(model, plugins, batch_size=16, epochs=2):
    return Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), plugins,
                   epochs=epochs, batch_size=batch_size, seed=3, progress=False, eval_every=None)


METHODS = {
    "UER": (lambda: [UER(40, seed=1)], False, 16),
    "UER-cosine": (lambda: [UER(40, seed=1, inference="cosine")], False, 16),
    "WA": (lambda: [WA(memory=30)], False, 16),
    "ViewBatch": (lambda: [ER(30, seed=1), ViewBatch(4)], True, 16),
    "PowerLaw": (lambda: [PowerLawRehearsal(40, seed=2)], True, 16),
    "SCoLeReplay": (lambda: [SCoLeReplay("random", budget=1.0, seed=1), LogitMask()], True, 16),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_is_bit_identical(name, split3, tmp_path):
    make, bias, bs = METHODS[name]
    straight = trainer(mlp(bias), make(), bs)
    r1 = straight.fit(split3)
    steps = r1["steps"]
    paused = trainer(mlp(bias), make(), bs)
    paused.fit(split3, max_steps=steps // 2 + 3)  # inside the second task
    torch.save(paused.state_dict(), tmp_path / "s.pt")
    resumed = trainer(mlp(bias), make(), bs)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    r2 = resumed.fit(split3)
    assert r2["R"] == r1["R"]
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_bad_arguments_are_named():
    cases = [
        (lambda: UER(10, tau=0), ValueError, "^tau"), (lambda: UER(10, inference="x"), ValueError, "^inference"),
        (lambda: WA(memory=0), ValueError, "^memory"), (lambda: WA(align="l3"), ValueError, "^align"),
        (lambda: WA(clip=1), TypeError, "^clip"), (lambda: WA(temperature=-1), ValueError, "^temperature"),
        (lambda: ViewBatch(0), ValueError, "^repeat"), (lambda: ViewBatch(views="strong"), ValueError, "^views"),
        (lambda: ViewBatch(kl_reduction="sum"), ValueError, "^kl_reduction"),
        (lambda: PowerLawRehearsal(10, schedule="x"), ValueError, "^schedule"),
        (lambda: PowerLawRehearsal(scheduler="x"), TypeError, "^scheduler"),
        (lambda: SCoLeReplay("often"), ValueError, "^mode"), (lambda: SCoLeReplay(low=2), ValueError, "^low"),
        (lambda: herding(torch.ones(3), 1), ValueError, "^features"),
        (lambda: herding(torch.tensor([[float("nan")]]), 1), ValueError, "^features"),
        (lambda: herding(torch.ones(3, 2, dtype=torch.long), 1), TypeError, "^features"),
        (lambda: herding(torch.ones(3, 2), -1), ValueError, "^m"),
        (lambda: herding_per_class(torch.ones(3, 2), torch.zeros(2, dtype=torch.long), 1), ValueError, "^labels"),
        (lambda: view_batch_indices(0, 0, 1), ValueError, "^n"),
        (lambda: view_batch_indices(3, 0, 4), ValueError, "^repeat"),
        (lambda: scenarios.scole_classes(10, 10, 11), ValueError, "^classes_per_task"),
        (lambda: scenarios.scole_classes(10, 10, 6, forgetting_probe=True), ValueError, "^classes_per_task"),
        (lambda: scenarios.scole_probabilities(10, -1), ValueError, "^entropy_decrease"),
    ]
    for make, exc, match in cases:
        with pytest.raises(exc, match=match):
            make()


def test_methods_that_raise_change_nothing(split3):
    # UER and WA need a bias-free head: they refuse before the first step, the model untouched
    for plugin in (UER(10), WA(memory=10)):
        model = mlp(bias_head=True)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="^model"):
            trainer(model, [plugin]).fit(split3)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # View-Batch needs batches that hold whole groups of R copies
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="^repeat"):
        trainer(model, [ViewBatch(4)], batch_size=10).fit(split3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a power-law plugin that already followed another stream refuses a fresh one; its state stays
    pl = PowerLawRehearsal(10)
    pl.scheduler.step()
    state = pl.scheduler.state_dict()
    with pytest.raises(ValueError, match="^scheduler"):
        trainer(mlp(), [pl]).fit(split3)
    assert pl.scheduler.state_dict()["phase"] == state["phase"] and pl.history == []


def test_uer_inference_choice_and_losses(split3):
    model = mlp(bias_head=False)
    uer = UER(40, seed=0, inference="cosine")
    trainer(model, [uer], epochs=1).fit(split3)
    x = split3[0].test.tensors[0][:5]
    model.eval()
    with torch.no_grad():
        out = model(x)
        h = model[:-1](x)
        cos = torch.nn.functional.normalize(h, dim=1) @ torch.nn.functional.normalize(model[-1].weight, dim=1).t()
    assert torch.allclose(out, cos / 0.09, atol=1e-5)  # eval mode: angle-only logits
    model.train()
    with torch.no_grad():
        assert torch.allclose(model(x), h @ model[-1].weight.t(), atol=1e-5)  # training: the dot product
    uer.detach()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), h @ model[-1].weight.t(), atol=1e-5)


def test_wa_memory_clipping_and_alignment(split3):
    model = mlp(bias_head=False)
    wa = WA(memory=30)
    trainer(model, [wa]).fit(split3)
    assert wa.seen == [0, 1, 2, 3, 4, 5]
    assert sorted(torch.bincount(wa.mem_y, minlength=6).tolist()) == [5] * 6  # 30 // 6 per class
    w = model[-1].weight.detach()
    assert float(w.min()) >= 0  # clipped
    assert float(w[6:].abs().sum()) == 0  # unseen classes' rows stay zero
    assert len(wa.gammas) == 2 and all(0 < g <= 1 for g in wa.gammas)  # official: gamma capped at 1
    # official norm ratio: L1, mean over old rows / mean over new rows
    n1 = w.detach().abs().sum(1)
    assert WA.norm_ratio(w, [0, 1, 2, 3], [4, 5], 1.0) == pytest.approx(float(n1[:4].mean() / n1[4:6].mean()))


def test_herding_picks_the_mean_matching_prefix():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(50, 8, generator=g)
    idx = herding(f, 10)
    assert len(set(idx.tolist())) == 10
    assert torch.equal(herding(f, 4), idx[:4])  # prefixes are herding selections
    # the first pick is the normalised row nearest to the normalised mean
    fn = f / f.norm(dim=1, keepdim=True)
    assert int(idx[0]) == int(((fn - fn.mean(0)) ** 2).sum(1).argmin())
    # herding's running mean approaches the class mean faster than a random prefix
    err_h = (fn[idx[:5]].mean(0) - fn.mean(0)).norm()
    err_r = (fn[:5].mean(0) - fn.mean(0)).norm()
    assert err_h < err_r
    assert len(herding(f, 100)) == 50 and len(herding(f[:0], 3)) == 0
    per = herding_per_class(f, torch.arange(50) % 3, 4)
    assert sorted(per) == [0, 1, 2] and all(len(v) == 4 and (v % 3 == c).all() for c, v in per.items())


def test_view_batch_sampler_pitfalls():
    n, r = 37, 4
    block = [view_batch_indices(n, e, r, seed=5) for e in range(r)]
    for idx in block:
        assert len(idx) == (n // r) * r  # equal compute, whole groups only
        g = idx.view(-1, r)
        assert (g == g[:, :1]).all()  # every example's R copies are consecutive
    uniq = torch.cat([b.view(-1, r)[:, 0] for b in block])
    assert len(set(uniq.tolist())) == len(uniq)  # each example once per R-epoch block (it rests)
    assert len(uniq) >= n - (r - 1)
    nxt = view_batch_indices(n, r, r, seed=5)  # a new block: a new permutation
    assert not torch.equal(nxt, block[0])
    assert torch.equal(view_batch_indices(n, 2, r, seed=5), block[2])  # a function of (seed, epoch)
    plain = view_batch_indices(n, 0, 1, seed=5)
    assert sorted(plain.tolist()) == list(range(n))
    # the plugin: noise level follows each copy's position in its group (not label runs)
    vb = ViewBatch(4, alpha=0.2)
    assert vb._levels(8).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_scole_generator_statistics():
    t, c, k = 3000, 10, 2
    plan = scenarios.scole_classes(t, c, k, seed=0)
    assert all(len(set(p)) == k for p in plan)
    freq = np.bincount(np.concatenate(plan), minlength=c) / t
    assert np.allclose(freq, k / c, atol=0.03)  # balanced
    p = scenarios.scole_probabilities(c, 2.0, seed=0)
    assert p.sum() == pytest.approx(1.0) and p.max() / p.min() > 3
    skew = np.bincount(np.concatenate(scenarios.scole_classes(t, c, k, entropy_decrease=2.0, seed=0)), minlength=c)
    assert np.corrcoef(skew, p)[0, 1] > 0.95  # drawn in proportion to the skewed distribution
    probe = scenarios.scole_classes(200, c, k, forgetting_probe=True, seed=1)
    assert all(max(cl) < c // 2 for cl in probe[101:]) and max(max(cl) for cl in probe[:100]) >= c // 2
    assert scenarios.scole_classes(50, c, k, seed=3) == scenarios.scole_classes(50, c, k, seed=3)
    # prob_reduction makes immediate repeats rarer than without it
    def repeats(pl):
        return np.mean([len(set(a) & set(b)) for a, b in itertools.pairwise(pl)])
    assert repeats(scenarios.scole_classes(t, c, k, prob_reduction=4.0, seed=0)) < repeats(plan) - 0.1
    sc = scenarios.scole("digits", n_tasks=20, seed=0)
    assert len(sc) == 20 and all(t.test is sc[0].test for t in sc)  # one shared full test set
    assert all(set(t.train.tensors[1].tolist()) == set(t.classes) for t in sc)


def test_logit_mask_and_scole_replay_units():
    out = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.1, 4.0]], requires_grad=True)
    batch = {"y": torch.tensor([0, 1])}
    loss = LogitMask().loss(None, batch, out)
    ref = torch.nn.functional.cross_entropy(out[:, :2], batch["y"])
    assert float(loss.detach()) == pytest.approx(float(ref.detach()))
    sc = scenarios.scole("digits", n_tasks=30, seed=0)
    rp = SCoLeReplay("frequency", per_class=20, low=0.0, high=1.0)
    trainer(mlp(), [rp, LogitMask()], epochs=1, batch_size=64).fit(sc)
    assert all(len(m["y"]) <= 20 for m in rp.memory.values())
    assert all(not set(r) & set(t.classes) for r, t in zip(rp.replayed, sc))  # never the current classes
    assert any(rp.replayed[10:])  # frequency replay kicks in once classes were seen 3 times
    assert sum(rp.occurrences.values()) == 60


def test_power_law_plugin_counts_follow_the_scheduler(split3):
    pl = PowerLawRehearsal(30, seed=0)
    trainer(mlp(), [pl], epochs=1).fit(split3)
    ref = PowerLawScheduler(30, seed=0)
    assert pl.history == [ref.step() for _ in range(3)]
    assert pl.history[2] == [12, 18]  # (2+1)^-1 : (1+1)^-1 of 30


def test_er_with_view_batch_stores_each_example_once(split3):
    er = ER(1000, seed=0)
    one = Scenario(split3.tasks[:1], name="1", mode="class", n_classes=10, input_shape=(1, 8, 8), seed=0)
    trainer(mlp(), [er, ViewBatch(4)], epochs=1).fit(one)
    n = len(one[0].train)
    assert er.buffer.seen == n // 4  # one epoch serves n // 4 examples, four copies each
    x = er.buffer.data()["x"]
    assert len(torch.unique(x.flatten(1), dim=0)) == len(x)  # no duplicates, no noisy copies
    train = one[0].train.tensors[0].flatten(1)
    assert all(bool((train == row).all(1).any()) for row in x.flatten(1))


def test_view_batch_consistency_loss_matches_kl_div():
    torch.manual_seed(0)
    sc = scenarios.split("digits", n_tasks=5, mode="class", seed=0)
    ctx = type("C", (), {"scenario": sc, "task_id": 1, "epoch": 3})()
    out = torch.randn(8, 10)
    batch = {"y": torch.tensor([0, 0, 0, 0, 2, 2, 2, 2]), "n_stream": 8}
    seen = [0, 1, 2, 3]
    logp = torch.log_softmax(out[:, seen].view(2, 4, 4), dim=2)
    ce = torch.nn.functional.cross_entropy(out, batch["y"])
    for red in ("mean", "batchmean"):
        vb = ViewBatch(4, kl_reduction=red, ssl_weight=0.5)
        with pytest.warns(UserWarning) if red == "mean" else contextlib.nullcontext():
            ref = sum(torch.nn.functional.kl_div(logp[:, v], logp[:, 0].exp(), reduction=red) for v in range(1, 4))
        assert float(vb.loss(ctx, batch, out)) == pytest.approx(float(ce + 0.5 * ref / 4), rel=1e-5)
    assert float(ViewBatch(4, ssl=False).loss(ctx, batch, out)) == pytest.approx(float(ce))
    assert float(ViewBatch(4, ssl_start=5).loss(ctx, batch, out)) == pytest.approx(float(ce))  # epoch 3 < 5


@pytest.mark.parametrize("schedule", ["power", "exponential", "uniform"])
def test_power_law_controls_rehearse_the_same_total(schedule, split3):
    pl = PowerLawRehearsal(30, schedule=schedule, seed=0)
    trainer(mlp(), [pl], epochs=1).fit(split3)
    assert [sum(h) for h in pl.history] == [0, 30, 30]  # matched budget per phase
    assert all(len(i) == n for i, n in zip(pl.indices, pl.history[-1]))
