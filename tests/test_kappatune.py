"""KappaTune: selection, freezing, cache, state, LoRA mode, bad input, and the claim in miniature."""

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from forgetcore import datasets, spectral
from forgetcore.finetune import KappaTune


def mlp(seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(64, 128), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


HIDDEN = [f"{i}.weight" for i in (0, 2, 4, 6, 8)]


def test_lowest_selection_freezes_everything_else():
    model = mlp()
    kt = KappaTune(model, k=2, progress=False)
    kap = spectral.condition_numbers(model, progress=False)
    assert kt.kappa == kap and len(kap) == 6  # every 2-D weight, head included; no bias
    want = sorted(kap, key=kap.get)[:2]
    assert kt.selected == want
    assert kt.trainable_names() == sorted(want, key=list(kap).index)  # biases frozen too
    hi = KappaTune(mlp(), k=2, select="highest", kappa=kap)
    assert hi.selected == sorted(kap, key=kap.get, reverse=True)[:2]
    r1 = KappaTune(mlp(), k=3, select="random", seed=5, kappa=kap).selected
    assert r1 == KappaTune(mlp(), k=3, select="random", seed=5, kappa=kap).selected
    assert len(set(r1)) == 3
    assert KappaTune(mlp(), fraction=0.5, kappa=kap).k == 3
    assert KappaTune(mlp(), fraction=0.01, kappa=kap).k == 1


def test_trainable_extra_and_report():
    model = mlp()
    kt = KappaTune(model, k=1, include=HIDDEN, trainable_extra=["10"], progress=False)
    assert set(kt.trainable_names()) == {kt.selected[0], "10.weight", "10.bias"}
    assert len(kt.parameters()) == 3
    rep = kt.report()
    assert rep["selected"][0][0] == kt.selected[0] and rep["trainable_parameters"] < rep["total_parameters"]
    KappaTune(mlp(), k=1, trainable_extra="10.bias", kappa=kt.kappa, include=HIDDEN)


def test_conv_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    kt = KappaTune(model, k=2, progress=False)
    assert set(kt.kappa) == {"0.weight", "2.weight", "4.weight"}
    assert all(math.isfinite(v) for v in kt.kappa.values())


def test_kappa_cache_roundtrip(tmp_path):
    path = tmp_path / "kappa.json"
    model = mlp()
    model[2].weight.data[0] = 0.0  # a singular weight: kappa = inf survives the JSON file
    a = KappaTune(model, k=2, kappa=path, progress=False)
    data = json.loads(path.read_text())  # standard JSON: inf is written as "inf"
    assert data["2.weight"] == "inf" and math.isinf(a.kappa["2.weight"])
    b = KappaTune(mlp(), k=2, select="highest", kappa=str(path))  # read back, not recomputed
    assert b.kappa == a.kappa and b.selected[0] == "2.weight"
    with pytest.raises(ValueError, match="^kappa: no value for"):
        KappaTune(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 5)), k=1, kappa=path)


def test_state_dict_roundtrip_with_weights_only():
    kt = KappaTune(mlp(), k=2, select="random", seed=3, include=HIDDEN, trainable_extra=["10"], progress=False)
    buf = io.BytesIO()
    torch.save(kt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = KappaTune(mlp(1), k=1, kappa=kt.kappa, include=HIDDEN)
    other.load_state_dict(state)
    assert other.selected == kt.selected and other.kappa == kt.kappa
    assert other.trainable_names() == kt.trainable_names()
    with pytest.raises(ValueError, match="^state: expected keys"):
        other.load_state_dict({"selected": []})
    bad = dict(state, selected=["nope.weight"])
    with pytest.raises(ValueError, match="^state: selected"):
        other.load_state_dict(bad)
    assert other.selected == kt.selected  # a failed load changes nothing


def test_lora_mode_keeps_the_kappa_order():
    pytest.importorskip("peft")
    model = mlp()
    kap = spectral.condition_numbers(model, progress=False)
    kt = KappaTune(model, k=3, kappa=kap, lora={"r": 4})
    ranked = [n.rsplit(".", 1)[0] for n in sorted(kap, key=kap.get)]
    assert kt.target_modules == ranked[:3]
    names = kt.trainable_names()
    assert names and all("lora_" in n for n in names)
    for m in ranked[:3]:
        assert any(f".{m}.lora_A" in n for n in names)
    for m in ranked[3:]:
        assert not any(f".{m}.lora_A" in n for n in names)
    out = kt.model(torch.randn(2, 64))
    assert out.shape == (2, 10)


def test_bad_input():
    kap = spectral.condition_numbers(mlp(), progress=False)
    with pytest.raises(ValueError, match=r"^k: expected at most 6 \(the eligible weights\), got 7"):
        KappaTune(mlp(), k=7, kappa=kap)
    with pytest.raises(ValueError, match="^k: give exactly one of k and fraction"):
        KappaTune(mlp(), kappa=kap)
    with pytest.raises(ValueError, match="^k: give exactly one"):
        KappaTune(mlp(), k=1, fraction=0.5, kappa=kap)
    with pytest.raises(ValueError, match="^k: expected an int >= 1"):
        KappaTune(mlp(), k=0, kappa=kap)
    with pytest.raises(ValueError, match="^fraction"):
        KappaTune(mlp(), fraction=1.5, kappa=kap)
    with pytest.raises(ValueError, match="^select"):
        KappaTune(mlp(), k=1, select="middle", kappa=kap)
    with pytest.raises(ValueError, match="^model: no parameter"):
        KappaTune(nn.Sequential(nn.LayerNorm(4)), k=1)
    with pytest.raises(ValueError, match="^model: no parameter"):
        KappaTune(nn.Sequential(), k=1)
    with pytest.raises(TypeError, match="^model"):
        KappaTune("gpt2", k=1)
    with pytest.raises(ValueError, match="^trainable_extra: no parameter or module named"):
        KappaTune(mlp(), k=1, kappa=kap, trainable_extra=["head"])
    with pytest.raises(ValueError, match=r"^include: \['0.bias'\] have fewer than 2 dimensions"):
        KappaTune(mlp(), k=1, include=["0.bias"])
    nan = mlp()
    nan[0].weight.data[0, 0] = float("nan")
    before = [p.requires_grad for p in nan.parameters()]
    with pytest.raises(ValueError, match=r"^model_or_tensors\['0.weight'\]: expected finite values"):
        KappaTune(nan, k=1, progress=False)
    assert [p.requires_grad for p in nan.parameters()] == before  # nothing frozen by a failed call


# --- the claim in miniature ----------------------------------------------------------------------
#
# The spec's experiment: a 6-layer MLP (64 -> 128 x 5 -> 10) pretrained on
# digits 0-4, fine-tuned on 5-9 with the same 10-way head trainable in every arm, plus K = 2 of the
# 5 hidden weights chosen by lowest kappa (the paper) or highest kappa, against full fine-tuning.
# Every arm trains (Adam lr 3e-3, batches of 64) until its accuracy on a VALIDATION split of the new
# classes (20 % of their training images, never trained on; logits masked to 5-9) reaches 0.80,
# checked every 5 steps, or 600 steps; so retention is compared at the same new-task accuracy, which
# the paper's comparison requires. Retention = accuracy on the 0-4 test images, logits masked to 0-4
# (with all 10 logits every arm that learns 5-9 falls to ~0 on 0-4: the shared head's bias).
#
# Settings were tuned on seeds 0-4 only; the test runs seeds 20-31, fixed before they were run.
# Measured on seeds 20-31 (python tests/test_kappatune.py prints the table):
#   arm      retention (0-4, masked)  new-task test acc (5-9)  steps to target  reached
#   lowest   0.290 +- 0.115           0.815 +- 0.035           177 +- 44        12/12
#   highest  0.325 +- 0.151           0.793 +- 0.064           398 +- 131       10/12
#   full     0.279 +- 0.068           0.842 +- 0.050           124 +- 33        12/12
#   retention gap lowest - highest: -0.035 +- 0.241 (positive in 7 of 12 seeds); lowest-kappa picked
#   the input layer (0.weight) in 12 of 12 seeds. On the tuning seeds 0-4: gap -0.032, 2 of 5.
# The paper's direction does NOT hold at this scale once the arms are matched on new-task
# accuracy: the earlier version of this test (stopped on training accuracy, 5 seeds) showed a gap of
# 0.13 that came from the seeds and from the arms reaching different new-task accuracy. What does
# hold in every seed set tried: lowest-kappa selection follows depth (it picks the input layer) and
# those weights are more plastic (reach the target in fewer steps than the highest-kappa ones).

SEEDS = range(20, 32)
STEPS, TARGET, K, LR, BATCH, PRETRAIN = 600, 0.8, 2, 3e-3, 64, 150
ARMS = ("lowest", "highest", "full")


def _acc(model, x, y, classes):
    with torch.no_grad():
        z = model(x)[:, classes]
        return (z.argmax(1) + classes[0] == y).float().mean().item()


def _train(model, params, x, y, steps, lr, seed, val=None):
    """Adam on seeded mini-batches; with ``val=(x, y, classes)`` stop once it reaches TARGET
    (checked every 5 steps). Returns the steps taken and whether the target was reached."""
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for s in range(steps + 1):
        if val is not None and s % 5 == 0 and _acc(model, *val) >= TARGET:
            return s, True
        if s == steps:
            break
        if len(order) < BATCH:
            order = torch.cat([order, torch.randperm(len(y), generator=gen)])
        idx, order = order[:BATCH], order[BATCH:]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return steps, val is None


def run_claim(seeds=SEEDS, k=K):
    """Rows (seed, arm, picked, steps, reached, retention, retention_all_logits, new) of the experiment."""
    x, y = datasets.load("digits")
    x = x.flatten(1)
    tr, te = datasets.stratified_split(y, [0.7, 0.3], seed=0)
    old_tr, new_all = tr[y[tr] < 5], tr[y[tr] >= 5]
    fit, val = datasets.stratified_split(y[new_all], [0.8, 0.2], seed=0)
    new_tr, new_val = new_all[fit], new_all[val]
    old_te, new_te = te[y[te] < 5], te[y[te] >= 5]
    old, new = torch.arange(5), torch.arange(5, 10)
    rows = []
    for seed in seeds:
        base = mlp(seed)
        _train(base, base.parameters(), x[old_tr], y[old_tr], PRETRAIN, 2e-3, seed)
        state = base.state_dict()
        kap = spectral.condition_numbers({n: p for n, p in base.named_parameters() if n in HIDDEN}, progress=False)
        for arm in ARMS:
            model = mlp(seed)
            model.load_state_dict(state)
            if arm == "full":
                params, picked = list(model.parameters()), HIDDEN
            else:
                kt = KappaTune(model, k=k, select=arm, seed=seed, include=HIDDEN, kappa=kap,
                               trainable_extra=["10"])
                params, picked = kt.parameters(), kt.selected
            steps, reached = _train(model, params, x[new_tr], y[new_tr], STEPS, LR, seed,
                                    val=(x[new_val], y[new_val], new))
            rows.append({"seed": seed, "arm": arm, "picked": picked, "steps": steps, "reached": reached,
                         "retention": _acc(model, x[old_te], y[old_te], old),
                         "retention_all_logits": _acc(model, x[old_te], y[old_te], torch.arange(10)),
                         "new": _acc(model, x[new_te], y[new_te], new)})
    return rows


@pytest.fixture(scope="module")
def claim_rows():
    torch.set_num_threads(1)
    return run_claim()


def _by(rows):
    return {(r["seed"], r["arm"]): r for r in rows}, sorted({r["seed"] for r in rows})


@pytest.mark.slow  # over 10 s of CPU: see the report
def test_claim_lowest_kappa_follows_depth_and_is_more_plastic(claim_rows):
    by, seeds = _by(claim_rows)
    # Depth: the lowest-kappa pick contains the input layer (64 x 128, the best-conditioned shape).
    assert sum("0.weight" in by[s, "lowest"]["picked"] for s in seeds) >= 0.8 * len(seeds)
    low = np.array([by[s, "lowest"]["steps"] for s in seeds])
    high = np.array([by[s, "highest"]["steps"] for s in seeds])
    full = np.array([by[s, "full"]["steps"] for s in seeds])
    assert (low < high).sum() >= 0.7 * len(seeds), (low, high)
    assert low.mean() < 0.8 * high.mean(), (low, high)
    assert full.mean() < low.mean()  # training everything is the fastest, as expected


@pytest.mark.slow  # over 10 s of CPU: see the report
def test_claim_no_retention_margin_at_matched_new_task_accuracy(claim_rows):
    by, seeds = _by(claim_rows)
    both = [s for s in seeds if by[s, "lowest"]["reached"] and by[s, "highest"]["reached"]]
    assert len(both) >= 0.75 * len(seeds)  # the matching works: most arms reach the target
    new_gap = np.mean([by[s, "highest"]["new"] - by[s, "lowest"]["new"] for s in both])
    assert abs(new_gap) < 0.05, new_gap  # matched: the same new-task test accuracy
    gap = np.array([by[s, "lowest"]["retention"] - by[s, "highest"]["retention"] for s in both])
    # The paper's claim would be gap > 0 with a margin; at matched accuracy it is not there.
    assert gap.mean() < 0.05, gap
    # With all 10 logits, every arm that learns 5-9 forgets 0-4 (the shared head's bias).
    assert np.mean([r["retention_all_logits"] for r in claim_rows]) < 0.1


def test_demo_is_finetune_with_kappa_as_alias():
    from forgetcore.demos import DEMOS, resolve

    assert resolve("kappa") is DEMOS["finetune"] and DEMOS["finetune"].module == "finetune"


def summary(rows):
    """Mean +- std over seeds per arm (the table of the docstring)."""
    out = []
    for arm in ARMS:
        v = [r for r in rows if r["arm"] == arm]
        f = lambda key, v=v: f"{np.mean([r[key] for r in v]):.3f} +- {np.std([r[key] for r in v]):.3f}"  # noqa: E731
        out.append(f"{arm:8s} retention {f('retention')}  new {f('new')}  steps {f('steps')}  "
                   f"reached {sum(r['reached'] for r in v)}/{len(v)}")
    by, seeds = _by(rows)
    gap = np.array([by[s, "lowest"]["retention"] - by[s, "highest"]["retention"] for s in seeds])
    out.append(f"gap lowest - highest: {gap.mean():+.3f} +- {gap.std():.3f}, positive in {(gap > 0).sum()}/{len(gap)}")
    return out


if __name__ == "__main__":  # print the table behind the assertions
    import sys

    torch.set_num_threads(1)
    rows = run_claim(eval(sys.argv[1]) if len(sys.argv) > 1 else SEEDS)
    for r in rows:
        print(r)
    print("\n".join(summary(rows)))

