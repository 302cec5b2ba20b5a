"""``forgetcore demo kv``: A2SF vs H2O vs RecentWindow on SmolLM2-135M-Instruct, offline.

Associative recall (question appended after compression) at budgets of 10/20/30/50 % of the
prompt, for the full cache, RecentWindow, H2O and A2SF with forgetting factors
{0.5, 0.8, 0.9, 0.95, 0.99, 1.0}. The factor reported as "A2SF (chosen)" is picked on
development prompts (one seed) by mean accuracy over the budgets (ties go to the factor nearest
1, i.e. toward H2O) and reported on disjoint test prompts (another seed). ``seeds`` is unused:
the prompt seeds are fixed so that dev and test stay disjoint. Perplexity of held-out
``pydoc_data.topics`` prose under the same budgets completes the table.

Passkey retrieval in real prose (a 5-digit key at seeded depths in ``pydoc_data.topics`` text
of 1,000 tokens, 500 with ``quick``; the full cache found it 8/8 at both lengths on the
development seed) compares every press, kvpress's ports included, at 20 % and 50 % kept;
A2SF's factor for it is chosen on development prompts too. Prints the tables and the demo's
time, writes ``kv_results.json`` and ``kv_accuracy.png`` (recall accuracy against budget).

Time on 2 CPU cores: ``--quick`` 93.5 s on a quiet machine; the full demo 1,108 s (18.5 minutes)
measured while other jobs shared the cores, so at most that.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..kvcache import A2SF, H2O, TOVA, ExpectedAttention, Knorm, RecentWindow, SnapKV
from ..kvcache.evaluation import needle_items, perplexity, prose_chunks, recall_correct, recall_items

log = logging.getLogger(__name__)

BUDGETS = (0.1, 0.2, 0.3, 0.5)
NEEDLE_BUDGETS = (0.2, 0.5)
FACTORS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)
DEV_SEED, TEST_SEED, PROSE_SEED = 7, 1001, 3


def _methods(keep: float) -> dict:
    r = 1.0 - keep
    m = {"RecentWindow": RecentWindow(compression_ratio=r), "H2O": H2O(compression_ratio=r)}
    for a in FACTORS:
        m[f"A2SF a={a}"] = A2SF(a, compression_ratio=r)
    return m


def _table(title: str, rows: dict, fmt: str, budgets=BUDGETS) -> str:
    cols = [f"{int(k * 100)}%" for k in budgets]
    w = max(len(n) for n in rows) + 2
    lines = [title, "method".ljust(w) + "".join(c.rjust(9) for c in cols)]
    for name, vals in rows.items():
        lines.append(name.ljust(w) + "".join(format(v, fmt).rjust(9) for v in vals))
    return "\n".join(lines)


def run(out_dir, seeds=None, quick: bool = False, progress: bool = True) -> dict:
    from ..models import load_smollm2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_items = 8 if quick else 32
    n_facts = 10 if quick else 24
    n_prose = 4 if quick else 16
    model, tok = load_smollm2()
    t0 = time.perf_counter()

    # 1. choose the forgetting factor on development prompts
    dev = recall_items(n_items, n_facts, seed=DEV_SEED)
    dev_presses = [A2SF(a, compression_ratio=1 - k) for a in FACTORS for k in BUDGETS]
    dev_ok = recall_correct(model, tok, dev, dev_presses, progress=progress)
    dev_acc = {a: [sum(dev_ok[i * len(BUDGETS) + j]) / len(dev) for j in range(len(BUDGETS))]
               for i, a in enumerate(FACTORS)}
    chosen = max(FACTORS, key=lambda a: (sum(dev_acc[a]), -abs(a - 1.0)))
    log.info("kv demo: chose forgetting factor %s on dev prompts", chosen)

    # 2. report on disjoint test prompts
    test = recall_items(n_items, n_facts, seed=TEST_SEED)
    names = ["full cache"]
    presses: list = [None]
    for k in BUDGETS:
        for name, press in _methods(k).items():
            names.append((name, k))
            presses.append(press)
    ok = recall_correct(model, tok, test, presses, progress=progress)
    acc: dict[str, list[float]] = {"full cache": [sum(ok[0]) / len(test)] * len(BUDGETS)}
    for (name, _k), o in zip(names[1:], ok[1:]):
        acc.setdefault(name, []).append(sum(o) / len(test))
    acc["A2SF (chosen)"] = acc[f"A2SF a={chosen}"]

    # 3. perplexity of held-out prose under the same budgets
    ctx, cont = (128, 24) if quick else (384, 64)
    windows = prose_chunks(tok, n_prose, ctx, cont, seed=PROSE_SEED)
    # (perplexity for the baselines and the chosen factor only: it is the slow part on CPU)
    keep_ix = [0] + [i for i, nk in enumerate(names) if i and nk[0] in ("RecentWindow", "H2O", f"A2SF a={chosen}")]
    pp = perplexity(model, windows, ctx, [presses[i] for i in keep_ix], progress=progress)
    ppl: dict[str, list[float]] = {"full cache": [pp[0]] * len(BUDGETS)}
    for i, v in zip(keep_ix[1:], pp[1:]):
        ppl.setdefault(names[i][0], []).append(v)

    # 4. passkey retrieval in real prose: every press, factor chosen on dev needles
    n_needle, n_tok = (4, 500) if quick else (16, 1000)
    nfac = (0.5, 0.9, 0.99, 1.0)
    ndev = needle_items(tok, n_needle, n_tok, seed=DEV_SEED)
    ok = recall_correct(model, tok, ndev, [A2SF(a, compression_ratio=0.8) for a in nfac], progress=progress)
    nchosen = max(nfac, key=lambda a: (sum(ok[nfac.index(a)]), -abs(a - 1.0)))
    ntest = needle_items(tok, n_needle, n_tok, seed=TEST_SEED)
    nnames, npresses = ["full cache"], [None]
    for k in NEEDLE_BUDGETS:
        r = 1 - k
        for name, press in {"RecentWindow": RecentWindow(compression_ratio=r), "H2O": H2O(compression_ratio=r),
                            f"A2SF a={nchosen} (chosen)": A2SF(nchosen, compression_ratio=r),
                            "SnapKV": SnapKV(compression_ratio=r, window=32), "TOVA": TOVA(compression_ratio=r),
                            "Knorm": Knorm(compression_ratio=r),
                            "ExpectedAttention": ExpectedAttention(compression_ratio=r)}.items():
            nnames.append(name)
            npresses.append(press)
    ok = recall_correct(model, tok, ntest, npresses, progress=progress)
    needle: dict[str, list[float]] = {"full cache": [sum(ok[0]) / len(ntest)] * len(NEEDLE_BUDGETS)}
    for name, o in zip(nnames[1:], ok[1:]):
        needle.setdefault(name, []).append(sum(o) / len(ntest))

    res = {"needle_accuracy": needle, "needle_chosen_factor": nchosen, "needle_tokens": n_tok,
           "needle_test_prompts": len(ntest), "needle_budgets": list(NEEDLE_BUDGETS),
           "recall_accuracy": acc, "dev_recall_accuracy": {str(a): v for a, v in dev_acc.items()},
           "chosen_factor": chosen, "perplexity": ppl, "budgets": list(BUDGETS), "n_test_prompts": len(test),
           "n_facts": n_facts, "prose_windows": n_prose, "context_tokens": ctx}
    res["seconds"] = time.perf_counter() - t0
    print(_table(f"Associative recall accuracy on {len(test)} test prompts ({n_facts} facts; "
                 f"factor {chosen} chosen on {len(dev)} dev prompts), by KV budget (% of prompt kept):", acc, ".3f"))
    print()
    print(_table(f"Perplexity of pydoc_data.topics prose ({n_prose} windows, {ctx} context + {cont} scored tokens):",
                 ppl, ".2f"))
    print()
    print(_table(f"Passkey retrieval in {n_tok}-token prose, {len(ntest)} test prompts (A2SF factor chosen on "
                 f"{len(ndev)} dev prompts), by KV budget:", needle, ".3f", NEEDLE_BUDGETS))
    print(f"\nkv demo took {res['seconds']:.0f} s")
    (out / "kv_results.json").write_text(json.dumps(res, indent=2))
    _plot(acc, out / "kv_accuracy.png", chosen)
    return res


def _plot(acc: dict, path: Path, chosen: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [int(k * 100) for k in BUDGETS]
    for name, vals in acc.items():
        if name == "A2SF (chosen)":
            continue
        style = {"full cache": "k--", "RecentWindow": "s-", "H2O": "o-"}.get(name, ".-")
        lw = 2.5 if name == f"A2SF a={chosen}" else 1.2
        ax.plot(x, vals, style, label=name + (" (chosen)" if name == f"A2SF a={chosen}" else ""), lw=lw)
    ax.set_xlabel("KV budget (% of prompt kept)")
    ax.set_ylabel("associative recall accuracy")
    ax.set_title("SmolLM2-135M-Instruct: KV-cache eviction")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
