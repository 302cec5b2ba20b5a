"""Benchmark: SSD dampening and Fisher accumulation over real model shapes, all sides in one run.

For the parameter shapes of ResNet-18 (CIFAR head, 11.2M float32) and GPT-2 small (124M):

- baseline: the official SSD code's per-parameter loop with boolean masks (benches/baselines/);
- reference: forgetcore.reference, the sync-free single-pass torch formulation (torch.where per
  tensor; also the CUDA fallback), and a masked torch update that computes the factor only where
  selected (boolean indexing: fewer passes on CPU, a host sync on CUDA); "best torch" is the faster;
- forgetcore: the Rust kernel without the importance check (``validated=True``) and with it
  (the default: one read pass over both importances before anything is written);

against a stream triad ``a = b + s*c`` timed in turns with them, in Rust on the kernels' rayon
threads. GB/s counts the bytes the operation must move: SSD reads theta, I_D and I_Df (12 B per
element) and writes the dampened elements (4 B each); accumulate_ reads acc and g and writes acc
(12 B); the triad moves 12 B per element. The allocator is pinned (benches/harness.py) so
torch's temporaries do not page-fault on every call; faults per call are printed.

Targets: ``ssd_dampen_(validated=True)`` >= 70 % of the triad on both shape sets and >= 2x the
best torch at 124M; ``accumulate_(validated=True)`` >= 80 % of the triad.
Usage: ``python benches/bench_importance.py [--quick]`` (``--quick``: ResNet-18 shapes only).
"""

from __future__ import annotations

import torch

from baselines.ssd_official import modify_weight
from forgetcore import importance, reference
from harness import TRIAD_BYTES, Run, ms, pin_allocator, table, time_in_turns, triad_call


def resnet18_shapes() -> list[tuple[int, ...]]:
    import torchvision

    return [tuple(p.shape) for p in torchvision.models.resnet18(num_classes=10).parameters()]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, v, ctx, ff = 768, 50257, 1024, 3072
    shapes: list[tuple[int, ...]] = [(v, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    return shapes + [(d,), (d,)]


def make(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    full = [torch.rand(s, generator=g) for s in shapes]
    # I_Df / I_D uniform in [0, 10.1): about 1 % selected at alpha = 10, as in a real SSD call.
    forget = [d * torch.rand(s, generator=g) * 10.1 for d, s in zip(full, shapes)]
    return params, full, forget


TRIAD = "stream triad (Rust, rayon)"


def report(times, nbytes: dict[str, int], ref: str) -> float:
    """Print the table; return the triad's GB/s of this comparison."""
    triad = TRIAD_BYTES / times[TRIAD].best / 1e9
    rows = []
    for k, t in times.items():
        gbs = nbytes[k] / t.best / 1e9
        rows.append([k, ms(t.best), ms(t.median), f"{gbs:.1f}", f"{100 * gbs / triad:.0f} %",
                     f"{t.best / times[ref].best:.2f}x", f"{t.faults:.0f}"])
    print(table(["method", "best ms", "median ms", "GB/s", "% triad", "vs fc", "faults/call"], rows))
    return triad


def bench_ssd(run: Run, label: str, shapes, reps: int):
    params, full, forget = make(shapes)
    n = sum(p.numel() for p in params)
    sel = int(importance.ssd_dampen_([p.clone() for p in params], full, forget, 10.0, 1.0).sum())
    moved = 12 * n + 4 * sel

    def masked():  # torch, computing the factor only where selected (boolean indexing)
        for p, d, f in zip(params, full, forget):
            m = f > 10.0 * d
            p[m] *= (1.0 * d[m] / f[m]).clamp_(max=1.0)

    fc, checked = "forgetcore (validated=True)", "forgetcore (checks importances)"
    runs = {
        "baseline: official loop + masks": lambda: modify_weight(params, full, forget, 10.0, 1.0),
        "reference: torch.where per tensor": lambda: reference.ssd_dampen_(params, full, forget, 10.0, 1.0),
        "torch: masked sparse update": masked,
        fc: lambda: importance.ssd_dampen_(params, full, forget, 10.0, 1.0, validated=True),
        checked: lambda: importance.ssd_dampen_(params, full, forget, 10.0, 1.0),
        TRIAD: triad_call(),
    }
    times = time_in_turns(runs, reps)
    print(f"\nSSD dampening, {label}: {len(shapes)} tensors, {n / 1e6:.1f}M float32, "
          f"{100 * sel / n:.2f} % selected, {moved / 1e9:.2f} GB moved (min)")
    nbytes = {k: moved for k in runs}
    nbytes[TRIAD] = TRIAD_BYTES
    triad = report(times, nbytes, fc)
    best_torch = min(times["reference: torch.where per tensor"].best, times["torch: masked sparse update"].best)
    t_fc, t_ck = times[fc].best, times[checked].best
    pct = 100 * moved / t_fc / 1e9 / triad
    print(f"forgetcore is {best_torch / t_fc:.1f}x ahead of the best torch formulation, "
          f"{times['baseline: official loop + masks'].best / t_fc:.1f}x ahead of the official loop; "
          f"the importance check costs {1e3 * (t_ck - t_fc):.1f} ms ({100 * (t_ck / t_fc - 1):.0f} %)")
    run.target(f"ssd_dampen_ validated, {label}: % of triad", pct, 70, "%",
               note=f"{ms(t_fc)} ms; checked default {ms(t_ck)} ms = "
                    f"{100 * moved / t_ck / 1e9 / triad:.0f} % of triad")
    return best_torch / t_fc


def bench_accumulate(run: Run, label: str, shapes, reps: int) -> None:
    g = torch.Generator().manual_seed(1)
    acc = [torch.rand(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    n = sum(a.numel() for a in acc)

    def baseline():  # Avalanche / SSD style: one op per parameter, with a temporary
        for a, gr in zip(acc, grads):
            a += gr.pow(2)

    fc, checked = "forgetcore (validated=True)", "forgetcore (checks gradients)"
    runs = {
        "baseline: a += g.pow(2) loop": baseline,
        "reference: a.add_((g * g) * s)": lambda: reference.accumulate_(acc, grads, 1.0, "sq"),
        fc: lambda: importance.accumulate_(acc, grads, 1.0, "sq", validated=True),
        checked: lambda: importance.accumulate_(acc, grads, 1.0, "sq"),
        TRIAD: triad_call(),
    }
    times = time_in_turns(runs, reps)
    print(f"\naccumulate_ (sq), {label}: {n / 1e6:.1f}M float32, {12 * n / 1e9:.2f} GB moved")
    nbytes = {k: 12 * n for k in runs}
    nbytes[TRIAD] = TRIAD_BYTES
    triad = report(times, nbytes, fc)
    t_fc, t_ck = times[fc].best, times[checked].best
    run.target(f"accumulate_ validated, {label}: % of triad", 100 * 12 * n / t_fc / 1e9 / triad, 80, "%",
               note=f"{ms(t_fc)} ms; checked default {ms(t_ck)} ms")


def main() -> None:
    run = Run("importance", __doc__.split("\n\n")[0])
    pinned = pin_allocator()
    print(f"allocator pinned: {pinned}; best (and median) of k runs taken in turns with the triad")
    bench_ssd(run, "ResNet-18 shapes", resnet18_shapes(), 5 if run.quick else 15)
    bench_accumulate(run, "ResNet-18 shapes", resnet18_shapes(), 5 if run.quick else 15)
    if run.quick:
        for name, tgt, unit in [("ssd_dampen_ validated, GPT-2 small 124M: % of triad", 70, "%"),
                                ("ssd_dampen_ 124M vs best torch", 2, "x"),
                                ("accumulate_ validated, GPT-2 small 124M: % of triad", 80, "%")]:
            run.skipped(name, tgt, unit, "not run in --quick")
    else:
        ahead = bench_ssd(run, "GPT-2 small 124M", gpt2_small_shapes(), 5)
        run.target("ssd_dampen_ 124M vs best torch", ahead, 2, "x")
        bench_accumulate(run, "GPT-2 small 124M", gpt2_small_shapes(), 5)
    run.finish()


if __name__ == "__main__":
    main()
