"""Subspace benchmarks: forgetcore against the best torch formulation and GPM's own way, same run.

1. Projection of 12 (768 x 3072) gradients against input-side bases of rank 64 and 256:
   forgetcore ``project_out_`` (Rust/faer) vs torch ``g.addmm_(g @ U, U.T, alpha=-1)`` per layer
   vs GPM's dense ``g - g @ (U U^T)`` (projector precomputed, as GPM does once per task).
2. Basis extension for 12 (768 x 512) representation matrices against a rank-64 basis:
   forgetcore ``extend_bases`` vs torch (eigh of the Gram matrix R^T R) vs GPM's two-SVD numpy.
3. The memory-bound flat projection (GU) against torch, in GB/s next to a stream triad.

Every comparison is timed in turns (benches/harness.py); the triad is the harness's (Rust,
3 x 128 MiB). Target: extension at least as fast as torch's eigh path.

Run: PYTHONPATH=python python benches/bench_subspace.py [--quick]
"""

from __future__ import annotations

import torch

from baselines import gpm_numpy
from forgetcore import subspace
from harness import Run, table, time_in_turns


def timeit(fn, reps: int, setup=None) -> float:
    """Median of ``reps`` runs after a warm-up (one side alone: the slow GPM baseline)."""
    return time_in_turns({"f": fn}, reps, setup=setup)["f"].median


def in_turns(fns: dict, reps: int, setup=None) -> dict[str, float]:
    """Median time of each side, taken in turns after a warm-up of each."""
    return {k: t.median for k, t in time_in_turns(fns, reps, setup=setup).items()}


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


def project_case(g0: list[torch.Tensor], rank: int, reps: int) -> tuple:
    """Projection of the gradients ``g0`` against random orthonormal bases of ``rank``: one table row."""
    layers, (out_d, in_d) = len(g0), g0[0].shape
    bases = [orth(in_d, rank, 100 + i) for i in range(layers)]
    proj = gpm_numpy.dense_projectors(bases)
    grads = [g.clone() for g in g0]

    def reset():
        for g, s in zip(grads, g0):
            g.copy_(s)

    def torch_best():
        for g, u in zip(grads, bases):
            g.addmm_(g @ u, u.T, alpha=-1.0)

    t = in_turns({"fc": lambda: subspace.project_out_(grads, bases),
                  "fc no check": lambda: subspace.project_out_(grads, bases, check=False),
                  "torch": torch_best}, reps, reset)
    t_fc, t_fc_nc, t_torch = t["fc"], t["fc no check"], t["torch"]
    t_gpm = timeit(lambda: gpm_numpy.project_dense(grads, proj), 1, reset)  # ~170 GFLOP a run
    flops = layers * 4 * out_d * in_d * rank
    # correctness on the same data
    reset()
    subspace.project_out_(grads, bases)
    want = [s - (s @ u) @ u.T for s, u in zip(g0, bases)]
    assert max(float((g - w).abs().max()) for g, w in zip(grads, want)) < 1e-3
    return (f"project 12x(768x3072) rank {rank}", t_fc, t_torch, t_gpm,
            f"{flops / t_fc / 1e9:.0f} GFLOP/s; no check {t_fc_nc * 1e3:.1f} ms")


def main() -> None:
    run = Run("subspace", __doc__.split("\n\n")[0])
    reps = 3 if run.quick else 7
    rows = []

    # 1. projection
    layers, out_d, in_d = 12, 768, 3072
    g0 = [torch.randn(out_d, in_d, generator=torch.Generator().manual_seed(i)) for i in range(layers)]
    for rank in (64, 256):
        rows.append(project_case(g0, rank, reps))

    # 2. basis extension
    d, n, r0, th = 768, 512, 64, 0.97
    gen = torch.Generator().manual_seed(7)
    # Representations with a decaying spectrum, like real activations.
    scale = torch.logspace(0, -3, d)
    reps_t = [((torch.randn(d, d, generator=gen) * scale) @ torch.randn(d, n, generator=gen)).contiguous()
              for _ in range(layers)]
    bases = [orth(d, r0, 200 + i) for i in range(layers)]
    t = in_turns({"fc": lambda: subspace.extend_bases(bases, reps_t, th),
                  "torch": lambda: torch_extend(bases, reps_t, th)}, reps)
    t_fc, t_torch = t["fc"], t["torch"]
    run.target("extend_basis 12 x (768 x 512) from rank 64: torch eigh path time / forgetcore time",
               t_torch / t_fc, 1.0, note=f"forgetcore {t_fc * 1e3:.0f} ms, torch {t_torch * 1e3:.0f} ms")
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
    t = in_turns({"fc": lambda: subspace.project_out_flat_(gflat, v, check=False),
                  "torch": lambda: gflat.sub_(v.T @ (v @ gflat))}, reps, lambda: gflat.copy_(g0flat))
    t_fc, t_torch = t["fc"], t["torch"]
    bw = run.triads[0]
    moved = 4 * nflat * (2 * k + 2)  # read V twice, read g twice and write it once (approx.)
    rows.append((f"flat project n=2e7, rank {k}", t_fc, t_torch, float("nan"),
                 f"{moved / t_fc / 1e9:.1f} GB/s vs triad {bw:.1f} GB/s"))

    print()
    print(table(["case", "forgetcore ms", "torch best ms", "GPM way ms", "vs torch", "vs GPM", "notes"],
                [[name, f"{fc * 1e3:.1f}", f"{tb * 1e3:.1f}", f"{gp * 1e3:.1f}" if gp == gp else "-",
                  f"{tb / fc:.2f}x", f"{gp / fc:.2f}x" if gp == gp else "-", note]
                 for name, fc, tb, gp, note in rows]))
    run.finish()


if __name__ == "__main__":
    main()
