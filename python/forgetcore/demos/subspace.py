"""``forgetcore demo subspace``: gradient projection on Permuted-Digits.

Two sections on the same stream (5 permutations of the 64 pixels of sklearn's digits, one
shared head, a bias-free MLP 64-100-100-10 as in the GPM/FOT papers):

1. centralised: Finetune vs ER vs GPM (Saha et al., ICLR 2021) with ``forgetcore.continual.Trainer``;
2. federated (10 IID clients, all taking part in every round): FedAvg vs FOT (Bakman et al.,
   ICLR 2024), next to centralised GPM.

With ``--flower``, a third section runs FOT on Flower's deployment engine on localhost (one
SuperLink, two SuperNodes as separate processes, ``forgetcore.flower``) and prints how far it is
from the in-process FOT with two clients (the same numbers: each client draws from its own
(seed, task, round, client) generator). Flower polls every 3 s, so each round costs seconds.

Seeds are independent: ``--jobs N`` runs them in N spawned processes (one torch thread each),
with the same results as the sequential run.

Prints ACC (mean final accuracy) and FGT (mean forgetting) per method (mean +- std over seeds),
and writes ``subspace.png`` (bars) plus the per-method accuracy matrices.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..continual import ER, FOT, GPM, Finetune, Trainer, scenarios
from ..distributed import sweep
from ..evaluation.continual import average_accuracy, average_forgetting

log = logging.getLogger(__name__)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 100, bias=False), nn.ReLU(),
                         nn.Linear(100, 100, bias=False), nn.ReLU(), nn.Linear(100, 10, bias=False))


def one_seed(seed: int, epochs: int, rounds: int, progress: bool = False, n_tasks: int = 5) -> dict[str, list]:
    """Every method of sections 1 and 2 on one seed: name -> accuracy matrix (what ``--jobs`` farms out)."""
    sc = scenarios.permuted("digits", n_tasks=n_tasks, seed=seed)
    runs: dict[str, list] = {}
    central = {"Finetune": [Finetune()],
               "ER": [ER(capacity=200, seed=seed)],
               "GPM": [GPM([0.95, 0.99, 0.99], seed=seed)]}
    for name, plugins in central.items():
        t = Trainer(mlp(seed), lambda m: torch.optim.SGD(m.parameters(), lr=0.05), plugins=plugins,
                    epochs=epochs, batch_size=16, seed=seed, progress=progress, eval_every=None)
        runs[name] = t.fit(sc)["R"]
    for name, orth in (("FedAvg", False), ("FOT", True)):
        f = FOT(mlp(seed), n_clients=10, rounds=rounds, lr=0.1, epsilon=0.95, orthogonal=orth,
                seed=seed, progress=progress)
        runs[name] = f.fit(sc)["R"]
    return runs


def on_flower(seed: int, n_tasks: int, rounds: int, progress: bool) -> tuple[list, float]:
    """FOT on Flower's deployment engine (2 SuperNodes) and its largest weight difference from the
    in-process FOT with 2 clients on the same seed."""
    from .. import flower

    cfg = {"n-tasks": n_tasks, "rounds": rounds, "seed": seed, "lr": 0.1, "epsilon": 0.95}
    got = flower.deploy_local(cfg, n_nodes=2)
    f = FOT(flower.build_model(seed), n_clients=2, rounds=rounds, lr=0.1, epsilon=0.95, seed=seed,
            progress=progress)
    f.fit(flower.build_scenario(n_tasks, seed))
    diff = max(float((v - got["model"][k]).abs().max()) for k, v in f.model.state_dict().items())
    return got["R"], diff


def run(out_dir: Path | str = "forgetcore-out", seeds: int | None = None, quick: bool = False,
        progress: bool = True, flower: bool = False, jobs: int = 1) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_seeds = seeds or (1 if quick else 3)
    epochs, rounds = (2, 5) if quick else (3, 10)
    results: dict[str, dict[str, list]] = {}

    def record(name: str, R: list) -> None:
        r = results.setdefault(name, {"ACC": [], "FGT": [], "R": []})
        r["ACC"].append(average_accuracy(R))
        r["FGT"].append(average_forgetting(R))
        r["R"].append([[float(v) for v in row] for row in R])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLPs: one thread is fastest (and what every --jobs worker uses)
    try:
        per_seed = sweep(one_seed, range(n_seeds), processes=jobs, progress=progress, desc="seeds",
                         epochs=epochs, rounds=rounds)
        for runs in per_seed:
            for name, R in runs.items():
                record(name, R)
        flower_diff = None
        if flower:
            n_tasks, f_rounds = (2, 1) if quick else (5, 3)
            print(f"\nFOT on Flower: 1 SuperLink + 2 SuperNodes on localhost, Permuted-Digits[:{n_tasks}], "
                  f"{f_rounds} round(s) per task (seed 0; Flower polls every 3 s, so this takes a while)", flush=True)
            R, flower_diff = on_flower(0, n_tasks, f_rounds, progress)
            record("FOT-Flower", R)
    finally:
        torch.set_num_threads(threads)

    print(f"\nPermuted-Digits, 5 tasks, {n_seeds} seed(s): ACC / FGT (mean +- std)")
    print(f"{'method':10s} {'setting':12s} {'ACC':>14s} {'FGT':>14s}")
    for name, r in results.items():
        setting = {"FedAvg": "federated", "FOT": "federated", "FOT-Flower": "Flower"}.get(name, "centralised")
        print(f"{name:10s} {setting:12s} {np.mean(r['ACC']):7.3f} +- {np.std(r['ACC']):.3f} "
              f"{np.mean(r['FGT']):7.3f} +- {np.std(r['FGT']):.3f}")
    if flower_diff is not None:
        print(f"FOT-Flower (2 nodes, fewer tasks) vs in-process FOT with 2 clients: largest weight difference "
              f"{flower_diff:.2e}")
        results["FOT-Flower"]["max_weight_diff_vs_in_process"] = [flower_diff]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("ACC", "FGT")):
        means = [np.mean(results[n][key]) for n in names]
        stds = [np.std(results[n][key]) for n in names]
        ax.bar(names, means, yerr=stds, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(f"{key} on Permuted-Digits (5 tasks)")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "subspace.png", dpi=120)
    plt.close(fig)
    (out / "subspace.json").write_text(json.dumps(results, indent=1))
    return results
