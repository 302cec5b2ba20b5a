"""GeRe: the margin loss, frozen references, the k-per-batch sampler through the Trainer's
batch_indices hook, state and resume, bad input, and the claim in miniature."""

import io

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from forgetcore import datasets
from forgetcore.continual import Scenario, Task, Trainer
from forgetcore.finetune import GeRe, GeReCallback, GeRePlugin
from forgetcore.finetune.losses import threshold_margin_loss


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


FEATURES = "4"  # the penultimate activations (after the second ReLU)


def test_margin_loss_regions_and_normaliser():
    pos, neg = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0])
    ref = torch.tensor([[2.0, 0.0], [-2.0, 0.5]])  # POS, NEU / NEG, NEU
    assert threshold_margin_loss(ref.clone(), ref, pos, neg) == 0
    pred = torch.tensor([[0.5, 0.0], [-2.0, 3.0]])  # POS violated by 0.5, NEU violated by 2
    assert torch.isclose(threshold_margin_loss(pred, ref, pos, neg), torch.tensor((0.5 + 2.0) / 2))
    pred = torch.tensor([[5.0, -0.9], [-0.5, 0.0]])  # inside POS, inside NEU, NEG violated by 0.5
    assert torch.isclose(threshold_margin_loss(pred, ref, pos, neg), torch.tensor(0.5))
    mask = torch.tensor([1.0, 0.0])
    assert threshold_margin_loss(pred, ref, pos, neg, mask) == 0
    with pytest.raises(ValueError, match="^pred"):
        threshold_margin_loss(pred[:1], ref, pos, neg)
    with pytest.raises(ValueError, match="^pos_thr"):
        threshold_margin_loss(pred, ref, pos[:1], neg)
    with pytest.raises(ValueError, match="^mask"):
        threshold_margin_loss(pred, ref, pos, neg, torch.ones(3))


def test_references_frozen_and_tm_zero_at_step_zero():
    x, y = datasets.load("digits")
    model = mlp()
    gere = GeRe(x[:50].flatten(1), y[:50], features=FEATURES, w="dy")
    gere.prepare(model)
    h = torch.stack(gere.ref)
    assert h.shape == (50, 128)
    assert torch.allclose(gere.pos_thr, h.mean(0) + h.std(0, unbiased=False), atol=1e-5)
    batch = {"x": x[:10].flatten(1), "y": y[:10], "task": -torch.arange(1, 11)}
    out = model(batch["x"])
    assert gere.penalty(model, batch, out) == 0  # exactly 0 at step 0, by construction
    loss = gere.loss(model, batch, out)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(out, batch["y"]))
    with torch.no_grad():
        model[3].weight.add_(0.5)  # training moves the model; the references stay
    out = model(batch["x"])
    assert gere.penalty(model, batch, out) > 0 and torch.equal(torch.stack(gere.ref), h)


def test_sampler_puts_exactly_k_general_samples_in_every_batch():
    gere = GeRe(torch.randn(7, 64), torch.zeros(7, dtype=torch.long), features="0", k=3)
    batches = gere.batch_indices(50, 10, seed=1, task=0, epoch=0)
    assert all((b < 7).sum() == 3 for b in batches)
    task_part = torch.cat([b[b >= 7] for b in batches])
    assert sorted(task_part.tolist()) == list(range(7, 57))  # every task sample once per epoch
    general = torch.cat([b[b < 7] for b in batches[:7]])  # 21 draws: the set 3 times, reshuffled when exhausted
    assert torch.bincount(general, minlength=7).tolist() == [3] * 7
    assert [b.tolist() for b in batches] == [b.tolist() for b in gere.batch_indices(50, 10, 1, 0, 0)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in gere.batch_indices(50, 10, 1, 0, 1)]
    with pytest.raises(ValueError, match="^k: expected fewer"):
        gere.batch_indices(50, 3, 1, 0, 0)


def _scenario(seed=0):
    """The new task: pixel-permuted digits with permuted labels (a domain the model never saw)."""
    x, y = datasets.load("digits")
    tr, te = datasets.stratified_split(y, [0.7, 0.3], seed=0)
    perm = torch.tensor([3, 7, 0, 9, 5, 1, 8, 2, 6, 4])
    pixels = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    xn, yn = x.flatten(1)[:, pixels].reshape(x.shape), perm[y]
    task = Task(0, list(range(10)), TensorDataset(xn[tr], yn[tr]), TensorDataset(xn[:0], yn[:0]),
                TensorDataset(xn[te], yn[te]))
    return Scenario([task], name="inverted-digits", mode="domain", n_classes=10, input_shape=tuple(x.shape[1:]),
                    seed=seed), (x, y, tr, te)


def test_plugin_trains_through_the_hook_and_resumes_bit_identically():
    scenario, (x, y, tr, _) = _scenario()
    seen = []

    def trainer(model, gere):
        class Spy:
            def after_step(self, ctx, batch):
                seen.append(int((batch["task"] < 0).sum()))
        return Trainer(model, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), [GeRePlugin(gere), Spy()],
                       epochs=1, batch_size=32, progress=False, eval_every=None, seed=3)

    g = (x[tr[:40]], y[tr[:40]])
    full = trainer(mlp(), GeRe(*g, features=FEATURES, w=100, k=8))
    want = full.fit(scenario)["R"]
    assert set(seen) == {8}
    part = trainer(mlp(), GeRe(*g, features=FEATURES, w=100, k=8))
    part.fit(scenario, max_steps=20)
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    model = mlp(5)
    resumed = trainer(model, GeRe(*g, features=FEATURES, w=100, k=8))
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.fit(scenario)["R"] == want
    for p, q in zip(model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _hf_run(tmp_path, model, callback, data, steps):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                                          optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                                          weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()


def test_hf_callback_runs_the_official_objective_on_a_tiny_llama(tmp_path):
    # GeRe through a transformers Trainer: the callback's forward hook replaces outputs.loss with
    # (CE_task + CE_general) / 2 + w * L_TM ("dy"), so one SGD step of the Trainer equals one SGD step
    # on that objective computed by hand (the references frozen before the model was perturbed).
    g = torch.Generator().manual_seed(0)
    task = torch.randint(0, 96, (2, 12), generator=g)
    general = torch.randint(0, 96, (2, 10), generator=g)
    data = [{"input_ids": ids, "labels": ids} for ids in task]

    def setup(hook=True):
        model = _tiny_llama()
        gere = GeRe(general, general, features="model.norm", w="dy", k=2, seed=1)
        callback = GeReCallback(gere, model=model) if hook else gere.prepare(model)  # references of the initial model
        with torch.no_grad():
            torch.manual_seed(7)
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # training moved it: L_TM > 0 from here
        return model, gere, callback

    model, _, callback = setup()
    _hf_run(tmp_path, model, callback, data, steps=1)
    assert callback.drawn == 2 and callback.losses[0][1] > 0

    ref, gere, _ = setup(hook=False)
    ref.train()
    ce_t = ref(input_ids=task, labels=task).loss
    ce_g = ref(input_ids=general, labels=general).loss  # k = 2: the whole general set, in any order
    tm = gere.tm_loss(gere.last_features, torch.arange(2))
    ce = (ce_t + ce_g) / 2
    loss = ce + float(ce.detach()) / (float(tm.detach()) + 1e-8) * tm
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (n, p), q, gr in zip(model.named_parameters(), ref.parameters(), grads):
        assert torch.allclose(p, q - 0.5 * gr, atol=1e-5, rtol=1e-4), n

    fresh = _tiny_llama()  # unperturbed: L_TM is exactly 0 at the first step
    callback = GeReCallback(GeRe(general, general, features="model.norm", w=100, k=1, seed=1))
    _hf_run(tmp_path, fresh, callback, data, steps=3)
    assert callback.losses[0][1] == 0 and callback.drawn == 3 and callback.prepared
    assert not fresh._forward_hooks and not fresh.model.norm._forward_hooks  # removed at the end
    state = callback.state_dict()
    other = GeReCallback(GeRe(general, general, features="model.norm", w=100, k=1, seed=1))
    other.load_state_dict(state)
    assert other.drawn == 3 and torch.equal(other._next(), callback._next())  # a resumed run continues the order
    with pytest.raises(TypeError, match="^method"):
        GeReCallback(object())


def test_bad_input():
    x = torch.randn(4, 64)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="^general_x"):
        GeRe(torch.randn(0, 64), y[:0], features="0")
    with pytest.raises(ValueError, match="^general_x: expected finite"):
        GeRe(torch.full((4, 64), float("nan")), y, features="0")
    with pytest.raises(ValueError, match="^general_y"):
        GeRe(x, y[:3], features="0")
    with pytest.raises(ValueError, match="^w"):
        GeRe(x, y, features="0", w="big")
    with pytest.raises(ValueError, match="^w"):
        GeRe(x, y, features="0", w=-1.0)
    with pytest.raises(TypeError, match="^features"):
        GeRe(x, y, features=3)
    with pytest.raises(ValueError, match="^k"):
        GeRe(x, y, features="0", k=-1)
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gere = GeRe(x, y, features="nope")
    with pytest.raises(ValueError, match="^features: model has no submodule"):
        gere.prepare(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and gere.pos_thr is None
    with pytest.raises(ValueError, match="^model: call prepare"):
        GeRe(x, y, features="0").tm_loss(torch.zeros(1, 128), torch.tensor([0]))
    with pytest.raises(ValueError, match="^batch: GeRe"):
        GeRe(x, y, features="0").penalty(model, None, None)
    with pytest.raises(TypeError, match="^method"):
        GeRePlugin(object())


# --- the claim in miniature ----------------------------------------------------------------------
#
# The spec's setting: an MLP 64-128-128-10 pretrained on all digits (200 Adam
# steps); G = 100 of its training images with their penultimate activations (after the second ReLU)
# and per-unit thresholds; then a new task, pixel-permuted digits with permuted labels, for 2 epochs
# in forgetcore's Trainer (Adam lr 1e-3, batches of 32 holding exactly k = 8 general samples through
# the batch_indices hook). Arms: plain fine-tuning, CE-only replay of G (w = 0), CE + TM (w = "dy").
# Retention = accuracy on the original digits' test split.
# Tried on seeds 0-2 (and a pixel-inverted new task first, same picture); the test runs seeds 20-24,
# fixed before they were run. Measured on seeds 20-24:
#   arm           original-task acc   new-task acc
#   finetune      0.674 +- 0.034      0.697 +- 0.008
#   replay-ce     0.929 +- 0.009      0.739 +- 0.017
#   replay-tm-dy  0.930 +- 0.008      0.364 +- 0.031
#   TM - CE retention per seed: -0.004 +0.002 +0.022 -0.002 -0.013 (mean +0.001)
# (seeds 0-2, w = 100: retention 0.916 vs CE 0.926, new-task 0.374.)
# The paper's claim (TM >= CE replay at equal new-task accuracy) is NOT shown here: TM retains the
# original task as well as CE replay, no better, and at equal steps it holds the shared penultimate
# features so tightly that the new task is learned far less (0.36 against 0.74), so the arms never
# reach equal new-task accuracy. What is asserted is what holds: replay works, TM matches CE replay
# on retention, TM costs plasticity at this scale; and TM is exactly 0 at step 0 (test above).

SEEDS = range(20, 25)
PRE_STEPS, EPOCHS, BATCH, K, N_GENERAL, LR = 200, 2, 32, 8, 100, 1e-3
ARMS = {"finetune": None, "replay-ce": 0.0, "replay-tm-dy": "dy"}


def run_claim(seeds=SEEDS):
    scenario, (x, y, tr, te) = _scenario()
    rows = []
    for seed in seeds:
        base = mlp(seed)
        opt = torch.optim.Adam(base.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(PRE_STEPS):
            idx = tr[torch.randint(len(tr), (64,), generator=gen)]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(base(x[idx]), y[idx]).backward()
            opt.step()
        general = tr[torch.randperm(len(tr), generator=gen)[:N_GENERAL]]
        for arm, w in ARMS.items():
            model = mlp(seed)
            model.load_state_dict(base.state_dict())
            plugins = [] if w is None else [GeRePlugin(GeRe(x[general], y[general], features=FEATURES, w=w, k=K))]
            res = Trainer(model, lambda m: torch.optim.Adam(m.parameters(), lr=LR), plugins, epochs=EPOCHS,
                          batch_size=BATCH, progress=False, eval_every=None, seed=seed).fit(scenario)
            with torch.no_grad():
                old = (model(x[te]).argmax(1) == y[te]).float().mean().item()
            rows.append({"seed": seed, "arm": arm, "original": old, "new": res["R"][-1][0]})
    return rows


def test_claim_tm_retains_at_least_as_well_as_ce_replay():
    torch.set_num_threads(1)
    rows = run_claim()
    by = {(r["seed"], r["arm"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    tm = np.array([by[s, "replay-tm-dy"]["original"] for s in seeds])
    ce = np.array([by[s, "replay-ce"]["original"] for s in seeds])
    ft = np.array([by[s, "finetune"]["original"] for s in seeds])
    assert (ce - ft).mean() > 0.15 and (tm - ft).mean() > 0.15  # replay of 100 general samples works
    assert abs((tm - ce).mean()) < 0.03, tm - ce  # TM retains about as well as CE-only replay, not better
    new_gap = np.array([by[s, "replay-ce"]["new"] - by[s, "replay-tm-dy"]["new"] for s in seeds])
    assert new_gap.mean() > 0.2 and (new_gap > 0).all(), new_gap  # at equal steps TM costs plasticity here


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    rows = run_claim(eval(sys.argv[1]) if len(sys.argv) > 1 else SEEDS)
    for arm in ARMS:
        v = [r for r in rows if r["arm"] == arm]
        o = [r["original"] for r in v]
        print(f"{arm:14s} original {np.mean(o):.3f} +- {np.std(o):.3f}"
              f"  new {np.mean([r['new'] for r in v]):.3f} +- {np.std([r['new'] for r in v]):.3f}")
    by = {(r["seed"], r["arm"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    print("tm-dy - ce:", [round(by[s, "replay-tm-dy"]["original"] - by[s, "replay-ce"]["original"], 3) for s in seeds])
