"""``forgetcore demo unlearn``: SSD against Retrain, RetainFinetune and GradientAscent on real digits/MNIST.

For each dataset, each scenario (one whole class; a random 10 % of the training set) and each
seed: train an MLP, run every method on a copy, and measure forget / retain / test accuracy,
two membership-inference attacks and wall time. Prints one table per (dataset, scenario) with
the mean over seeds and writes ``unlearn.png``.

torch runs on one thread here: these models are tiny, and on a shared machine extra intra-op
threads only add synchronisation (measured: Retrain 28 s on two threads, under 2 s on one).
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from ..evaluation import unlearning as ev
from ..unlearning import LFSSD, SSD, GradientAscent, RetainFinetune, Retrain

log = logging.getLogger(__name__)

COLUMNS = ["forget_acc", "retain_acc", "test_acc", "test_forget_acc", "test_retain_acc", "mia_entropy", "mia_loss",
           "mia_loss_auc", "fit_s"]


def methods(seed: int, progress: bool, kind: str = "full-class") -> list[Any]:
    """The table's methods; SSD's importance batch is 64 for full-class and 128 for random forgetting
    (the official scripts' batch sizes)."""
    bs = 128 if kind.startswith("random") else 64
    ssd_auto = SSD(alpha="auto", seed=seed, batch_size=bs)
    ssd_auto.label = "SSD (auto alpha)"
    ssd10 = SSD(alpha=10.0, seed=seed, batch_size=bs)
    ssd10.label = "SSD (alpha=10)"
    return [Retrain(seed=seed, progress=progress), RetainFinetune(seed=seed), GradientAscent(seed=seed), ssd_auto,
            ssd10, LFSSD(alpha=10.0, seed=seed, batch_size=bs)]


def _mean_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(runs[0]):
        agg: dict[str, Any] = {"method": row["method"]}
        for k in COLUMNS:
            vals = [r[i][k] for r in runs if k in r[i] and not math.isnan(r[i][k])]
            if vals:
                agg[k] = statistics.fmean(vals)
        alphas = [r[i]["alpha"] for r in runs if "alpha" in r[i]]
        if alphas:
            agg["alpha"] = "/".join(f"{a:g}" for a in alphas)
        out.append(agg)
    return out


def run(out_dir: str | Path = "forgetcore-out", seeds: int | None = None, quick: bool = False,
        progress: bool = True) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), seeds, quick, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, seeds: int | None, quick: bool, progress: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    names = ["digits"] if quick else ["digits", "mnist"]
    results: dict[str, Any] = {}
    for name in names:
        for kind in ("full-class", "random-10%"):
            runs = []
            for seed in range(n_seeds):
                cls = (3 + 3 * seed) % 10
                data = ev.full_class(name, cls, seed) if kind == "full-class" else ev.random_subset(name, 0.1, seed)
                model = ev.train_original(data, "mlp", seed, progress=progress)
                ms = methods(seed, progress, kind)
                runs.append(ev.compare(ms, data, model, reference=ms[0], progress=progress))
            key = f"{name} {kind}"
            results[key] = {"mean": _mean_rows(runs), "runs": runs}
            what = f"class {', '.join(str((3 + 3 * s) % 10) for s in range(n_seeds))}" if kind == "full-class" \
                else "a random 10 % of the training set"
            print(f"\n{key}: forgetting {what}; mean over {n_seeds} seed(s); accuracies and MIA in %")
            print(ev.format_table(results[key]["mean"], COLUMNS))
    png = out / "unlearn.png"
    _plot(results, png)
    print(f"\nwrote {png}")
    results["png"] = str(png)
    return results


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    metrics = [("forget_acc", "forget acc", "tab:blue"), ("test_retain_acc", "test acc, kept classes", "tab:orange"),
               ("test_acc", "test acc", "tab:green"), ("mia_entropy", "MIA (entropy)", "tab:red")]
    for ax, key in zip(axes[0], keys):
        rows = results[key]["mean"]
        width = 0.8 / len(metrics)
        for j, (m, label, color) in enumerate(metrics):
            vals = [100 * r.get(m, math.nan) for r in rows]
            if all(math.isnan(v) for v in vals):
                continue
            ax.bar([i + j * width for i in range(len(rows))], vals, width, label=label if ax is axes[0][0] else None,
                   color=color)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
        ax.set_xticklabels([r["method"] for r in rows], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(key)
        ax.set_ylabel("%")
    fig.legend(loc="upper center", ncol=len(metrics), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)
