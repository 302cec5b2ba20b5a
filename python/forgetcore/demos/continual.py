"""``forgetcore demo cl``: Split-Digits class-incremental with Finetune, ER and Joint.

Five tasks of two digit classes each (scikit-learn's 1,797 real 8x8 digits), a small MLP trained
with SGD, three seeds (each seed draws its own train/val/test split, initialisation and batch
order). Prints average accuracy, average forgetting and backward transfer (mean ± sample std
over seeds) and writes ``cl.png`` (mean accuracy matrices and seed-0 learning curves) and
``cl_results.json`` (every run's accuracy matrix, curves and timings) to ``out_dir``.

Settings follow Chaudhry et al. 2019's ER protocol where they apply: stream batches of 10 plus
10 replayed examples, plain SGD; several epochs per task because the data set is tiny.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..continual import ER, Finetune, Joint, Trainer, scenarios
from ..evaluation import continual as metrics

log = logging.getLogger(__name__)

METHODS = ("Finetune", "ER", "Joint")
FULL = {"epochs": 10, "lr": 0.05, "batch_size": 10, "capacity": 200, "hidden": 100, "eval_every": 10}
QUICK = {**FULL, "epochs": 5, "eval_every": 20}


def mlp(input_shape: tuple[int, ...], n_classes: int, hidden: int = 100) -> torch.nn.Module:
    """Two hidden ReLU layers over the flattened image (the usual MLP of Split/Permuted MNIST)."""
    d = math.prod(input_shape)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(d, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes))


def run_one(method: str, seed: int, scenario: scenarios.Scenario | None = None, *,
            epochs: int = 10, lr: float = 0.05, batch_size: int = 10, capacity: int = 200,
            hidden: int = 100, eval_every: int | None = 10, progress: bool = False) -> dict[str, Any]:
    """One seeded run of ``method`` ("Finetune", "ER" or "Joint") on Split-Digits (class-IL).

    Returns ``Trainer.fit``'s dict plus ``"metrics"`` (:func:`metrics.summary`).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if scenario is None:
        scenario = scenarios.split("digits", n_tasks=5, mode="class", seed=seed)
    torch.manual_seed(seed)
    model = mlp(scenario.input_shape, scenario.n_classes, hidden)
    plugin = {"Finetune": Finetune, "Joint": Joint,
              "ER": lambda: ER(capacity, batch_size=batch_size, seed=seed)}[method]()
    trainer = Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=lr), [plugin],
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
    head = f"{'method':<9} | " + " | ".join(f"{c:>16}" for _, c in cols) + f" | {'train s':>11}"
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        if n_seeds > 1:
            cells = [f"{100 * s[k][0]:6.1f} ± {100 * s[k][1]:4.1f} %" for k, _ in cols]
            t = f"{s['train_s'][0]:5.2f} ± {s['train_s'][1]:3.2f}"
        else:  # one seed: no spread to report
            cells = [f"{100 * s[k][0]:6.1f} %" for k, _ in cols]
            t = f"{s['train_s'][0]:5.2f}"
        lines.append(f"{name:<9} | " + " | ".join(f"{c:>16}" for c in cells) + f" | {t:>11}")
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


def run(out_dir: str | Path = "forgetcore-out", seeds: int | None = None, quick: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Run the demo: every method on every seed; print the table, save PNG and JSON."""
    cfg = QUICK if quick else FULL
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
        return _run(out, cfg, n_seeds, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, cfg: dict[str, Any], n_seeds: int, progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    # torch imports its compiler when the first optimiser is built (seconds): do it here, so
    # the first method's training time does not include it.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    with tqdm(total=n_seeds * len(METHODS), desc="demo cl", unit="run", disable=not progress,
              dynamic_ncols=True) as bar:
        for seed in range(n_seeds):
            scenario = scenarios.split("digits", n_tasks=5, mode="class", seed=seed)
            for name in METHODS:
                bar.set_postfix_str(f"{name}, seed {seed}")
                r = run_one(name, seed, scenario, **cfg)
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
    png, js = out / "cl.png", out / "cl_results.json"
    plot(runs, png, title)
    wall = time.perf_counter() - t0
    result = {"config": {**cfg, "seeds": n_seeds, "dataset": "digits", "n_tasks": 5, "mode": "class"},
              "summary": {k: {m: list(v) for m, v in s.items()} for k, s in summary.items()},
              "runs": runs, "wall_s": wall, "png": str(png), "json": str(js)}
    js.write_text(json.dumps(result, indent=1))
    print(f"wrote {png} and {js}")
    return result
