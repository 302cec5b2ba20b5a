"""Which Fisher and which full-set order should SSD use by default?

SSD with ``fisher="batch"`` in both full-set orders (``"shuffled"``, ours; ``"official"``, the
official code's unshuffled retain-then-forget) and ``fisher="empirical"`` (exact per-sample
Fisher, order-free), each at a fixed alpha = 10 and with ``alpha="auto"``, on digits and MNIST,
full-class forgetting (3 seeds x classes 1, 3, 8) and random 10 % forgetting (3 seeds; batch
128 as the official random-forgetting code; auto's target = a retrained model's forget accuracy).

Full-class: forget = test accuracy on the forgotten class, kept = test accuracy on the others.
Random: forget = accuracy on the forget set (Retrain's is the reference), kept = test accuracy.

    PYTHONPATH=python python benches/bench_ssd_fisher.py --out ssd_fisher.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from forgetcore.evaluation import unlearning as ev
from forgetcore.unlearning import SSD, Retrain

VARIANTS = [("batch", "shuffled", 10.0), ("batch", "official", 10.0), ("batch", "shuffled", "auto"),
            ("batch", "official", "auto"), ("empirical", "shuffled", 10.0), ("empirical", "shuffled", "auto")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="ssd_fisher.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", default="digits,mnist")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.datasets.split(","):
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            orig = ev.train_original(ev.full_class(name, 1, seed), "mlp", seed)
            for cls in (1, 3, 8):
                data = ev.full_class(name, cls, seed)
                for fisher, order, alpha in VARIANTS:
                    m = copy.deepcopy(orig)
                    info = SSD(alpha=alpha, fisher=fisher, order=order, seed=seed).fit(m, data)
                    r = ev.evaluate(m, data)
                    rows.append({"dataset": name, "scenario": "full-class", "seed": seed, "cls": cls,
                                 "fisher": fisher, "order": order, "alpha_mode": str(alpha), "alpha": info["alpha"],
                                 "dampened": info["dampened"], "forget": r["test_forget_acc"],
                                 "kept": r["test_retain_acc"]})
            data = ev.random_subset(name, 0.1, seed)
            orig = ev.train_original(data, "mlp", seed)
            ref = copy.deepcopy(orig)
            Retrain(seed=seed).fit(ref, data)
            rr = ev.evaluate(ref, data)
            for fisher, order, alpha in VARIANTS:
                m = copy.deepcopy(orig)
                info = SSD(alpha=alpha, fisher=fisher, order=order, seed=seed, batch_size=128,
                           target=rr["forget_acc"]).fit(m, data)
                r = ev.evaluate(m, data)
                rows.append({"dataset": name, "scenario": "random-10%", "seed": seed, "cls": None, "fisher": fisher,
                             "order": order, "alpha_mode": str(alpha), "alpha": info["alpha"],
                             "dampened": info["dampened"], "forget": r["forget_acc"], "kept": r["test_acc"],
                             "retrain_forget": rr["forget_acc"], "retrain_test": rr["test_acc"]})
            print(f"{name} seed {seed} done in {time.perf_counter() - t0:.0f} s", flush=True)
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
    print(table(rows))


def table(rows: list[dict]) -> str:
    keys = sorted({(r["dataset"], r["scenario"]) for r in rows})
    out = ["| data | scenario | fisher | order | alpha | forget acc (mean, max) | kept acc (mean, min) | dampened |",
           "|---|---|---|---|---|---|---|---|"]
    for d, sc in keys:
        for fisher, order, alpha in VARIANTS:
            sel = [r for r in rows if (r["dataset"], r["scenario"], r["fisher"], r["order"], r["alpha_mode"])
                   == (d, sc, fisher, order, str(alpha))]
            if not sel:
                continue
            f = [r["forget"] for r in sel]
            k = [r["kept"] for r in sel]
            damp = statistics.fmean(r["dampened"] for r in sel)
            out.append(f"| {d} | {sc} | {fisher} | {order} | {alpha} | {statistics.fmean(f):.3f}, {max(f):.3f} | "
                       f"{statistics.fmean(k):.3f}, {min(k):.3f} | {damp:.0f} |")
        ref = [r for r in rows if (r["dataset"], r["scenario"]) == (d, sc) and "retrain_forget" in r]
        if ref:
            out.append(f"| {d} | {sc} | Retrain | | | {statistics.fmean(r['retrain_forget'] for r in ref):.3f} | "
                       f"{statistics.fmean(r['retrain_test'] for r in ref):.3f} | |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
