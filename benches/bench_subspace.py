"""Subspace benchmarks: forgetcore against the best torch formulation and GPM's own way, same run.

1. Projection of 12 (768 x 3072) gradients against input-side bases of rank 64 and 256:
   forgetcore ``project_out_`` (Rust/faer) vs torch ``g.addmm_(g @ U, U.T, alpha=-1)`` per layer
   vs GPM's dense ``g - g @ (U U^T)`` (projector precomputed, as GPM does once per task).
2. Basis extension for 12 (768 x 512) representation matrices against a rank-64 basis:
   forgetcore ``extend_bases`` vs torch (eigh of the Gram matrix R^T R) vs GPM's two-SVD numpy.
3. The memory-bound flat projection (GU) against torch, in GB/s next to a stream triad.

Run: PYTHONPATH=python python benches/bench_subspace.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baselines import gpm_numpy
from forgetcore import _core, subspace


def timeit(fn, reps: int, setup=None) -> float:
    times = []
    for _ in range(reps + 1):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # first run warms caches and thread pools


def orth(d: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=g))[0].contiguous()


def torch_extend(bases, reps, threshold):
    """Best torch: residual, eigh of the smaller Gram matrix, GPM's energy loop, then cat."""
    out = []
    for u, a in zip(bases, reps):
        res = a - u @ (u.T @ a)
        total = (a * a).sum()
        lam, v = torch.linalg.eigh(res.T @ res)
        lam, v = lam.flip(0).clamp_min(0), v.flip(1)
        acc = (total - lam.sum()) / total + torch.cat([lam.new_zeros(1), lam.cumsum(0)[:-1]]) / total
        r = int(torch.cumprod((acc < threshold).int(), 0).sum())
        w = res @ v[:, :r]
        w = w / w.norm(dim=0)
        out.append(torch.cat([u, w], 1))
    return out


def triad_gbs(n: int = 20_000_000) -> float:
    a, b, c = (torch.empty(n).uniform_() for _ in range(3))
    t = timeit(lambda: torch.add(b, c, alpha=3.0, out=a), 5)
    return 3 * 4 * n / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    print(f"threads: torch {torch.get_num_threads()}, rayon {_core.num_threads()}")
    rows = []

    # 1. projection
    layers, out_d, in_d = 12, 768, 3072
    g0 = [torch.randn(out_d, in_d, generator=torch.Generator().manual_seed(i)) for i in range(layers)]
    for rank in (64, 256):
        bases = [orth(in_d, rank, 100 + i) for i in range(layers)]
        proj = gpm_numpy.dense_projectors(bases)
        grads = [g.clone() for g in g0]

        def reset():
            for g, s in zip(grads, g0):
                g.copy_(s)

        t_fc = timeit(lambda: subspace.project_out_(grads, bases), reps, reset)
        t_fc_nc = timeit(lambda: subspace.project_out_(grads, bases, check=False), reps, reset)

        def torch_best():
            for g, u in zip(grads, bases):
                g.addmm_(g @ u, u.T, alpha=-1.0)

        t_torch = timeit(torch_best, reps, reset)
        t_gpm = timeit(lambda: gpm_numpy.project_dense(grads, proj), 1, reset)  # ~170 GFLOP a run
        flops = layers * 4 * out_d * in_d * rank
        rows.append((f"project 12x(768x3072) rank {rank}", t_fc, t_torch, t_gpm,
                     f"{flops / t_fc / 1e9:.0f} GFLOP/s; no check {t_fc_nc * 1e3:.1f} ms"))
        # correctness on the same data
        reset()
        subspace.project_out_(grads, bases)
        want = [s - (s @ u) @ u.T for s, u in zip(g0, bases)]
        assert max(float((g - w).abs().max()) for g, w in zip(grads, want)) < 1e-3

    # 2. basis extension
    d, n, r0, th = 768, 512, 64, 0.97
    gen = torch.Generator().manual_seed(7)
    # Representations with a decaying spectrum, like real activations.
    scale = torch.logspace(0, -3, d)
    reps_t = [((torch.randn(d, d, generator=gen) * scale) @ torch.randn(d, n, generator=gen)).contiguous()
              for _ in range(layers)]
    bases = [orth(d, r0, 200 + i) for i in range(layers)]
    t_fc = timeit(lambda: subspace.extend_bases(bases, reps_t, th), reps)
    t_torch = timeit(lambda: torch_extend(bases, reps_t, th), reps)
    np_b, np_r = [b.numpy() for b in bases], [a.numpy() for a in reps_t]
    t_gpm = timeit(lambda: gpm_numpy.update_bases(np_b, np_r, th), max(2, reps // 2))
    got = subspace.extend_bases(bases, reps_t, th)
    ranks_np = [b.shape[1] for b in gpm_numpy.update_bases(np_b, np_r, th)]
    ranks_fc = [b.shape[1] for b in got]
    rows.append(("extend 12x(768x512) from rank 64", t_fc, t_torch, t_gpm,
                 f"ranks forgetcore {ranks_fc[0]}..{max(ranks_fc)} / GPM {ranks_np[0]}..{max(ranks_np)}"))

    # 3. flat projection (memory-bound)
    nflat, k = 20_000_000, 4
    v = subspace.orthonormalize(torch.randn(k, nflat))[0]
    gflat, g0flat = torch.randn(nflat), None
    g0flat = gflat.clone()
    t_fc = timeit(lambda: subspace.project_out_flat_(gflat, v, check=False), reps, lambda: gflat.copy_(g0flat))
    t_torch = timeit(lambda: gflat.sub_(v.T @ (v @ gflat)), reps, lambda: gflat.copy_(g0flat))
    bw = triad_gbs()
    moved = 4 * nflat * (2 * k + 2)  # read V twice, read g twice and write it once (approx.)
    rows.append((f"flat project n=2e7, rank {k}", t_fc, t_torch, float("nan"),
                 f"{moved / t_fc / 1e9:.1f} GB/s vs triad {bw:.1f} GB/s"))

    print(f"\n{'case':36s} {'forgetcore':>11s} {'torch best':>11s} {'GPM way':>11s} "
          f"{'vs torch':>9s} {'vs GPM':>8s}  notes")
    for name, fc, tb, gp, note in rows:
        print(f"{name:36s} {fc * 1e3:9.1f}ms {tb * 1e3:9.1f}ms "
              f"{(gp * 1e3 if gp == gp else float('nan')):9.1f}ms {tb / fc:8.2f}x {gp / fc:7.2f}x  {note}")


if __name__ == "__main__":
    main()
