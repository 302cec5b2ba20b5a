"""``forgetcore demo unlearn``: every unlearning method of forgetcore on real digits/MNIST.

Standard table: for each dataset, each scenario (one whole class; a random 10 % of the training
set) and each seed, train an MLP, run Retrain, RetainFinetune, GradientAscent, SSD (auto and
alpha 10), LF-SSD, IAU, random-label forgetting, GS-LoRA and GS-LoRA++ on copies, and measure
forget / retain / test accuracy, two membership-inference attacks and wall time; one table per
(dataset, scenario) with the mean over seeds, and ``unlearn.png``. IAU runs on the same original
as the others unless ``--iau-gr`` trains it its gradient-restricted original (slower: double
backprop). GS-LoRA puts its adapters on the MLP's two hidden linears (one group each).

Then small studies on digits, each with its own table, in ``unlearn_studies.png``: SafeEraser's
prompt-decouple term (SARR with and without it), CUPID on biased digits (group forget accuracies
against plain gradient ascent), random-label forgetting with the linear probe, and Feldman-Zhang
memorisation scores with planted mislabelled examples.

torch runs on one thread here: these models are tiny, and on a shared machine extra intra-op
threads only add synchronisation (measured: Retrain 28 s on two threads, under 2 s on one).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from ..evaluation import memorization as mz
from ..evaluation import probes
from ..evaluation import unlearning as ev
from ..training import accuracy, fit_epochs
from ..unlearning import (
    CUPID,
    IAU,
    LFSSD,
    SSD,
    GradientAscent,
    RandomLabelForgetting,
    RetainFinetune,
    Retrain,
    SafeEraser,
)
from ..unlearning.gslora import GSLoRA, GSLoRAPlusPlus
from ..unlearning.iau import gradient_restriction

log = logging.getLogger(__name__)

COLUMNS = ["forget_acc", "retain_acc", "test_acc", "test_forget_acc", "test_retain_acc", "mia_entropy", "mia_loss",
           "mia_loss_auc", "fit_s"]


def methods(seed: int, progress: bool, kind: str = "full-class", iau_gr: bool = False) -> list[Any]:
    """The table's methods; SSD's importance batch is 64 for full-class and 128 for random forgetting
    (the official scripts' batch sizes)."""
    bs = 128 if kind.startswith("random") else 64
    ssd_auto = SSD(alpha="auto", seed=seed, batch_size=bs)
    ssd_auto.label = "SSD (auto alpha)"
    ssd10 = SSD(alpha=10.0, seed=seed, batch_size=bs)
    ssd10.label = "SSD (alpha=10)"
    iau = IAU()
    iau.label = "IAU (GR original)" if iau_gr else "IAU"
    rl = RandomLabelForgetting(seed=seed, max_epochs=20)
    gs = GSLoRA(target_modules=("1", "3"), alpha=1e-2, beta=1.0, batch_size=16, epochs=20, seed=seed)
    gspp = GSLoRAPlusPlus(target_modules=("1", "3"), alpha=1e-2, beta=1.0, batch_size=16, epochs=20, seed=seed)
    return [Retrain(seed=seed, progress=progress), RetainFinetune(seed=seed), GradientAscent(seed=seed), ssd_auto,
            ssd10, LFSSD(alpha=10.0, seed=seed, batch_size=bs), iau, rl, gs, gspp]


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
        progress: bool = True, iau_gr: bool = False) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), seeds, quick, progress, iau_gr)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, seeds: int | None, quick: bool, progress: bool, iau_gr: bool) -> dict[str, Any]:
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
                ms = methods(seed, progress, kind, iau_gr)
                originals = {"IAU (GR original)": ev.train_original(data, "mlp", seed, progress=progress,
                                                                    regulariser=gradient_restriction(0.005))} \
                    if iau_gr else None
                runs.append(ev.compare(ms, data, model, reference=ms[0], originals=originals, progress=progress))
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
    study_seeds = list(range(n_seeds))
    studies = {"safeeraser": _safeeraser(study_seeds), "cupid": _cupid(study_seeds),
               "random_label": _random_label(study_seeds), "memorisation": _memorisation(study_seeds, quick)}
    results["studies"] = studies
    png2 = out / "unlearn_studies.png"
    _plot_studies(studies, png2)
    print(f"\nwrote {png2}")
    results["studies_png"] = str(png2)
    return results


def _print(title: str, rows: list[dict[str, Any]], keys: list[str]) -> None:
    print(f"\n{title}")
    print(ev.format_table(rows, keys))


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if key in r and not math.isnan(r[key])]
    return statistics.fmean(vals) if vals else math.nan


def _safeeraser(seeds: list[int]) -> list[dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for s in seeds:
        sc = ev.two_factor("digits", 3, s)
        model = ev.make_model("mlp", (66,), sc["n_outputs"], s)
        fit_epochs(model, sc["pretrain"], epochs=10, lr=1e-3, batch_size=64, seed=s)
        for lam in (0.0, 1.0):
            m = copy.deepcopy(model)
            method = SafeEraser(sc["refusal_class"], sc["decoupled"], lambda_pd=lam, seed=s)
            method.fit(m, sc["data"])
            runs.setdefault(method.label, []).append(
                {"sarr": ev.sarr(m, sc["sarr_prompts"], sc["refusal_class"]),
                 "harmful_refused": ev.sarr(m, sc["harmful_test"], sc["refusal_class"]),
                 "utility_acc": accuracy(m, sc["utility_test"])})
    rows = [{"method": k, **{c: _mean(v, c) for c in ("sarr", "harmful_refused", "utility_acc")}}
            for k, v in runs.items()]
    _print(f"SafeEraser on two-factor digit prompts (image x question, refusal output); mean over {len(seeds)} "
           "seed(s); SARR = benign image + harmful question refused (lower is better), in %", rows,
           ["sarr", "harmful_refused", "utility_acc"])
    return rows


def _cupid(seeds: list[int]) -> list[dict[str, Any]]:
    keys = ["fa_test_aligned", "fa_test_conflicting", "gap_test", "kept_test_acc"]
    runs: dict[str, list[dict[str, Any]]] = {}
    for s in seeds:
        sc = ev.biased("digits", 3, s)
        model = ev.make_model("mlp", (sc["n_features"],), 10, s)
        fit_epochs(model, sc["data"].full(s), epochs=20, lr=1e-3, batch_size=64, seed=s)
        runs.setdefault("Original", []).append(ev.group_accuracy(model, sc))
        for mode in ("ga", "ga_causal", "cupid"):
            m = copy.deepcopy(model)
            method = CUPID(mode=mode, lr=0.003, steps=300, target_forget_acc=0.5)
            method.fit(m, sc["data"])
            runs.setdefault(method.label, []).append(ev.group_accuracy(m, sc))
    rows = [{"method": k, **{c: _mean(v, c) for c in keys}} for k, v in runs.items()]
    _print(f"CUPID on biased digits (forget class 3; ascent until half its training examples are wrong); mean over "
           f"{len(seeds)} seed(s); forget-class test accuracy, bias-aligned vs conflicting, in %", rows, keys)
    return rows


def _random_label(seeds: list[int]) -> list[dict[str, Any]]:
    keys = ["forget_before", "forget_after", "a_test_after", "b_test_after", "generalisation", "probe_before",
            "probe_after"]
    runs = []
    for s in seeds:
        sc = probes.two_task("digits", s)
        model = ev.train_original(sc["data"], "mlp", s, epochs=15)
        runs.append(probes.random_label_study(RandomLabelForgetting(options=sc["a_options"], seed=s), model, sc))
    rows = [{"method": "RandomLabel", **{k: _mean(runs, k) for k in keys}}]
    _print(f"Random-label forgetting (task A = digits 0-4, 20 % of its training set; B = 5-9); mean over "
           f"{len(seeds)} seed(s); chance 20 %; probe = logistic regression with true labels on frozen features",
           rows, keys)
    return rows


def _memorisation(seeds: list[int], quick: bool) -> list[dict[str, Any]]:
    from sklearn.neighbors import KNeighborsClassifier

    from .. import datasets

    x, y = datasets.load("digits")
    rows = []
    for s in seeds:
        tr, _ = datasets.stratified_split(y, (0.6, 0.4), s)
        yn, flipped = mz.noisy_labels(y[tr], 0.05, s)
        r = mz.memorization(x[tr], yn, KNeighborsClassifier(1), n_runs=50 if quick else 200, seed=s)
        rows.append({"method": f"1-NN seed {s}", "mem_mislabelled": float(r["mem"][flipped].mean()),
                     "mem_others": float(r["mem"][~flipped].mean()),
                     "top_k_planted": mz.top_fraction(r["mem"], flipped), "mem": r["mem"], "flipped": flipped})
    _print("Feldman-Zhang memorisation on digits with 5 % of training labels flipped (1-NN, subsets of 70 %); "
           "top_k_planted = share of flipped labels among the highest scores, in %",
           [{k: v for k, v in r.items() if k not in ("mem", "flipped")} for r in rows],
           ["mem_mislabelled", "mem_others", "top_k_planted"])
    return rows


def _plot_studies(studies: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    se = studies["safeeraser"]
    axes[0].bar([r["method"] for r in se], [100 * r["sarr"] for r in se], color="tab:red", label="SARR")
    axes[0].bar([r["method"] for r in se], [100 * r["harmful_refused"] for r in se], color="none",
                edgecolor="k", label="harmful refused")
    axes[0].set_title("SafeEraser: SARR (lower is better)")
    axes[0].legend(fontsize=8)
    cu = studies["cupid"]
    w = 0.4
    axes[1].bar([i - w / 2 for i in range(len(cu))], [100 * r["fa_test_aligned"] for r in cu], w, label="aligned")
    axes[1].bar([i + w / 2 for i in range(len(cu))], [100 * r["fa_test_conflicting"] for r in cu], w,
                label="conflicting")
    axes[1].set_xticks(range(len(cu)))
    axes[1].set_xticklabels([r["method"] for r in cu], rotation=20, fontsize=8)
    axes[1].set_title("CUPID: forget-class test accuracy")
    axes[1].legend(fontsize=8)
    rl = studies["random_label"][0]
    names = ["forget_before", "forget_after", "a_test_after", "b_test_after", "probe_after"]
    axes[2].bar(names, [100 * rl[k] for k in names], color="tab:green")
    axes[2].axhline(20, ls="--", c="k", lw=1)
    axes[2].tick_params(axis="x", rotation=30, labelsize=8)
    axes[2].set_title("Random labels: accuracy vs probe (chance dashed)")
    mem = studies["memorisation"][0]
    axes[3].hist([mem["mem"][~mem["flipped"]].numpy(), mem["mem"][mem["flipped"]].numpy()], bins=20,
                 label=["clean", "mislabelled"], stacked=True)
    axes[3].set_yscale("log")
    axes[3].set_title("Memorisation scores (1-NN)")
    axes[3].legend(fontsize=8)
    for ax in axes[:3]:
        ax.set_ylabel("%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
