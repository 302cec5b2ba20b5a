"""GPU check of the CUDA path: install the carried wheel, run every GPU test, benchmark, summarise.

Issue 7, item 5. Meant for a GPU machine that has torch with CUDA but no network and no Rust
toolchain. Prepare on the build machine (the wheel is abi3, one file for every CPython >= 3.11):

    make wheel                                   # -> dist/forgetcore-0.1.0-cp311-abi3-manylinux_2_34_x86_64.whl
                                                 #    (needs glibc >= 2.34 there)
    pip download --no-deps -d dist pytest pluggy iniconfig packaging pygments   # only if the
                                                 # GPU machine lacks pytest

carry ``dist`` with the tree (the device tool's ``carry=["dist"]``; well under 64 MiB), then on
the GPU machine, from the repository root:

    python benches/gpu_check.py

which runs, in order (about 2-3 minutes on an H200):

1. ``pip install --no-deps --force-reinstall dist/forgetcore-*.whl`` (torch is already there;
   any other wheels in dist/ are installed the same way only if pytest is missing);
2. ``python -m pytest tests/test_cuda.py --noconftest -q`` against the installed wheel: the
   NVRTC compile tests and every GPU test (kernels against the CPU oracles);
3. benchmarks: device copy bandwidth; SSD dampening over GPT-2 small (124M) and Llama-3.2-1B
   (1.24B) float32 parameters in their real layer shapes, against the reference loop (per
   parameter, index tensors, as the official SSD code) and the best single-pass torch
   formulation (``reference.ssd_dampen_``), with GB/s against the measured copy bandwidth (target >= 70 %); the kvscore
   decode step (accumulate one attention row + select the keep set) at batch 8, 32 heads,
   T = 32,768, budget 4,096, against torch eager;
4. one summary line, starting ``GPU CHECK``.

``--no-install`` skips step 1 (use the forgetcore already importable); ``--skip-tests`` step 2.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def install(dist: Path) -> str:
    wheels = sorted(glob.glob(str(dist / "forgetcore-*.whl")))
    if not wheels:
        raise SystemExit(f"gpu_check: no forgetcore wheel in {dist}; build one with `make wheel`")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index", wheels[-1]]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    if importlib.util.find_spec("pytest") is None:
        extra = [w for w in sorted(glob.glob(str(dist / "*.whl"))) if "forgetcore-" not in w]
        if extra:
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *extra]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    return Path(wheels[-1]).name


def run_tests() -> tuple[int, int, int, str]:
    """Run tests/test_cuda.py against the installed package; (passed, failed, skipped, tail)."""
    if importlib.util.find_spec("pytest") is None:
        return 0, 1, 0, "pytest missing (carry its wheels in dist/)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "--noconftest", "-q", "-rs",
           "-p", "no:cacheprovider", "-o", "addopts="]
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    print(out[-6000:], flush=True)
    counts = {}
    last = [line for line in out.splitlines() if " in " in line and ("passed" in line or "failed" in line)]
    for part in (last[-1] if last else "").replace("=", "").split(","):
        bits = part.split()
        if len(bits) >= 2 and bits[0].isdigit():
            counts[bits[1]] = int(bits[0])
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0) + (r.returncode not in (0,))
    return counts.get("passed", 0), failed, counts.get("skipped", 0), last[-1] if last else out[-300:]


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------


def timed(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() over reps, timed with CUDA events on the current stream."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """Device copy bandwidth (read + write bytes per second) of a 2 GiB buffer."""
    import torch

    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * 4 / t


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llama_1b_shapes() -> list[tuple[int, ...]]:
    d, v, inter, layers, kv = 2048, 128256, 8192, 16, 512  # Llama-3.2-1B (tied embeddings)
    shapes: list[tuple[int, ...]] = [(v, d)]
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d), (inter, d), (inter, d), (d, inter), (d,), (d,)]
    return shapes + [(d,)]


def ssd_reference_loop(params, full, forget, alpha, lam):
    """The official SSD code's way: per parameter, index tensors of the selected entries."""
    import torch

    for p, d, f in zip(params, full, forget):
        locations = torch.where(f > d * alpha)
        update = ((d * lam) / f)[locations]
        update[torch.where(update > 1.0)] = 1.0
        p[locations] = p[locations].mul(update)


def bench_ssd(name: str, shapes, copy_bw: float) -> dict:
    import torch

    from forgetcore import importance, reference

    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    full = [torch.rand(s, device="cuda", generator=g) for s in shapes]
    # About 1 % selected at alpha = 10, as in a forget-set importance.
    forget = [d * torch.rand(s, device="cuda", generator=g) * 10.1 for d, s in zip(full, shapes)]
    n = sum(p.numel() for p in params)
    alpha, lam = 10.0, 1.0
    counts = importance.ssd_dampen_(params, full, forget, alpha, lam, validated=True)
    frac = float(counts.sum()) / n
    # The public primitive (dispatches CUDA tensors to the kernel); importances known valid.
    t_fc = timed(lambda: importance.ssd_dampen_(params, full, forget, alpha, lam, validated=True))
    # With the NaN/sign check of both importances (one more read pass each, one host sync).
    t_chk = timed(lambda: importance.ssd_dampen_(params, full, forget, alpha, lam), reps=5)
    # reference.py's formulation: one vectorised where() per tensor, the best torch way we have.
    t_best = timed(lambda: reference.ssd_dampen_(params, full, forget, alpha, lam), reps=5)
    t_ref = timed(lambda: ssd_reference_loop(params, full, forget, alpha, lam), reps=3, warmup=1)
    bytes_moved = n * (12 + 4 * frac)  # read theta, imp_full, imp_forget; write the selected theta
    gbs = bytes_moved / t_fc / 1e9
    row = {"name": name, "n": n, "frac": frac, "fc_ms": t_fc * 1e3, "chk_ms": t_chk * 1e3, "best_ms": t_best * 1e3,
           "ref_ms": t_ref * 1e3,
           "gbs": gbs, "pct": 100 * bytes_moved / t_fc / copy_bw, "vs_best": t_best / t_fc, "vs_ref": t_ref / t_fc}
    for ts in (params, full, forget):  # free the GPU memory before the next case
        ts.clear()
    torch.cuda.empty_cache()
    return row


def kv_step_torch(scores, attn, alpha, group, positions, valid, budget, n_sink, n_recent):
    """Torch eager: accumulate the new rows, protect sinks/recent with +inf, top-k, sort."""
    import torch

    b, kvh, t = scores.shape
    q = attn.shape[2]
    a = attn.float().view(b, kvh, group, q, t).sum(2)
    w = alpha ** torch.arange(q - 1, -1, -1, device=scores.device, dtype=torch.float32)
    scores.mul_(alpha**q).add_((a * w.view(1, 1, q, 1)).sum(2) * valid)
    big = torch.iinfo(torch.int64).max
    sink = positions.masked_fill(~valid, big).topk(n_sink, dim=-1, largest=False).indices
    pos_r = positions.masked_fill(~valid, -1).scatter(-1, sink, -1)
    recent = pos_r.topk(n_recent, dim=-1).indices
    s = scores.masked_fill(~valid, float("-inf")).scatter(-1, sink, float("inf")).scatter(-1, recent, float("inf"))
    return s.topk(budget, dim=-1).indices.sort(dim=-1).values


def bench_kv() -> dict:
    import torch

    from forgetcore import _cuda, kvscore, reference

    b, kvh, group, t, budget, n_sink, n_recent, alpha = 8, 32, 1, 32768, 4096, 4, 128, 0.95
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(b, kvh, t, device="cuda", generator=g)
    attn = torch.softmax(torch.randn(b, kvh * group, 1, t, device="cuda", generator=g), -1).to(torch.bfloat16)
    positions = torch.arange(t, device="cuda").expand(b, kvh, t).contiguous()
    valid = torch.ones(b, kvh, t, dtype=torch.bool, device="cuda")

    def step_fc():
        _cuda.kv_accumulate_(scores, attn, alpha, group, valid=valid)
        return _cuda.kv_select_keep(scores, budget, n_sink, n_recent, positions=positions, valid=valid)

    def step_public():  # forgetcore.kvscore: the same kernels behind the checks (NaN/finite: host syncs)
        kvscore.accumulate_(scores, attn, alpha, group, valid=valid)
        return kvscore.select_keep(scores, budget, n_sink, n_recent, positions=positions, valid=valid)

    def step_reference():
        reference.kv_accumulate_(scores, attn, alpha, group, valid=valid)
        return reference.kv_select_keep(scores, budget, n_sink, n_recent, positions, valid)

    def step_torch():
        return kv_step_torch(scores, attn, alpha, group, positions, valid, budget, n_sink, n_recent)

    s0 = scores.clone()
    keep_fc = step_fc()
    scores.copy_(s0)
    keep_torch = step_torch()
    # Equal keep sets up to the choice among equal scores at the boundary (topk breaks ties
    # arbitrarily; the kernel prefers the later token): the kept scores are the same multiset.
    kept = [scores.gather(-1, k).sort(dim=-1).values for k in (keep_fc, keep_torch)]
    agree = bool(torch.equal(kept[0], kept[1]))
    rows_equal = int((keep_fc == keep_torch).all(-1).sum())
    t_fc = timed(step_fc, reps=20)
    t_torch = timed(step_torch, reps=20)
    t_pub = timed(step_public, reps=20)
    t_ref = timed(step_reference, reps=5)
    t_sel = timed(lambda: _cuda.kv_select_keep(scores, budget, n_sink, n_recent, positions=positions, valid=valid),
                  reps=20)
    return {"fc_ms": t_fc * 1e3, "torch_ms": t_torch * 1e3, "pub_ms": t_pub * 1e3, "ref_ms": t_ref * 1e3,
            "sel_ms": t_sel * 1e3, "ratio": t_torch / t_fc, "agree": agree,
            "rows_equal": rows_equal, "rows": b * kvh}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dist", type=Path, default=ROOT / "dist")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    wheel = "(not installed)" if args.no_install else install(args.dist)

    import torch

    import forgetcore
    from forgetcore import _core, _cuda

    if not torch.cuda.is_available():
        print("GPU CHECK: no CUDA device on this machine")
        return 2
    arch, driver = _cuda.device_info(0)
    print(f"forgetcore {forgetcore.__version__} from {Path(forgetcore.__file__).parent} ({wheel}); "
          f"torch {torch.__version__}; "
          f"{torch.cuda.get_device_name(0)} sm_{arch}; driver {driver}; NVRTC {_core.cuda_nvrtc_version()} "
          f"from {_cuda.load_nvrtc()}", flush=True)

    passed = failed = skipped = 0
    if not args.skip_tests:
        passed, failed, skipped, line = run_tests()
        print("tests:", line, flush=True)

    bw = copy_bandwidth()
    print(f"\ndevice copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    print(f"\n{'SSD dampening':<22}{'params':>14}{'selected':>9}{'forgetcore':>12}{'+check':>10}"
          f"{'torch best':>12}{'ref loop':>11}"
          f"{'GB/s':>8}{'% copy':>8}{'x best':>8}{'x ref':>7}")
    rows = []
    for name, shapes in [("GPT-2 small (124M)", gpt2_small_shapes()), ("Llama-3.2-1B (1.24B)", llama_1b_shapes())]:
        r = bench_ssd(name, shapes, bw)
        rows.append(r)
        print(f"{name:<22}{r['n']:>14,}{r['frac']:>8.2%}{r['fc_ms']:>10.2f}ms{r['chk_ms']:>8.2f}ms{r['best_ms']:>10.2f}ms{r['ref_ms']:>9.1f}ms"
              f"{r['gbs']:>8.0f}{r['pct']:>7.0f}%{r['vs_best']:>8.1f}{r['vs_ref']:>7.1f}", flush=True)
    kv = bench_kv()
    print(f"\nkvscore step (B 8, 32 heads, T 32768, budget 4096): forgetcore {kv['fc_ms']:.3f} ms "
          f"(select alone {kv['sel_ms']:.3f} ms; through forgetcore.kvscore with its checks {kv['pub_ms']:.3f} ms), "
          f"torch eager {kv['torch_ms']:.3f} ms, {kv['ratio']:.1f}x; reference.py {kv['ref_ms']:.3f} ms; "
          f"same kept scores: {kv['agree']} (identical index sets in {kv['rows_equal']}/{kv['rows']} rows)", flush=True)

    sys.path.insert(0, str(ROOT / "benches"))
    from bench_distributed import ddp_smoke  # one-GPU DDP (NCCL) smoke run

    ddp = ddp_smoke("cuda")
    print(f"\nDDP smoke ({ddp['backend']}, 1 rank): DDP steps vs plain max diff {ddp['step_diff']:.2e}, "
          f"all-reduced Fisher vs single max diff {ddp['fisher_diff']:.2e}, {ddp['seconds']:.1f} s", flush=True)

    ok = failed == 0 and all(r["pct"] >= 70 for r in rows) and kv["agree"] and ddp["ok"]
    print(f"\nGPU CHECK {'PASS' if ok else 'FAIL'}: tests {passed} passed {failed} failed {skipped} skipped | "
          f"copy {bw / 1e12:.2f} TB/s | SSD 124M {rows[0]['gbs']:.0f} GB/s ({rows[0]['pct']:.0f}%) "
          f"{rows[0]['vs_best']:.1f}x best torch | "
          f"SSD 1.24B {rows[1]['gbs']:.0f} GB/s ({rows[1]['pct']:.0f}%) {rows[1]['vs_best']:.1f}x | "
          f"kv step {kv['fc_ms']:.3f} ms vs torch {kv['torch_ms']:.3f} ms ({kv['ratio']:.1f}x) | "
          f"DDP smoke {'ok' if ddp['ok'] else 'FAIL'} | {time.time() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
