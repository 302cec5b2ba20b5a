"""HFT: the category-level mask, per-stage redraw, optimiser exclusion, both loop adapters, state,
bad input, and the claim in miniature (sequential digits on the gated-MLP stand-in)."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from forgetcore import datasets
from forgetcore.continual import Trainer, scenarios
from forgetcore.finetune import HFT, FinetuneCallback, FinetunePlugin, GatedMLP, trainable_parameters
from forgetcore.finetune.hft import ATTENTION, FFN, NORMS


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _layer_counts(model, trainable):
    """Per layer: how many attention / FFN / norm modules train."""
    out = []
    for i in range(len(model.layers if hasattr(model, "layers") else model.model.layers)):
        names = [n.rsplit(".", 1)[-1] for n in trainable if f"layers.{i}." in n]
        out.append(tuple(sum(n in cat for n in names) for cat in (ATTENTION, FFN, NORMS)))
    return out


@pytest.mark.parametrize("build", [lambda: GatedMLP(d=16, n_layers=4), lambda: tiny_llama()])
def test_mask_is_half_by_category_and_keeps_the_outside_trainable(build):
    model = build()
    hft = HFT(seed=3)
    hft.prepare(model)
    counts = _layer_counts(model, hft.trainable)
    assert all(c[0] == 2 and c[2] == 1 and c[1] in (1, 2) for c in counts), counts
    assert sorted(c[1] for c in counts) == [1] * (len(counts) - len(counts) // 2) + [2] * (len(counts) // 2)
    n_mats = sum(c[0] + c[1] for c in counts)
    assert n_mats == len(counts) * 7 // 2  # half of the 7 matrices per layer, counted in matrices
    for name, p in model.named_parameters():
        in_layer = ".layers." in f".{name}"
        owner = name.rsplit(".", 1)[0]
        assert p.requires_grad == (not in_layer or owner in hft.trainable), name
    outside = [n for n, p in model.named_parameters() if ".layers." not in f".{n}"]
    assert outside and all(dict(model.named_parameters())[n].requires_grad for n in outside)


def test_redrawn_per_stage_deterministic_in_the_seed():
    model = GatedMLP(d=16, n_layers=4)
    a, b = HFT(seed=1), HFT(seed=1)
    a.prepare(model)
    first = list(a.trainable)
    b.prepare(GatedMLP(d=16, n_layers=4, seed=5))
    assert b.trainable == first  # a function of (seed, stage) and the structure only
    a.after_stage(model)
    assert a.stage == 1 and a.trainable != first
    assert a.trainable == HFT(seed=1).draw(model, 1)
    assert HFT(seed=2).draw(model, 0) != first


def test_frozen_tensors_never_move_with_weight_decay_in_the_trainer():
    scenario = scenarios.split("digits", n_tasks=2, mode="class", seed=0)
    model = GatedMLP(d=16, n_layers=2)
    hft = HFT(seed=0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    stages = []

    class Spy:  # records the trainable set of each task, then the plugin's after_task redraws it
        def after_task(self, ctx, task):
            stages.append(set(hft.trainable))

    opt = lambda m: torch.optim.AdamW(trainable_parameters(m), lr=1e-2, weight_decay=0.5)  # noqa: E731
    Trainer(model, opt, [Spy(), FinetunePlugin(hft)], epochs=1, batch_size=64, progress=False,
            eval_every=None).fit(scenario)
    assert hft.stage == 1 and len(stages) == 2
    never = [n for n in init if ".layers." in f".{n}" and n.rsplit(".", 1)[0] not in stages[0] | stages[1]]
    assert never, "some layer matrix should be frozen in both stages"
    for n, p in model.named_parameters():
        if n in never:
            assert torch.equal(p, init[n]), n
        else:
            assert not torch.equal(p, init[n]), n


def test_plugin_resumes_bit_identically():
    scenario = scenarios.split("digits", n_tasks=2, mode="class", seed=0)
    opt = lambda m: torch.optim.Adam(trainable_parameters(m), lr=1e-2)  # noqa: E731
    kw = {"epochs": 1, "batch_size": 64, "progress": False, "eval_every": None}
    full = Trainer(GatedMLP(d=16, n_layers=2), opt, [FinetunePlugin(HFT(seed=4))], **kw)
    want = full.fit(scenario)["R"]
    part = Trainer(GatedMLP(d=16, n_layers=2), opt, [FinetunePlugin(HFT(seed=4))], **kw)
    part.fit(scenario, max_steps=8)  # inside task 1, after the redraw
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    model = GatedMLP(d=16, n_layers=2, seed=9)
    resumed = Trainer(model, opt, [FinetunePlugin(HFT(seed=4))], **kw)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.fit(scenario)["R"] == want
    for (n, p), q in zip(model.named_parameters(), full.model.parameters()):
        assert torch.equal(p, q), n


def test_hf_callback_on_a_tiny_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_llama()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (16, 12), generator=g)]
    hft = HFT(seed=0)
    seen = []

    class Spy(transformers.TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            seen.append(set(hft.trainable))

    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8,
                                          learning_rate=1e-2, weight_decay=0.5, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[FinetuneCallback(hft), Spy()])
    trainer.train()
    assert hft.stage == 1 and len(seen) == 2 and seen[0] != seen[1]
    never = [n for n in init if ".layers." in n and n.rsplit(".", 1)[0] not in seen[0] | seen[1]]
    assert never
    for n, p in model.named_parameters():
        if n in never:
            assert torch.equal(p, init[n]), n  # no update and no weight decay while frozen
    assert not torch.equal(model.lm_head.weight, init["lm_head.weight"])
    assert not torch.equal(model.model.embed_tokens.weight, init["model.embed_tokens.weight"])


def test_state_dict_and_bad_input():
    hft = HFT(seed=2)
    hft.prepare(GatedMLP(d=16))
    hft.after_stage(GatedMLP(d=16))
    buf = io.BytesIO()
    torch.save(hft.state_dict(), buf)
    buf.seek(0)
    other = HFT(seed=0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.state_dict() == hft.state_dict()
    model = GatedMLP(d=16)
    other.reapply(model)
    assert {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad and "layers" in n} \
        == set(hft.trainable)
    with pytest.raises(ValueError, match="^state: expected keys"):
        other.load_state_dict({"seed": 0})
    with pytest.raises(ValueError, match="^seed"):
        HFT(seed=-1)
    with pytest.raises(TypeError, match="^layers"):
        HFT(layers=3)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = [p.requires_grad for p in mlp.parameters()]
    with pytest.raises(ValueError, match="^model: no non-empty ModuleList"):
        HFT().prepare(mlp)
    assert [p.requires_grad for p in mlp.parameters()] == before
    odd = GatedMLP(d=8)
    odd.layers[0] = torch.nn.Linear(8, 8)
    before = [p.requires_grad for p in odd.parameters()]
    with pytest.raises(ValueError, match="^model: layer layers.0 has none"):
        HFT().prepare(odd)
    assert [p.requires_grad for p in odd.parameters()] == before  # nothing frozen by a failed call
    with pytest.raises(TypeError, match="^model"):
        HFT().prepare("llama")
    with pytest.raises(TypeError, match="^method"):
        FinetunePlugin(object())


# --- the claim in miniature ----------------------------------------------------------------------
#
# The spec's setting on the gated-MLP stand-in (d = 64, 4 blocks): pretrain
# on A = digits 0-4 (100 Adam steps, lr 3e-3, batches of 64), then sequentially B = digits 5-9 and
# C = pixel-permuted digits (all 10 classes), 100 steps each, full fine-tuning against HFT (mask
# drawn for B, redrawn for C). Accuracy on A and B is read with logits masked to their classes.
# BWT = mean over A, B of (accuracy after C - accuracy right after learning it).
# Settings were tried on seeds 0-2 (BWT full -0.514, HFT -0.486; HFT ahead in 3 of 3); the test runs
# seeds 20-24, fixed before they were run. Measured on seeds 20-24, one model at a time (sequential
# Adam, the first version of this test, 12.7 s on a quiet machine):
#   full  BWT -0.530 +- 0.071, current 0.926;  hft  BWT -0.503 +- 0.136, current 0.943
#   HFT - full BWT per seed: +0.162 +0.135 +0.061 -0.347 +0.124 (mean +0.027, ahead in 4 of 5).
# To fit the CI budget the ten runs (5 seeds x 2 arms) now train side by side as one batched model
# with one fused Adam (elementwise, so each model's own Adam; the same batches, masks and steps).
# Only the floating-point rounding differs, and that alone moves single seeds by up to 0.35 in BWT:
#   batched, fused Adam (this test): full -0.594 +- 0.090, current 0.920; hft -0.521 +- 0.089, 0.950
#   per seed +0.078 +0.137 +0.210 +0.011 -0.074 (mean +0.072, ahead in 4 of 5)
#   (batched via torch.func.vmap, plain Adam: per seed +0.171 -0.134 +0.269 +0.102 +0.071, mean +0.096.)
# The paper's direction holds on average at similar (here slightly higher) current-task accuracy
# in all three, but weakly: one seed in five reverses, and which one depends on rounding, so the
# margin asserted is small. A narrower model (d = 32, 4x cheaper) did not keep it (mean +0.003,
# 3 of 5): the width stays at 64.

SEEDS = range(20, 25)
PRE, STEPS, LR, BATCH, D = 100, 100, 3e-3, 64, 64


def _acc(model, x, y, classes):
    with torch.no_grad():
        return (model(x)[:, classes].argmax(1) + classes[0] == y).float().mean().item()


def _stacked_forward(p, x):
    """GatedMLP's forward for M models at once: ``p`` holds each parameter stacked over models
    (M, ...), ``x`` is (M, B, 64). The same operations as ``GatedMLP.forward``, batched."""
    def lin(name, h):
        return torch.baddbmm(p[name + ".bias"].unsqueeze(1), h, p[name + ".weight"].transpose(1, 2))

    def norm(name, h):
        return F.layer_norm(h, h.shape[-1:]) * p[name + ".weight"].unsqueeze(1) + p[name + ".bias"].unsqueeze(1)

    h = lin("embed", x)
    for i in range(len({n.split(".")[1] for n in p if n.startswith("layers.")})):
        pre = f"layers.{i}."
        a = norm(pre + "input_layernorm", h)
        q, k, v = (lin(pre + f"self_attn.{n}", a) for n in ("q_proj", "k_proj", "v_proj"))
        h = h + lin(pre + "self_attn.o_proj", v * torch.sigmoid(q * k))
        a = norm(pre + "post_attention_layernorm", h)
        h = h + lin(pre + "mlp.down_proj", F.silu(lin(pre + "mlp.gate_proj", a)) * lin(pre + "mlp.up_proj", a))
    return lin("head", norm("norm", h))


def _train(models, x, y, seeds):
    """Train ``models`` side by side, each on its own batch order (``seeds[i]``), as one batched model.

    Adam is elementwise, so one Adam over the stacked parameters is each model's own Adam; the
    tensors a model's HFT mask freezes get a zero gradient from a fresh optimiser, so their Adam
    state stays zero and they do not move (what leaving them out of the optimiser does).
    """
    named = [dict(m.named_parameters()) for m in models]
    params = {n: torch.stack([d[n].detach() for d in named]).requires_grad_() for n in named[0]}
    masks = {n: torch.tensor([d[n].requires_grad for d in named], dtype=torch.float32)
             .view(-1, *[1] * (params[n].dim() - 1)) for n in params}
    opt = torch.optim.Adam(list(params.values()), lr=LR, fused=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    orders = [torch.empty(0, dtype=torch.long) for _ in models]
    for _ in range(STEPS):
        idx = []
        for i, gen in enumerate(gens):
            if len(orders[i]) < BATCH:
                orders[i] = torch.cat([orders[i], torch.randperm(len(y), generator=gen)])
            idx.append(orders[i][:BATCH])
            orders[i] = orders[i][BATCH:]
        idx = torch.stack(idx)
        out = _stacked_forward(params, x[idx])
        loss = F.cross_entropy(out.flatten(0, 1), y[idx].flatten(), reduction="none").view(len(models), -1)
        opt.zero_grad()
        loss.mean(1).sum().backward()  # each model's own mean loss: the gradients do not mix
        torch._foreach_mul_([p.grad for p in params.values()], list(masks.values()))
        opt.step()
    with torch.no_grad():
        for i, m in enumerate(models):
            for n, p in m.named_parameters():
                p.copy_(params[n][i])


def run_claim(seeds=SEEDS):
    x, y = datasets.load("digits")
    x = x.flatten(1)
    tr, te = datasets.stratified_split(y, [0.7, 0.3], seed=0)
    xp = x[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    tasks = [(x, tr[y[tr] < 5], te[y[te] < 5], torch.arange(5)),
             (x, tr[y[tr] >= 5], te[y[te] >= 5], torch.arange(5, 10)),
             (xp, tr, te, torch.arange(10))]
    seeds = list(seeds)
    bases = [GatedMLP(d=D, seed=seed) for seed in seeds]
    _train(bases, x[tasks[0][1]], y[tasks[0][1]], seeds)
    runs = [(seed, arm) for seed in seeds for arm in ("full", "hft")]
    models, hfts, R = [], [], []
    for seed, arm in runs:
        model = GatedMLP(d=D, seed=seed)
        model.load_state_dict(bases[seeds.index(seed)].state_dict())
        models.append(model)
        hfts.append(HFT(seed=seed) if arm == "hft" else None)
        R.append([[_acc(model, xx[ids], y[ids], c) for xx, _, ids, c in tasks]])
    for t in (1, 2):
        for model, hft in zip(models, hfts):
            if hft is not None:
                hft.prepare(model) if t == 1 else hft.after_stage(model)
        xx, ids, _, _ = tasks[t]
        _train(models, xx[ids], y[ids], [seed * 10 + t for seed, _ in runs])
        for model, r in zip(models, R):
            r.append([_acc(model, xx2[ids2], y[ids2], c) for xx2, _, ids2, c in tasks])
    rows = []
    for (seed, arm), r in zip(runs, R):
        r = np.array(r)
        rows.append({"seed": seed, "arm": arm, "bwt": float(np.mean([r[2, 0] - r[0, 0], r[2, 1] - r[1, 1]])),
                     "current": float(r[2, 2]), "R": r.tolist()})
    return rows


@pytest.mark.slow
def test_claim_hft_forgets_less_at_similar_current_accuracy():
    torch.set_num_threads(1)
    rows = run_claim()
    by = {(r["seed"], r["arm"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    gap = np.array([by[s, "hft"]["bwt"] - by[s, "full"]["bwt"] for s in seeds])
    assert gap.mean() > 0.01 and (gap > 0).sum() >= 3, gap
    cur = np.array([by[s, "hft"]["current"] - by[s, "full"]["current"] for s in seeds])
    assert cur.mean() > -0.03, cur  # similar (or better) accuracy on the current task


if __name__ == "__main__":
    torch.set_num_threads(1)
    rows = run_claim()
    for arm in ("full", "hft"):
        v = [r for r in rows if r["arm"] == arm]
        print(arm, f"BWT {np.mean([r['bwt'] for r in v]):+.3f} +- {np.std([r['bwt'] for r in v]):.3f}",
              f"current {np.mean([r['current'] for r in v]):.3f} +- {np.std([r['current'] for r in v]):.3f}")
    by = {(r["seed"], r["arm"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    print("gap per seed", [round(by[s, "hft"]["bwt"] - by[s, "full"]["bwt"], 3) for s in seeds])
