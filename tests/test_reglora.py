"""RegLoRA (SEFE): key positions, the gathered penalty, merging, state and resume, bad input, and the
claim in miniature (rotated digits, sequential LoRA merged after each task)."""

import io

import numpy as np
import pytest
import torch

from forgetcore.continual import Trainer, scenarios
from forgetcore.evaluation.continual import summary
from forgetcore.finetune import FinetunePlugin, RegLoRA, trainable_parameters

pytest.importorskip("peft")

TARGETS = ["1", "3", "5"]


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def _randomise_adapters(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_key_positions_penalty_and_merge():
    model = mlp()
    x = torch.randn(5, 64)
    before = model(x)
    rl = RegLoRA(target_modules=TARGETS, r=2, lora_alpha=4, lam=10.0, seed=0)
    rl.prepare(model)
    assert torch.allclose(model(x), before)  # B = 0: the adapters start as the identity
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{t}.lora_{ab}.default.weight" for t in TARGETS for ab in "AB"}
    assert rl.penalty(model, None, None) == 0  # first task: no regulariser
    _randomise_adapters(model, 1)
    mods = {n: m for n, m in model.named_modules() if n in TARGETS}
    deltas = {n: (m.lora_B.default.weight @ m.lora_A.default.weight).detach() for n, m in mods.items()}
    merged = {n: (m.base_layer.weight + m.get_delta_weight("default")).detach() for n, m in mods.items()}
    out = model(x).detach()
    rl.after_stage(model)
    for n, m in mods.items():
        d = deltas[n]
        k = int(0.02 * d.numel())
        want = torch.topk(d.abs().flatten(), k).indices.sort().values
        assert torch.equal(rl.keys[n], want)  # top 2 % of |BA|, flattened, no alpha/r scaling
        assert torch.allclose(m.base_layer.weight, merged[n])  # merged with peft's scaling
        assert torch.equal(m.lora_B.default.weight, torch.zeros_like(m.lora_B.default.weight))
    assert torch.allclose(model(x), out, rtol=1e-4, atol=1e-4)  # merging does not change the function
    _randomise_adapters(model, 2)
    pen = rl.penalty(model, None, None)
    full = sum((mods[n].lora_B.default.weight @ mods[n].lora_A.default.weight).flatten()[rl.keys[n]].abs().mean()
               for n in TARGETS)
    assert torch.allclose(pen, 10.0 * full / 3)
    pen.backward()
    assert all(mods[n].lora_A.default.weight.grad is not None for n in TARGETS)
    first = {n: v.clone() for n, v in rl.keys.items()}
    rl.after_stage(model)  # a second task appends, duplicates kept
    for n in TARGETS:
        assert len(rl.keys[n]) == 2 * len(first[n]) and torch.equal(rl.keys[n][: len(first[n])], first[n])


def test_adapter_init_is_seeded():
    a, b = mlp(), mlp()
    RegLoRA(target_modules=TARGETS, seed=3).prepare(a)
    RegLoRA(target_modules=TARGETS, seed=3).prepare(b)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_resume_bit_identical_through_the_trainer():
    sc = scenarios.rotated("digits", n_tasks=2, angles=[0, 90], seed=0)

    def trainer(model):
        return Trainer(model, lambda m: torch.optim.Adam(trainable_parameters(m), lr=3e-3),
                       [FinetunePlugin(RegLoRA(target_modules=TARGETS, lam=1e3, seed=1))], epochs=1,
                       batch_size=64, progress=False, eval_every=None, seed=2)

    full = trainer(mlp())
    want = full.fit(sc)["R"]
    part = trainer(mlp())
    part.fit(sc, max_steps=25)  # inside task 1: key positions recorded, penalty active
    assert part.plugins[0].method.keys
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    model = mlp(7)
    resumed = trainer(model)
    RegLoRA(target_modules=TARGETS).prepare(model)  # the adapters must exist before the weights load
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.fit(sc)["R"] == want
    for p, q in zip(model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


def test_bad_input():
    with pytest.raises(TypeError, match="^target_modules"):
        RegLoRA(target_modules=[])
    with pytest.raises(ValueError, match="^r"):
        RegLoRA(target_modules=TARGETS, r=0)
    with pytest.raises(ValueError, match="^top"):
        RegLoRA(target_modules=TARGETS, top=0.0)
    with pytest.raises(ValueError, match="^lam"):
        RegLoRA(target_modules=TARGETS, lam=-1.0)
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="^target_modules: model has no modules named"):
        RegLoRA(target_modules=["9"]).prepare(model)
    assert [n for n, _ in model.named_parameters()] == names  # nothing injected
    with pytest.raises(ValueError, match="^model: no LoRA adapters"):
        RegLoRA(target_modules=TARGETS).after_stage(model)
    with pytest.raises(TypeError, match="^model"):
        RegLoRA(target_modules=TARGETS).prepare(None)
    with pytest.raises(ValueError, match="^state"):
        RegLoRA(target_modules=TARGETS).load_state_dict({})


# --- the claim in miniature ----------------------------------------------------------------------
#
# The spec's setting: an MLP 64-128-128-10 pretrained on all digits (300 Adam
# steps), then Rotated-Digits 0, 45, 90, 135 degrees in forgetcore's Trainer, each task learned through
# a fresh LoRA (r = 4, alpha = 8) on all three linear layers, merged after the task (3 epochs, Adam
# lr 3e-3, batches of 32). Plain sequential LoRA (lam = 0) against RegLoRA (lam = 1e3; plasticity =
# mean accuracy on each rotated task right after learning it).
# Sweep on the tuning seeds 0-2:  lam 0: BWT -0.314, plasticity 0.729, final acc 0.552
#                                 lam 1e2: -0.284, 0.715, 0.563;  lam 1e3: -0.233, 0.644, 0.548
#                                 lam 1e4: -0.222, 0.543, 0.480
# The test runs seeds 20-24, fixed before they were run. Measured there:
#   lam 0:   BWT -0.311 +- 0.049  plasticity 0.715  final acc 0.543
#   lam 1e3: BWT -0.276 +- 0.038  plasticity 0.644  final acc 0.516
#   BWT gain per seed: +0.132 -0.034 +0.027 -0.020 +0.069 (mean +0.035, 3 of 5)
# The paper's direction holds on average, weakly: RegLoRA trades plasticity for stability (the larger
# lam, the less forgetting and the less learning), and the BWT gain on the held-out seeds is small
# and in 3 of 5 seeds only, so what is asserted is the trade: a positive mean BWT gain and a clear
# plasticity cost.

SEEDS = range(20, 25)
ANGLES, EPOCHS, LR, LAM = (0, 45, 90, 135), 3, 3e-3, 1e3


def run_claim(seeds=SEEDS, lams=(0.0, LAM)):
    sc = scenarios.rotated("digits", n_tasks=len(ANGLES), angles=list(ANGLES), seed=0)
    x, y = sc[0].train.tensors
    rows = []
    for seed in seeds:
        base = mlp(seed)
        opt = torch.optim.Adam(base.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(300):  # pretraining on the unrotated digits
            i = torch.randint(len(y), (64,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(base(x[i]), y[i]).backward()
            opt.step()
        for lam in lams:
            model = mlp(seed)
            model.load_state_dict(base.state_dict())
            method = RegLoRA(target_modules=TARGETS, r=4, lam=lam, seed=seed)
            res = Trainer(model, lambda m: torch.optim.Adam(trainable_parameters(m), lr=LR), [FinetunePlugin(method)],
                          epochs=EPOCHS, batch_size=32, progress=False, eval_every=None, seed=seed).fit(sc)
            R = np.array(res["R"])
            s = summary(R)
            rows.append({"seed": seed, "lam": lam, "bwt": s["bwt"], "acc": s["acc"],
                         "plasticity": float(np.mean(np.diag(R)[1:]))})
    return rows


@pytest.mark.slow  # over 10 s of CPU: see the report
def test_claim_reglora_lowers_bwt_at_a_plasticity_cost():
    torch.set_num_threads(1)
    rows = run_claim()
    by = {(r["seed"], r["lam"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    gain = np.array([by[s, LAM]["bwt"] - by[s, 0.0]["bwt"] for s in seeds])
    cost = np.array([by[s, 0.0]["plasticity"] - by[s, LAM]["plasticity"] for s in seeds])
    assert gain.mean() > 0, gain
    assert cost.mean() > 0.03, cost


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    lams = eval(sys.argv[2]) if len(sys.argv) > 2 else (0.0, LAM)
    rows = run_claim(eval(sys.argv[1]) if len(sys.argv) > 1 else SEEDS, lams)
    for lam in lams:
        v = [r for r in rows if r["lam"] == lam]
        f = lambda k, v=v: f"{np.mean([r[k] for r in v]):.3f} +- {np.std([r[k] for r in v]):.3f}"  # noqa: E731
        print(f"lam {lam:g}: BWT {f('bwt')}  final acc {f('acc')}  plasticity {f('plasticity')}")


def test_hf_callback_on_a_tiny_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    from forgetcore.finetune import FinetuneCallback

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    targets = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    rl = RegLoRA(target_modules=targets, r=4, lam=1e3, seed=0)
    callback = FinetuneCallback(rl, model=model)  # adapters exist before the optimiser is built
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (16, 12), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert rl.stage == 1 and set(rl.keys) == set(targets)  # merged once, after epoch 1
    assert callback.penalties[0] == 0 and callback.penalties[-1] > 0  # active in epoch 2
    for n, p in model.named_parameters():
        if "lora_" in n:
            continue
        moved = not torch.equal(p, base[n])
        assert moved == any(n.startswith(t + ".") for t in targets), n  # only merges move base weights
