"""``forgetcore demo cl``: Split-Digits class-incremental, every continual method in one table.

Five tasks of two digit classes each (scikit-learn's 1,797 real 8x8 digits), a small MLP trained
with SGD, three seeds (each seed draws its own train/val/test split, initialisation and batch
order). Prints average accuracy, average forgetting and backward transfer (mean ± sample std
over seeds) and writes ``cl.png`` (mean accuracy matrices and seed-0 learning curves),
``cl_stability_gap.png`` (ER, seed 0: task-1 accuracy at every iteration across the stream,
task boundaries marked; min-ACC, WC-ACC and WF^10 printed) and ``cl_results.json`` (every run's
accuracy matrix, curves and timings) to ``out_dir``.

The rows come from :data:`METHODS`, a registry ``name -> Method(make, bias_free_head)``; other
rows can be added with :func:`register`. DER++, Refresh (refresh learning on DER++) and k-FPF are
the selective-training family's vision methods.
All methods share one protocol, after Chaudhry et al. 2019's ER where it applies: stream
batches of 10 (plus 10 replayed for the replay methods), plain SGD, memory 200, several epochs
per task because the data set is tiny. UER and WA use a bias-free output layer (their method
needs it), and WA keeps its recipe's SGD momentum 0.9; UER is meant for one pass (its claim
test runs it online) and runs the shared protocol here. ``--full`` runs 10 epochs per task instead of 4.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..continual import ER, UER, WA, Finetune, Joint, PowerLawRehearsal, Trainer, ViewBatch, scenarios
from ..continual.kfpf import kfpf_plugins
from ..continual.refresh import derpp_plugins, refresh_plugins
from ..evaluation import continual as metrics

log = logging.getLogger(__name__)

FULL = {"epochs": 10, "lr": 0.05, "batch_size": 10, "capacity": 200, "hidden": 100, "eval_every": 10}
DEFAULT = {**FULL, "epochs": 4, "eval_every": 20}
QUICK = {**FULL, "epochs": 2, "eval_every": 40}


@dataclass(frozen=True)
class Method:
    """A row of the demo's table: ``make(cfg, seed) -> plugins`` (``cfg`` holds ``capacity``,
    ``batch_size``, ``epochs``, ...), whether the model's output layer must be bias-free, and
    the SGD momentum of the method's own recipe (0: the shared plain SGD)."""

    make: Callable[[dict[str, Any], int], list[Any]]
    bias_free_head: bool = False
    momentum: float = 0.0


METHODS: dict[str, Method] = {
    "Finetune": Method(lambda cfg, seed: [Finetune()]),
    "ER": Method(lambda cfg, seed: [ER(cfg["capacity"], batch_size=cfg["batch_size"], seed=seed)]),
    "UER": Method(lambda cfg, seed: [UER(cfg["capacity"], batch_size=cfg["batch_size"], seed=seed)],
                  bias_free_head=True),
    # WA's recipe (official code and PyCIL) is SGD with momentum 0.9: with plain SGD the new
    # classes' zero-started rows learn too slowly under the growing KD weight (about 35 % ACC)
    "WA": Method(lambda cfg, seed: [WA(memory=cfg["capacity"])], bias_free_head=True, momentum=0.9),
    # R = 5: the stream batch of 10 holds two examples' five copies each
    "ViewBatch": Method(lambda cfg, seed: [ER(cfg["capacity"], batch_size=cfg["batch_size"], seed=seed),
                                           ViewBatch(5)]),
    "PowerLaw": Method(lambda cfg, seed: [PowerLawRehearsal(cfg["capacity"], seed=seed)]),
    # the selective-training family's vision methods (each replaces the Trainer's loss)
    "DER++": Method(lambda cfg, seed: derpp_plugins(seed, capacity=cfg["capacity"])),
    "Refresh": Method(lambda cfg, seed: refresh_plugins(seed, capacity=cfg["capacity"])),
    "k-FPF": Method(lambda cfg, seed: kfpf_plugins(seed, capacity=cfg["capacity"])),
    "Joint": Method(lambda cfg, seed: [Joint()]),
}


def register(name: str, method: Method) -> None:
    """Add a row to the demo's table (before ``run``); names must be new."""
    if not isinstance(method, Method):
        raise TypeError(f"method: expected a forgetcore.demos.continual.Method, got {type(method).__name__}")
    if name in METHODS:
        raise ValueError(f"name: {name!r} is already a row of the demo")
    METHODS[name] = method


def mlp(input_shape: tuple[int, ...], n_classes: int, hidden: int = 100, bias_head: bool = True) -> torch.nn.Module:
    """Two hidden ReLU layers over the flattened image (the usual MLP of Split/Permuted MNIST)."""
    d = math.prod(input_shape)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(d, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes, bias=bias_head))


def run_one(method: str, seed: int, scenario: scenarios.Scenario | None = None, *,
            epochs: int = 10, lr: float = 0.05, batch_size: int = 10, capacity: int = 200,
            hidden: int = 100, eval_every: int | None = 10, progress: bool = False,
            extra_plugins: list[Any] | None = None) -> dict[str, Any]:
    """One seeded run of ``method`` (a name in :data:`METHODS`) on Split-Digits (class-IL).

    ``extra_plugins`` run alongside (e.g. a :class:`metrics.ContinualEvaluation`). Returns
    ``Trainer.fit``'s dict plus ``"metrics"`` (:func:`metrics.summary`).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {tuple(METHODS)}, got {method!r}")
    if scenario is None:
        scenario = scenarios.split("digits", n_tasks=5, mode="class", seed=seed)
    spec = METHODS[method]
    cfg = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "capacity": capacity, "hidden": hidden}
    torch.manual_seed(seed)
    model = mlp(scenario.input_shape, scenario.n_classes, hidden, bias_head=not spec.bias_free_head)
    plugins = spec.make(cfg, seed) + list(extra_plugins or [])
    trainer = Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=spec.momentum), plugins,
                      epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
                      eval_every=eval_every)
    result = trainer.fit(scenario)
    result["metrics"] = metrics.summary(result["R"], result["initial"])
    return result


def _mean_std(v: list[float]) -> tuple[float, float]:
    a = np.asarray(v, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def table(summary: dict[str, dict[str, tuple[float, float]]], n_seeds: int) -> str:
    """The printed results table (percentages, mean ± sample std over seeds)."""
    cols = [("acc", "avg accuracy"), ("forgetting", "avg forgetting"), ("bwt", "BWT")]
    head = f"{'method':<10} | " + " | ".join(f"{c:>16}" for _, c in cols) + f" | {'train s':>11}"
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        if n_seeds > 1:
            cells = [f"{100 * s[k][0]:6.1f} ± {100 * s[k][1]:4.1f} %" for k, _ in cols]
            t = f"{s['train_s'][0]:5.2f} ± {s['train_s'][1]:3.2f}"
        else:  # one seed: no spread to report
            cells = [f"{100 * s[k][0]:6.1f} %" for k, _ in cols]
            t = f"{s['train_s'][0]:5.2f}"
        lines.append(f"{name:<10} | " + " | ".join(f"{c:>16}" for c in cells) + f" | {t:>11}")
    lines.append(f"({n_seeds} seed{'s' if n_seeds > 1 else ''}; accuracy after the last task, "
                 "forgetting and BWT as in Chaudhry et al. 2018 and Lopez-Paz & Ranzato 2017)")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Mean accuracy matrices (top) and seed-0 learning curves (bottom), one column per method."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    names = list(runs)
    fig = Figure(figsize=(4.2 * len(names), 7.6), layout="constrained")
    axes = fig.subplots(2, len(names), squeeze=False)
    for c, name in enumerate(names):
        R = 100 * np.mean([np.asarray(r["R"]) for r in runs[name]], axis=0)
        T = R.shape[0]
        ax = axes[0, c]
        im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
        for i in range(T):
            for j in range(T):
                ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if R[i, j] < 60 else "black")
        ax.set_title(f"{name}: accuracy matrix (%)")
        ax.set_xlabel("evaluated on task j")
        ax.set_ylabel("after training task i")
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        cur = runs[name][0]["curves"]
        acc = np.array([[np.nan if a is None else 100 * a for a in row] for row in cur["acc"]])
        ax = axes[1, c]
        for j in range(acc.shape[1]):
            ax.plot(cur["step"], acc[:, j], label=f"task {j}", lw=1.2)
        starts = [s for s, prev, t in zip(cur["step"][1:], cur["task"], cur["task"][1:]) if t != prev]
        for s in starts:
            ax.axvline(s, color="grey", lw=0.6, ls="--")
        ax.set_ylim(-3, 103)
        ax.set_xlabel("optimisation step")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}: learning curves (seed 0)")
        if c == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def plot_stability_gap(curves: dict[str, Any], path: Path, title: str) -> None:
    """Task-1 (id 0) accuracy at every evaluated iteration across the stream, task boundaries marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax = fig.subplots()
    step = np.asarray(curves["step"])
    task = np.asarray(curves["task"])
    acc0 = np.array([np.nan if row[0] is None else 100 * row[0] for row in curves["acc"]])
    ax.plot(step, acc0, lw=1.0, color="tab:blue", label="task 1 (classes 0, 1)")
    for i in range(1, len(task)):
        if task[i] != task[i - 1]:
            ax.axvline(step[i], color="grey", lw=0.7, ls="--")
            ax.text(step[i], 101, f"task {task[i] + 1}", fontsize=7, ha="left", va="bottom")
    m0 = metrics.min_acc(curves, per_task=True).get(0)
    if m0 is not None:
        ax.axhline(100 * m0, color="tab:red", lw=0.8, ls=":", label=f"min-ACC of task 1: {100 * m0:.0f} %")
    ax.set_ylim(-3, 108)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)


def run_scole(out: Path, n_seeds: int, n_tasks: int, progress: bool) -> dict[str, Any]:
    """SCoLe (Lesort et al. 2023): ``n_tasks`` tasks of 2 digit classes drawn with re-occurrence,
    one epoch each, Adam 1e-3, MLP 64-256-10, full-test accuracy after every task, with and
    without per-minibatch logit masking; prints the accuracy of the first and last 10 tasks and
    writes ``cl_scole.png``."""
    from matplotlib.figure import Figure

    from ..continual import LogitMask

    curves: dict[str, list[list[float]]] = {"masked": [], "unmasked": []}
    for seed in tqdm(range(n_seeds), desc="SCoLe", disable=not progress, leave=False):
        sc = scenarios.scole("digits", n_tasks=n_tasks, seed=seed)
        for name, plugins in (("masked", [LogitMask()]), ("unmasked", [])):
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                        torch.nn.Linear(256, 10))
            tr = Trainer(model, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), plugins, epochs=1,
                         batch_size=64, seed=seed, progress=False, eval_every=None, eval_tasks="current")
            r = tr.fit(sc)
            curves[name].append([r["R"][t][t] for t in range(n_tasks)])
    print(f"SCoLe, {n_tasks} tasks of 2 digit classes with re-occurrence ({n_seeds} seed(s)); full-test accuracy "
          "(a model that knows only the current pair: about 20 %):")
    for name, cs in curves.items():
        a = np.asarray(cs)
        first, last = a[:, :10].mean(1), a[:, -10:].mean(1)
        print(f"  {name:<9} first 10 tasks {100 * first.mean():5.1f} ± {100 * first.std():4.1f} %, "
              f"last 10 tasks {100 * last.mean():5.1f} ± {100 * last.std():4.1f} %")
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, cs in curves.items():
        a = 100 * np.asarray(cs)
        ax.plot(np.arange(1, n_tasks + 1), a.mean(0), label=f"{name} (mean of {n_seeds})", lw=1.0)
    ax.axhline(20, color="grey", lw=0.7, ls=":", label="knows only the current pair")
    ax.set_xlabel("task")
    ax.set_ylabel("full test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("SCoLe on digits: knowledge accumulates over a long stream with re-occurring classes", fontsize=9)
    png = out / "cl_scole.png"
    fig.savefig(png, dpi=110)
    return {"n_tasks": n_tasks, "curves": curves, "png": str(png)}


def run(out_dir: str | Path = "forgetcore-out", seeds: int | None = None, quick: bool = False,
        progress: bool = True, full: bool = False, scole: int | None = None) -> dict[str, Any]:
    """Run the demo: every method on every seed; print the table, save PNGs and JSON.
    ``scole=N`` also runs a SCoLe stream of N tasks per seed (:func:`run_scole`)."""
    cfg = QUICK if quick else FULL if full else DEFAULT
    n_seeds = (1 if quick else 3) if seeds is None else int(seeds)
    if n_seeds < 1:
        raise ValueError(f"seeds: expected an int >= 1, got {seeds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One intra-op thread: a 100-unit MLP gains nothing from more, and on a busy machine the
    # extra threads' spin-waits make it several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = _run(out, cfg, n_seeds, progress)
        if scole:
            result["scole"] = run_scole(out, n_seeds, int(scole), progress)
            (out / "cl_results.json").write_text(json.dumps(result, indent=1))
        return result
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, cfg: dict[str, Any], n_seeds: int, progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    # torch imports its compiler when the first optimiser is built (seconds): do it here, so
    # the first method's training time does not include it.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    gap = metrics.ContinualEvaluation(every=2, subset_size=None)  # ER, seed 0: the stability gap
    with tqdm(total=n_seeds * len(METHODS), desc="demo cl", unit="run", disable=not progress,
              dynamic_ncols=True) as bar:
        for seed in range(n_seeds):
            scenario = scenarios.split("digits", n_tasks=5, mode="class", seed=seed)
            for name in METHODS:
                bar.set_postfix_str(f"{name}, seed {seed}")
                extra = [gap] if (name, seed) == ("ER", 0) else []
                r = run_one(name, seed, scenario, **cfg, extra_plugins=extra)
                runs[name].append(r)
                log.info("%s seed %d: %s", name, seed, r["metrics"])
                bar.update(1)
    summary = {}
    for name, rs in runs.items():
        s = {k: _mean_std([r["metrics"][k] for r in rs]) for k in ("acc", "forgetting", "bwt")}
        s["train_s"] = _mean_std([sum(r["timings"]["train_s"]) for r in rs])
        summary[name] = s
    title = (f"Split-Digits class-incremental (5 tasks x 2 classes), MLP {cfg['hidden']}-{cfg['hidden']}, "
             f"{cfg['epochs']} epochs/task, ER memory {cfg['capacity']}, {n_seeds} seed(s)")
    print(title)
    print(table(summary, n_seeds), flush=True)
    png, js, gap_png = out / "cl.png", out / "cl_results.json", out / "cl_stability_gap.png"
    plot(runs, png, title)
    sg = metrics.stability_gap(gap.curves) if "ER" in METHODS else {}
    if sg:
        print(f"stability gap (ER, seed 0, evaluated every 2 steps): min-ACC {100 * sg['min_acc']:.1f} %, "
              f"WC-ACC {100 * sg['wc_acc']:.1f} %, WF^10 {100 * sg['wf']:.1f} points, "
              f"final accuracy of tasks 1-4 {100 * np.mean(runs['ER'][0]['R'][-1][:4]):.1f} %")
        plot_stability_gap(gap.curves, gap_png, f"ER on Split-Digits, seed 0: accuracy of task 1 every 2 steps "
                           f"(average min-ACC of tasks 1-4 {100 * sg['min_acc']:.0f} %, "
                           f"WC-ACC {100 * sg['wc_acc']:.0f} %)")
    wall = time.perf_counter() - t0
    result = {"config": {**cfg, "seeds": n_seeds, "dataset": "digits", "n_tasks": 5, "mode": "class"},
              "summary": {k: {m: list(v) for m, v in s.items()} for k, s in summary.items()},
              "runs": runs, "wall_s": wall, "png": str(png), "json": str(js),
              "stability_gap": {"metrics": sg, "curves": gap.curves, "png": str(gap_png) if sg else None}}
    js.write_text(json.dumps(result, indent=1))
    print(f"wrote {png}, {gap_png} and {js} ({wall:.0f} s)")
    return result
