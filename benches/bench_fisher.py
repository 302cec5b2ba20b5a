"""Benchmark: exact empirical Fisher diagonal of an MLP over the 1,797 real digits, all sides in one run.

- baseline: one backward per sample (benches/baselines/fisher_loop.py), the public code's way;
- BackPACK ``SumGradSquared`` (backpack-for-pytorch), the peer library, on batches of 256;
- torch.func ``vmap(grad)`` per-sample gradients in chunks of 256, squared and summed (best plain torch);
- forgetcore ``fisher_diagonal(mode="empirical")`` (squared-input x squared-output-gradient
  contraction for Linear layers), and ``mode="batch"`` for scale (a different, biased quantity).

Every exact estimate is checked against the loop (rtol 1e-5, atol 1e-6 * max F). Times are the
best of a few runs on one torch thread (this MLP is small: a second intra-op thread only adds
synchronisation, and on a shared machine it makes every number noisier).
Usage: ``python benches/bench_fisher.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines.fisher_loop import per_sample_fisher
from forgetcore import datasets
from forgetcore.importance import fisher_diagonal


def timeit(fn, reps):
    out = fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


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


def main():
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # BackPACK's hooks
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = datasets.load("digits")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10)).eval()
    n_par = sum(p.numel() for p in model.parameters())
    reps = 2 if args.quick else 5
    ds = TensorDataset(x, y)
    t_loop, want = timeit(lambda: per_sample_fisher(model, x, y), 1 if args.quick else 2)
    rows = [("baseline: per-sample backward loop", t_loop, "oracle")]
    t, got = timeit(lambda: backpack_fisher(model, x, y), reps)
    rows.append(("BackPACK SumGradSquared (bs 256)", t, check(got, want)))
    t, got = timeit(lambda: vmap_fisher(model, x, y), reps)
    rows.append(("torch.func vmap(grad) (chunks 256)", t, check(got, want)))
    t, got = timeit(lambda: fisher_diagonal(model, ds, mode="empirical", batch_size=256), reps)
    rows.append(("forgetcore empirical (bs 256)", t, check(got, want)))
    t_fc = t
    t, got = timeit(lambda: fisher_diagonal(model, ds, mode="empirical", batch_size=len(x)), reps)
    rows.append(("forgetcore empirical (one batch)", t, check(got, want)))
    t, _ = timeit(lambda: fisher_diagonal(model, ds, mode="batch", batch_size=64), reps)
    rows.append(("forgetcore batch (bs 64; not exact)", t, "-"))
    print(f"threads: torch {torch.get_num_threads()}")
    print(f"Empirical Fisher diagonal, MLP 64-128-128-10 ({n_par} parameters), {len(x)} digits")
    print(f"{'method':<38} {'ms':>9} {'loop / this':>12} {'this / fc':>10}  values")
    for name, t, ok in rows:
        print(f"{name:<38} {1e3 * t:9.1f} {t_loop / t:11.1f}x {t / t_fc:9.2f}x  {ok}")


if __name__ == "__main__":
    main()
