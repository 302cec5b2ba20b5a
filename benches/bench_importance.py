"""Benchmark: SSD dampening and Fisher accumulation over real model shapes, all sides in one run.

For the parameter shapes of ResNet-18 (CIFAR head, 11.2M float32) and GPT-2 small (124M):

- baseline: the official SSD code's per-parameter loop with boolean masks (benches/baselines/);
- reference: forgetcore.reference, the sync-free single-pass torch formulation (torch.where per
  tensor; also the CUDA fallback), and a masked torch update that computes the factor only where
  selected (boolean indexing: fewer passes on CPU, a host sync on CUDA); "best torch" is the faster;
- forgetcore: the Rust kernel, with the importance validation pass (default) and without it
  (``validated=True``);

against a stream triad ``a = b + s*c`` measured in the same run, in Rust on the kernels' rayon
threads (torch's OpenMP triad is printed too). GB/s
counts the bytes the operation must move: SSD reads theta, I_D and I_Df (12 B per element) and
writes the dampened elements (4 B each); accumulate_ reads acc and g and writes acc (12 B); the
triad moves 12 B per element. Times are the best of several runs (the machine is shared).
Usage: ``python benches/bench_importance.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines.ssd_official import modify_weight
from forgetcore import _checks, _core, importance, reference


def resnet18_shapes() -> list[tuple[int, ...]]:
    import torchvision

    return [tuple(p.shape) for p in torchvision.models.resnet18(num_classes=10).parameters()]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, v, ctx, ff = 768, 50257, 1024, 3072
    shapes: list[tuple[int, ...]] = [(v, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    return shapes + [(d,), (d,)]


def timeit_all(runs: dict, reps: int) -> dict[str, float]:
    """Best time of each callable, taking turns (round robin) so that all see the same machine."""
    for f in runs.values():
        f()  # warm-up
    best = {k: float("inf") for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


TRIAD_N = 32 * 2**20  # 3 x 128 MiB, far beyond any cache
_triad = None


def triad_runs() -> dict:
    """Stream triad a = b + 3c: Rust (rayon, the kernels' threads) and torch (OpenMP)."""
    global _triad
    if _triad is None:
        _triad = (torch.zeros(TRIAD_N), torch.rand(TRIAD_N), torch.rand(TRIAD_N))
    a, b, c = _triad
    av, bv, cv = (_checks.numpy_view(t) for t in (a, b, c))
    return {"stream triad (Rust, rayon)": lambda: _core.stream_triad_(av, bv, cv, 3.0),
            "stream triad (torch.add out=)": lambda: torch.add(b, c, alpha=3.0, out=a)}


def print_table(times: dict[str, float], nbytes: int, t_fc: float) -> float:
    triad = 12 * TRIAD_N / times["stream triad (Rust, rayon)"] / 1e9
    print(f"{'method':<34} {'ms':>9} {'GB/s':>8} {'%triad':>8} {'vs fc':>9}")
    for k, t in times.items():
        if k.startswith("stream triad"):
            gbs = 12 * TRIAD_N / t / 1e9
            print(f"{k:<34} {1e3 * t:9.1f} {gbs:8.1f} {100 * gbs / triad:7.0f}%")
        else:
            print(row(k, t, nbytes, triad, t_fc))
    return triad


def make(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    full = [torch.rand(s, generator=g) for s in shapes]
    # I_Df / I_D uniform in [0, 10.1): about 1 % selected at alpha = 10, as in a real SSD call.
    forget = [d * torch.rand(s, generator=g) * 10.1 for d, s in zip(full, shapes)]
    return params, full, forget


def row(name, t, nbytes, triad, t_fc):
    gbs = nbytes / t / 1e9
    return f"{name:<34} {1e3 * t:9.1f} {gbs:8.1f} {100 * gbs / triad:7.0f}% {t / t_fc:8.2f}x"


def bench_ssd(label, shapes, reps):
    params, full, forget = make(shapes)
    n = sum(p.numel() for p in params)
    counts = importance.ssd_dampen_([p.clone() for p in params], full, forget, 10.0, 1.0)
    sel = int(counts.sum())
    nbytes = 12 * n + 4 * sel
    def masked():  # torch, computing the factor only where selected (boolean indexing)
        for p, d, f in zip(params, full, forget):
            m = f > 10.0 * d
            p[m] *= (1.0 * d[m] / f[m]).clamp_(max=1.0)

    runs = {
        "baseline: official loop + masks": lambda: modify_weight(params, full, forget, 10.0, 1.0),
        "reference: torch.where per tensor": lambda: reference.ssd_dampen_(params, full, forget, 10.0, 1.0),
        "torch: masked sparse update": masked,
        "forgetcore (validated=True)": lambda: importance.ssd_dampen_(params, full, forget, 10.0, 1.0,
                                                                      validated=True),
        "forgetcore (checks importances)": lambda: importance.ssd_dampen_(params, full, forget, 10.0, 1.0),
    }
    times = timeit_all({**runs, **triad_runs()}, reps)
    t_fc = times["forgetcore (validated=True)"]
    print(f"\nSSD dampening, {label}: {len(shapes)} tensors, {n / 1e6:.1f}M float32, "
          f"{100 * sel / n:.2f} % selected, {nbytes / 1e9:.2f} GB moved (min)")
    triad = print_table(times, nbytes, t_fc)
    best_torch = min(times["reference: torch.where per tensor"], times["torch: masked sparse update"])
    print(f"forgetcore is {best_torch / t_fc:.1f}x ahead of the best torch formulation, "
          f"{times['baseline: official loop + masks'] / t_fc:.1f}x ahead of the official loop")
    return times, nbytes, triad


def bench_accumulate(label, shapes, reps):
    g = torch.Generator().manual_seed(1)
    acc = [torch.rand(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    n = sum(a.numel() for a in acc)

    def baseline():  # Avalanche / SSD style: one op per parameter, with a temporary
        for a, gr in zip(acc, grads):
            a += gr.pow(2)

    runs = {
        "baseline: a += g.pow(2) loop": baseline,
        "reference: a.add_((g * g) * s)": lambda: reference.accumulate_(acc, grads, 1.0, "sq"),
        "forgetcore accumulate_": lambda: importance.accumulate_(acc, grads, 1.0, "sq"),
    }
    times = timeit_all({**runs, **triad_runs()}, reps)
    t_fc = times["forgetcore accumulate_"]
    print(f"\naccumulate_ (sq), {label}: {n / 1e6:.1f}M float32, {12 * n / 1e9:.2f} GB moved")
    print_table(times, 12 * n, t_fc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 shapes only, fewer repetitions")
    args = ap.parse_args()
    print(f"threads: torch {torch.get_num_threads()}, rayon {_core.num_threads()}; best of k runs taken in turns "
          f"with a stream triad (3 x 128 MiB), so every %triad compares like with like")
    bench_ssd("ResNet-18 shapes", resnet18_shapes(), 5 if args.quick else 15)
    bench_accumulate("ResNet-18 shapes", resnet18_shapes(), 5 if args.quick else 15)
    if not args.quick:
        t, nbytes, triad = bench_ssd("GPT-2 small shapes", gpt2_small_shapes(), 5)
        t_fc = t["forgetcore (validated=True)"]
        best_torch = min(t["reference: torch.where per tensor"], t["torch: masked sparse update"])
        gbs = nbytes / t_fc / 1e9
        print(f"\nsummary 124M: forgetcore {1e3 * t_fc:.0f} ms = {gbs:.1f} GB/s = {100 * gbs / triad:.0f} % of the "
              f"same-run triad ({triad:.1f} GB/s); {best_torch / t_fc:.1f}x ahead of the best torch, "
              f"{t['baseline: official loop + masks'] / t_fc:.1f}x ahead of the official loop; with the importance "
              f"check {1e3 * t['forgetcore (checks importances)']:.0f} ms")


if __name__ == "__main__":
    main()
