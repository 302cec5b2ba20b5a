"""DER++ and refresh learning: the unlearn step by hand, the p(y|x)-weighted Fisher, the loss, state
and resume, bad input, and the delta sweep in miniature (a null result, said plainly)."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from forgetcore.continual import Trainer, scenarios
from forgetcore.continual.refresh import DERpp, Refresh, derpp_plugins, refresh_plugins
from forgetcore.evaluation.continual import summary


def mlp(seed=0, hidden=32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))


class _Ctx:
    def __init__(self, model, batch_size=10):
        self.model = model
        self.trainer = type("T", (), {"batch_size": batch_size})()
        self.scenario = None


def test_unlearn_step_by_hand():
    model = mlp()
    x, y = torch.randn(6, 64), torch.randint(10, (6,))
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    rf = Refresh(delta=1e-2, lr_unlearn=0.01, seed=4)
    rf.fisher = {"1.weight": torch.full_like(ref["1.weight"], 1000.0)}  # damps that tensor by 1/2
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    noise_gen = torch.Generator().manual_seed(4)
    rf.transform_batch(_Ctx(model), {"x": x, "y": y, "n_stream": 6})
    for (n, p), g in zip(model.named_parameters(), grads):
        step = 0.01 * g  # the ascent direction: +lr * grad CE
        u = ref[n].norm() / (step.norm() + 1e-20) * step
        assert torch.allclose(u.norm(), ref[n].norm())  # rescaled per tensor to the tensor's own norm
        damp = 0.5 if n == "1.weight" else 1.0
        want = ref[n] + 1e-2 * damp * (u + 0.001 * torch.randn(p.shape, generator=noise_gen))
        assert torch.allclose(p, want, atol=1e-6), n


class _Spy:
    """After Refresh's transform_batch: the batch and the parameters the learning step starts from."""

    def transform_batch(self, ctx, batch):
        self.batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        self.params = [p.detach().clone() for p in ctx.model.parameters()]
        return batch


def test_unlearn_runs_before_the_learning_step_on_the_same_batch():
    # The official observe() (CL-refresh-learning@7c90da5, models/derpp.py) calls unlearn first: the
    # learning step's gradient, and the logits DER++ stores, are those of the refreshed model.
    sc = scenarios.split("digits", n_tasks=2, mode="class", seed=0)
    model = mlp()
    start = [p.detach().clone() for p in model.parameters()]
    spy = _Spy()
    refresh, der = Refresh(delta=1e-2, seed=3), DERpp(20, seed=3)
    Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.05), [refresh, spy, der], batch_size=10,
            progress=False, eval_every=None, seed=0).fit(sc, max_steps=1)
    assert all(not torch.equal(a, b) for a, b in zip(start, spy.params))  # refreshed before the forward
    probe = mlp()
    with torch.no_grad():
        for q, v in zip(probe.parameters(), spy.params):
            q.copy_(v)
    x, y = spy.batch["x"], spy.batch["y"]
    assert torch.equal(spy.batch["x"], der.buffer.data()["x"])  # the same stream batch
    assert torch.allclose(der.buffer.data()["logits"], probe(x), atol=1e-6)  # logits of the refreshed model
    grads = torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters()))
    for p, v, g in zip(model.parameters(), spy.params, grads):
        assert torch.allclose(p, v - 0.05 * g, atol=1e-6)  # then one plain step from there


def test_weighted_fisher_and_tau():
    model = mlp()
    x, y = torch.randn(7, 64), torch.randint(10, (7,))  # 7 examples, batches of 5: a partial last batch
    task = type("Task", (), {"train": TensorDataset(x, y)})()
    rf = Refresh(tau=0.5)
    rf.after_task(_Ctx(model, batch_size=5), task)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(7):
        logp = F.log_softmax(model(x[i:i + 1]), 1)[0, y[i]]
        gs = torch.autograd.grad(logp, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), gs):
            want[n] += logp.exp().detach() * g.square()
    for n in want:
        assert torch.allclose(rf.fisher[n], want[n] / 10, rtol=1e-4, atol=1e-9), n  # / (2 batches * 5)
    first = {n: f.clone() for n, f in rf.fisher.items()}
    rf.after_task(_Ctx(model, batch_size=5), task)
    for n in want:
        assert torch.allclose(rf.fisher[n], first[n] * 1.5, rtol=1e-5)  # F <- tau F + F_new


def test_derpp_loss_and_buffer():
    model = mlp()
    der = DERpp(capacity=20, alpha=0.3, beta=0.7, seed=1)
    ctx = _Ctx(model)
    x, y = torch.randn(5, 64), torch.randint(10, (5,))
    out = model(x)
    assert torch.equal(der.loss(ctx, {"x": x, "y": y, "n_stream": 5}, out), F.cross_entropy(out, y))
    der.after_step(ctx, {"x": x, "y": y, "n_stream": 5})
    assert len(der.buffer) == 5 and torch.equal(der.buffer.data()["logits"], out.detach())
    x2 = torch.randn(5, 64)
    out2 = model(x2)
    state = der.buffer.state_dict()
    got = der.loss(ctx, {"x": x2, "y": y, "n_stream": 5}, out2)
    der.buffer.load_state_dict(state)  # replay the same two draws
    m1, m2 = der.buffer.sample(5), der.buffer.sample(5)
    want = (F.cross_entropy(out2, y) + 0.3 * F.mse_loss(model(m1["x"]), m1["logits"])
            + 0.7 * F.cross_entropy(model(m2["x"]), m2["y"]))
    assert torch.allclose(got, want)


def test_resume_bit_identical():
    sc = scenarios.split("digits", n_tasks=2, mode="class", seed=0)
    kw = {"epochs": 1, "batch_size": 10, "progress": False, "eval_every": None, "seed": 3}
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.05)  # noqa: E731
    full = Trainer(mlp(), opt, refresh_plugins(1, capacity=50, delta=1e-3), **kw)
    want = full.fit(sc)["R"]
    part = Trainer(mlp(), opt, refresh_plugins(1, capacity=50, delta=1e-3), **kw)
    part.fit(sc, max_steps=80)  # inside task 1: Fisher of task 0 recorded
    assert part.plugins[0].fisher
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    model = mlp(9)
    resumed = Trainer(model, opt, refresh_plugins(1, capacity=50, delta=1e-3), **kw)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.fit(sc)["R"] == want
    for p, q in zip(model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


def test_bad_input():
    with pytest.raises(ValueError, match="^delta"):
        Refresh(delta=-1.0)
    with pytest.raises(ValueError, match="^tau"):
        Refresh(tau=float("nan"))
    with pytest.raises(ValueError, match="^lr_unlearn"):
        Refresh(lr_unlearn=0.0)
    with pytest.raises(ValueError, match="^alpha"):
        DERpp(10, alpha=-0.1)
    with pytest.raises(ValueError, match="^capacity"):
        DERpp(0)
    sc = scenarios.split("digits", n_tasks=2, mode="task", seed=0)
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="^scenario: DERpp"):
        Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), derpp_plugins(0),
                progress=False, eval_every=None).fit(sc)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- the delta sweep in miniature ----------------------------------------------------------------
#
# The spec's setting with the continual demo's training: Split-Digits
# class-IL (5 tasks), MLP 64-128-128-10, SGD lr 0.05, stream batches of 10, buffer 200,
# DER++ alpha 0.1, beta 0.5; refresh with the official tau = 1e-5 and unlearning lr 0.01.
# First version, 5 epochs per task (10.1 s on a quiet machine). Sweep on seeds 0-2 (final average
# accuracy): finetune 0.191; DER++ 0.841 +- 0.002; refresh delta 1e-5: 0.843, 1e-4: 0.844,
# 1e-3: 0.845 +- 0.007, 1e-2: 0.146 (the refresh step destroys the model). Seeds 20-22, fixed before
# they were run: DER++ 0.781 +- 0.057; delta 1e-3: 0.800 +- 0.045 (+0.012 +0.008 +0.037); 1e-2: 0.115.
# Now 3 epochs per task, to fit the CI budget (the only change). Seeds 0-2 first: DER++ 0.717 +- 0.062,
# delta 1e-3 0.716 (-0.001), 1e-2 0.066; the DER++ bound was lowered to 0.6 from those (finetune
# stays near 0.19). Then seeds 20-22, once: DER++ 0.723 +- 0.040; delta 1e-3 0.715 +- 0.030
# (-0.014 +0.005 -0.016); delta 1e-2 0.076 +- 0.036.
# No delta helps beyond the seed spread at either length: a null result at this scale, as the spec
# expected (the paper reports +1-3 points on CIFAR). The test asserts the band all four runs share,
# -0.02 < gain < 0.05, and that the step is live (delta 1e-2 collapses the model), so the null
# result is not an inert plugin.

SEEDS = range(20, 22 + 1)
EPOCHS = 3
ARMS = {"derpp": None, "refresh-1e-3": 1e-3, "refresh-1e-2": 1e-2}


def run_claim(seeds=SEEDS, arms=ARMS):
    sc = scenarios.split("digits", n_tasks=5, mode="class", seed=0)
    rows = []
    for seed in seeds:
        for arm, delta in arms.items():
            plugins = derpp_plugins(seed) if delta is None else refresh_plugins(seed, delta=delta)
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                        torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
            res = Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.05), plugins, epochs=EPOCHS,
                          batch_size=10, progress=False, eval_every=None, seed=seed).fit(sc)
            rows.append({"seed": seed, "arm": arm, "acc": summary(np.array(res["R"]))["acc"]})
    return rows


@pytest.mark.slow
def test_claim_refresh_delta_sweep_is_null_but_live():
    torch.set_num_threads(1)
    rows = run_claim()
    by = {(r["seed"], r["arm"]): r["acc"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    der = np.array([by[s, "derpp"] for s in seeds])
    assert der.mean() > 0.6  # DER++ itself works (finetune stays near 0.19)
    gap = np.array([by[s, "refresh-1e-3"] for s in seeds]) - der
    assert -0.02 < gap.mean() < 0.05, gap  # no harm, no large gain
    big = np.array([by[s, "refresh-1e-2"] for s in seeds])
    assert big.mean() < der.mean() - 0.3, big
    assert all(math.isfinite(a) for a in big)


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    rows = run_claim(eval(sys.argv[1]) if len(sys.argv) > 1 else SEEDS)
    for arm in ARMS:
        v = [r["acc"] for r in rows if r["arm"] == arm]
        print(f"{arm:14s} acc {np.mean(v):.3f} +- {np.std(v):.3f}", np.round(v, 3).tolist())
