"""Benchmark: wall time of SSD against Retrain (and the other baselines) on the demo's scenarios.

Same scenarios as ``forgetcore demo unlearn`` (an MLP on real digits and MNIST; one whole class,
or a random 10 %), each method timed on a copy of the same trained model, one torch thread
(the demo's setting). SSD's time splits into the two importance passes and the dampening.
Usage: ``python benches/bench_unlearning.py [--quick]``.
"""

from __future__ import annotations

import copy
import time

import torch

from forgetcore.evaluation import unlearning as ev
from forgetcore.unlearning import SSD, GradientAscent, RetainFinetune, Retrain
from harness import Run, table


def main() -> None:
    # One run per method (each fit changes its copy of the model; fits take seconds), so no turns.
    run = Run("unlearning", __doc__.split("\n\n")[0], triad=False)
    torch.set_num_threads(1)
    out = []
    for name in ["digits"] if run.quick else ["digits", "mnist"]:
        for kind in ("full-class", "random-10%"):
            data = ev.full_class(name, 3, 0) if kind == "full-class" else ev.random_subset(name, 0.1, 0)
            model = ev.train_original(data, "mlp", 0)
            methods = [Retrain(), RetainFinetune(), GradientAscent(), SSD(alpha=10.0)]
            auto = SSD(alpha="auto")
            if kind != "full-class":
                auto.target = None  # set below from Retrain's forget accuracy
            methods.append(auto)
            rows, t_retrain, retrain_forget = [], None, None
            for m in methods:
                if m is auto and kind != "full-class":
                    m.target = retrain_forget
                work = copy.deepcopy(model)
                t0 = time.perf_counter()
                info = m.fit(work, data)
                dt = time.perf_counter() - t0
                res = ev.evaluate(work, data)
                if isinstance(m, Retrain):
                    t_retrain, retrain_forget = dt, res["forget_acc"]
                label = m.name + (" auto" if m is auto else (" a=10" if isinstance(m, SSD) else ""))
                rows.append((label, dt, info, res))
            for label, dt, info, res in rows:
                imp = f"{info['seconds_importance']:.3f}" if "seconds_importance" in info else "-"
                dmp = f"{info['seconds_dampen']:.3f}" if "seconds_dampen" in info else "-"
                out.append([f"{name} {kind}", label, f"{dt:.3f}", f"{t_retrain / dt:.1f}x", imp, dmp,
                            f"{100 * res['forget_acc']:.1f}", f"{100 * res['test_acc']:.1f}"])
    print(table(["scenario", "method", "fit s", "Retrain / this", "importance s", "dampen s", "forget acc",
                 "test acc"], out))
    run.finish()


if __name__ == "__main__":
    main()
