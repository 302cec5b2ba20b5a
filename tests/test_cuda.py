"""The CUDA path (cuda/*.cu through NVRTC, rust/cuda/, forgetcore._cuda).

Without a GPU: every source compiles with NVRTC for sm_80 and sm_90 whenever libnvrtc is
present (it is, with torch's CUDA wheel), a missing library or driver is a clear Python error,
and the argument checks name the argument. With a GPU (``benches/gpu_check.py`` runs these):
every kernel against a float32 CPU oracle written out here in the reference's operation
order, bit-identical where the math allows, else within the stated tolerance.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import forgetcore
from forgetcore import _core, _cuda

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p.stem for p in (ROOT / "cuda").glob("*.cu"))
HAS_NVRTC = bool(os.environ.get("FORGETCORE_NVRTC")) or bool(_cuda.nvrtc_candidates())
needs_nvrtc = pytest.mark.skipif(not HAS_NVRTC, reason="libnvrtc not installed (torch is not a CUDA wheel)")
gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="no CUDA device here: GPU tests run on a GPU machine (benches/gpu_check.py)")


# ---------------------------------------------------------------------------------------------
# Without a GPU
# ---------------------------------------------------------------------------------------------


def test_sources_are_embedded():
    assert SOURCES == ["importance", "kvscore"]
    with pytest.raises(ValueError, match="^source: expected one of"):
        _core.cuda_compile("nope", 80)
    with pytest.raises(ValueError, match="^arch: expected a compute capability"):
        _core.cuda_compile("importance", 7)


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_every_source_compiles_with_nvrtc(arch):
    # What CI checks without a GPU: NVRTC accepts every kernel source for both targets.
    got = dict(_cuda.compile_check(arch))
    assert sorted(got) == SOURCES and all(n > 0 for n in got.values())


@needs_nvrtc
def test_ptx_defines_every_kernel():
    ptx = "".join(_core.cuda_compile(s, 90).decode() for s in SOURCES)
    assert ".target sm_90" in ptx
    entries = set(re.findall(r"\.entry (\w+)\(", ptx))
    assert entries == {
        "accumulate",
        "ssd_dampen",
        "find_invalid",
        "kv_rowsum",
        "kv_accumulate",
        "kv_select_keep",
        "kv_evict_one",
        "kv_row_stats",
        "kv_colsum",
    }


@needs_nvrtc
def test_cubin_for_h200_architecture():
    # What a launch on sm_90 loads: SASS through ptxas, an ELF image.
    assert _core.cuda_compile("importance", 90, cubin=True)[:4] == b"\x7fELF"


@needs_nvrtc
def test_nvrtc_comes_from_the_nvidia_wheels():
    path = _cuda.load_nvrtc()
    assert "libnvrtc" in Path(path).name or "nvrtc64" in Path(path).name
    major, _ = _core.cuda_nvrtc_version()
    assert major >= 12


def test_bogus_nvrtc_path_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FORGETCORE_NVRTC", "/nonexistent/libnvrtc.so.13")
    monkeypatch.setattr(_cuda, "_loaded_nvrtc", None)
    with pytest.raises(_cuda.CudaUnavailableError, match="^FORGETCORE_NVRTC: expected the path of libnvrtc"):
        _cuda.compile_check(80)
    assert isinstance(_cuda.CudaUnavailableError("x"), RuntimeError)


def test_rust_loader_without_libraries_raises_not_panics(tmp_path):
    # A fresh process that loads the extension alone (no torch, so nothing has loaded libnvrtc)
    # with an empty loader path: both libraries missing must raise the typed CudaUnavailableError
    # (a RuntimeError) from Rust itself, not panic.
    script = textwrap.dedent(f"""
        import ctypes, importlib.util, sys
        spec = importlib.util.spec_from_file_location("forgetcore._core", {_core.__file__!r})
        core = importlib.util.module_from_spec(spec); spec.loader.exec_module(core)
        def loadable(name):
            try:
                ctypes.CDLL(name); return True
            except OSError:
                return False
        for name, call in [("libnvrtc.so.13", lambda: core.cuda_compile_check(80)),
                           ("libcuda.so.1", lambda: core.cuda_device_info(0))]:
            if loadable(name):
                print(name, "present"); continue
            try:
                call()
            except core.CudaUnavailableError as e:
                print(name, type(e).__name__, isinstance(e, RuntimeError), str(e).split(":")[0])
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "FORGETCORE_NVRTC")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "panic" not in (r.stdout + r.stderr).lower()
    lines = r.stdout.split("\n")
    assert lines[0] in ("libnvrtc.so.13 present", "libnvrtc.so.13 CudaUnavailableError True libnvrtc")
    assert lines[1] in ("libcuda.so.1 present", "libcuda.so.1 CudaUnavailableError True CUDA driver")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_no_device_is_a_clear_error():
    assert not _cuda.is_available()
    with pytest.raises(_cuda.CudaUnavailableError, match="^CUDA driver"):
        _cuda.device_info(0)


def test_argument_checks_name_the_argument():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match=r"^params\[0\]: expected a CUDA tensor, got float32 \(8,\)"):
        _cuda.ssd_dampen_([x], [x], [x], 10.0, 1.0)
    with pytest.raises(ValueError, match="^imp_forget: expected 1 tensors, got 0"):
        _cuda.ssd_dampen_([x], [x], [], 10.0, 1.0)
    with pytest.raises(ValueError, match="^alpha: expected a number >= 0"):
        _cuda.ssd_dampen_([x], [x], [x], -1.0, 1.0)
    with pytest.raises(ValueError, match="^mode: expected 'sq' or 'abs'"):
        _cuda.accumulate_([x], [x], 1.0, mode="cube")
    with pytest.raises(TypeError, match="^acc: expected a list of tensors"):
        _cuda.accumulate_(x, [x], 1.0)
    s = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="^scores: expected a CUDA tensor"):
        _cuda.kv_select_keep(s, 4, 1, 1)
    with pytest.raises(TypeError, match="^scores: expected float32 tensor"):
        _cuda.kv_accumulate_(s.double(), s, 0.5, 1)


def test_importance_dispatches_cuda_tensors_to_the_kernels(monkeypatch):
    # Without a GPU: the backend is told the tensors are on CUDA and the kernels are recorded.
    from forgetcore import _backend, importance

    calls = []
    monkeypatch.setattr(_backend, "choose", lambda device, cuda_kernel=False: "cuda" if cuda_kernel else "reference")
    monkeypatch.setattr(_cuda, "find_invalid_importance", lambda imps: calls.append("check") or None)
    monkeypatch.setattr(_cuda, "ssd_dampen_", lambda *a: calls.append("ssd") or torch.tensor([7]))
    monkeypatch.setattr(
        _cuda, "accumulate_", lambda acc, grads, scale, mode: calls.append(("acc", grads[0].dtype, mode))
    )
    p = {"w": torch.zeros(3)}
    assert importance.ssd_dampen_(p, {"w": torch.ones(3)}, {"w": torch.ones(3)}, 10.0).tolist() == [7]
    assert calls == ["check", "check", "ssd"]
    importance.ssd_dampen_(p, {"w": torch.ones(3)}, {"w": torch.ones(3)}, 10.0, validated=True)
    assert calls[3:] == ["ssd"]
    importance.accumulate_([torch.zeros(3)], [torch.ones(3, dtype=torch.bfloat16)], 0.5, mode="abs")
    assert calls[-1] == ("acc", torch.bfloat16, "abs")  # widened in the kernel, not copied first
    # What the kernels do not take (non-contiguous accumulators) goes to the reference.
    acc = torch.zeros(3, 2).t()
    importance.accumulate_([acc], [torch.ones(2, 3)], 2.0)
    assert calls[-1] == ("acc", torch.bfloat16, "abs") and bool((acc == 2.0).all())


def test_kvscore_dispatches_cuda_tensors_to_the_kernels(monkeypatch):
    from forgetcore import _backend, kvscore

    calls = []
    monkeypatch.setattr(_backend, "choose", lambda device, cuda_kernel=False: "cuda" if cuda_kernel else "reference")
    monkeypatch.setattr(
        _cuda,
        "kv_accumulate_",
        lambda s, a, alpha, group, renorm, valid: calls.append(("acc", alpha, group, renorm)) or s,
    )
    monkeypatch.setattr(
        _cuda, "kv_select_keep", lambda s, b, ns, nr, p, v: calls.append(("keep", b, ns, nr, p, v)) or "keep"
    )
    monkeypatch.setattr(_cuda, "kv_evict_one", lambda s, ns, nr, p, v: calls.append(("evict", ns, nr, p, v)) or "evict")
    scores = torch.rand(1, 2, 16)
    assert kvscore.accumulate_(scores, torch.rand(1, 4, 3, 16), 0.5, 2, renorm=True) is scores
    assert calls[-1] == ("acc", 0.5, 2, True)
    # positions / valid left as None: the kernel reads slot order and all-valid, nothing materialised
    assert kvscore.select_keep(scores, 8, 1, 2) == "keep" and calls[-1] == ("keep", 8, 1, 2, None, None)
    assert kvscore.evict_one(scores, 1, 2) == "evict" and calls[-1] == ("evict", 1, 2, None, None)
    # budget >= T stays the documented no-op; bad input still raises before any kernel
    assert kvscore.select_keep(scores, 16).shape == (1, 2, 16) and len(calls) == 3
    with pytest.raises(ValueError, match="^attn: expected finite"):
        kvscore.accumulate_(scores, torch.full((1, 2, 1, 16), float("nan")), 0.5)
    assert len(calls) == 3


def test_empty_lists_need_no_device():
    assert _cuda.ssd_dampen_([], [], [], 10.0, 1.0).numel() == 0
    _cuda.accumulate_([], [], 1.0)


# ---------------------------------------------------------------------------------------------
# CPU oracles: the reference's float32 operations in the reference's order
# ---------------------------------------------------------------------------------------------


def ssd_oracle(theta, d, f, alpha, lam):
    a, lm = torch.tensor(alpha, dtype=torch.float32), torch.tensor(lam, dtype=torch.float32)
    sel = f > a * d
    beta = (lm * d) / f
    beta = torch.where(beta > 1, torch.ones_like(beta), beta)
    return torch.where(sel, theta * beta, theta), int(sel.sum())


def kv_accumulate_oracle(scores, attn, alpha, group, valid=None, renorm=False):
    """The Rust kernel's recurrence: per query row, S *= alpha, then S += w * A per group head."""
    s = scores.clone()
    b, kvh, t = s.shape
    a = attn.float().reshape(b, kvh, group, attn.shape[2], t)
    v = torch.ones_like(s, dtype=torch.bool) if valid is None else valid
    alpha = torch.tensor(alpha, dtype=torch.float32)
    for i in range(a.shape[3]):
        if float(alpha) == 0.0:
            s = torch.where(torch.isfinite(s), torch.zeros_like(s), s)
        elif float(alpha) != 1.0:
            s = s * alpha
        for g in range(group):
            row = a[:, :, g, i, :]
            if renorm:
                tot = torch.where(v, row, torch.zeros_like(row)).double().sum(-1, keepdim=True).float()
                w = torch.where(tot > 0, 1.0 / tot, torch.zeros_like(tot))
            else:
                w = torch.ones(b, kvh, 1)
            s = torch.where(v, s + w * row, s)
    return s


def select_keep_oracle(scores, budget, n_sink, n_recent, positions, valid):
    b, h, t = scores.shape
    out = torch.empty(b, h, budget, dtype=torch.int64)
    for r in range(b * h):
        s, p, v = (
            scores.reshape(-1, t)[r].tolist(),
            positions.reshape(-1, t)[r].tolist(),
            valid.reshape(-1, t)[r].tolist(),
        )
        by_pos = sorted((j for j in range(t) if v[j]), key=lambda j: p[j])
        ns = min(n_sink, len(by_pos))
        rest = by_pos[ns:]
        nr = min(n_recent, len(rest))
        cand = rest[: len(rest) - nr]
        keep = set(by_pos[:ns]) | set(rest[len(rest) - nr :])
        keep |= set(sorted(cand, key=lambda j: (-s[j], -p[j]))[: budget - ns - nr])
        keep |= set([j for j in range(t) if j not in keep][: budget - len(keep)])
        out.view(-1, budget)[r] = torch.tensor(sorted(keep), dtype=torch.int64)
    return out


def evict_one_oracle(scores, n_sink, n_recent, positions, valid):
    b, h, t = scores.shape
    out = torch.empty(b * h, dtype=torch.int64)
    for r in range(b * h):
        s, p, v = (
            scores.reshape(-1, t)[r].tolist(),
            positions.reshape(-1, t)[r].tolist(),
            valid.reshape(-1, t)[r].tolist(),
        )
        by_pos = sorted((j for j in range(t) if v[j]), key=lambda j: p[j])
        ns = min(n_sink, len(by_pos))
        rest = by_pos[ns:]
        cand = rest[: len(rest) - min(n_recent, len(rest))]
        out[r] = min(cand, key=lambda j: (s[j], p[j])) if cand else -1
    return out.view(b, h)


def test_oracles_agree_with_the_spec_examples():
    # The kvcache kernel's own examples: sinks/recent by position with slots out of order.
    s = torch.tensor([[[0.0, 0.0, 9.0, 1.0, 2.0, 8.0]]])
    p = torch.tensor([[[5, 0, 3, 1, 4, 2]]])
    v = torch.ones(1, 1, 6, dtype=torch.bool)
    assert select_keep_oracle(s, 3, 1, 1, p, v).tolist() == [[[0, 1, 2]]]
    assert evict_one_oracle(s, 1, 1, p, v).tolist() == [[3]]
    s = torch.tensor([[[100.0, 100.0, 0.0, 0.0]]])
    v = torch.tensor([[[False, False, True, True]]])
    assert select_keep_oracle(s, 3, 1, 1, torch.arange(4).view(1, 1, 4), v).tolist() == [[[0, 2, 3]]]
    # recurrence: S = a^3 S0 + a^2 A0 + a A1 + A2
    got = kv_accumulate_oracle(
        torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]]]), 0.5, 1
    )
    assert torch.allclose(got, torch.tensor([[[0.875, 1.25]]]))


# ---------------------------------------------------------------------------------------------
# The kernels' logic on the CPU emulator (tests/cuda_emu/), no GPU needed
# ---------------------------------------------------------------------------------------------

CXX = shutil.which("g++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="g++ not installed: the CPU emulator of the kernels needs it")


def _emu_build(tmp: Path, source: str) -> ctypes.CDLL:
    src = (ROOT / "cuda" / f"{source}.cu").read_text()
    # The two GPU-only constructs: inline PTX (the f16 conversion) and dynamic shared memory.
    src, n_asm = re.subn(r"asm\(.*\);", "f = emu_f16_to_f32(h);", src)
    decl = "extern __shared__ unsigned int kept_words[];"
    n_smem = src.count(decl)
    src = src.replace(decl, "unsigned int* kept_words = emu_dynamic_smem<unsigned int>();")
    assert (n_asm, n_smem) == {"importance": (1, 0), "kvscore": (1, 2)}[source]
    (tmp / f"{source}.cu").write_text(src)
    for f in ("emu.h", "harness.cpp"):
        shutil.copy(ROOT / "tests" / "cuda_emu" / f, tmp / f)
    lib = tmp / f"emu_{source}.so"
    # 64 threads per selection block instead of 1024: two warps, every loop runs several rounds.
    subprocess.run(
        [
            CXX,
            "-std=c++20",
            "-O1",
            "-pthread",
            "-shared",
            "-fPIC",
            f"-DEMU_{source.upper()}",
            "-DSEL_THREADS=64",
            "-DFUSED_THREADS=64",
            "-I",
            str(tmp),
            str(tmp / "harness.cpp"),
            "-o",
            str(lib),
        ],
        check=True,
        capture_output=True,
    )
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda_emu")
    return {s: _emu_build(tmp, s) for s in SOURCES}


P, I32, I64, F32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _emu_table(columns, numels, after=()):
    """The multi-tensor table _cuda._table builds, with host pointers."""
    starts = [0]
    for m in numels:
        starts.append(starts[-1] + (m + _cuda.CHUNK - 1) // _cuda.CHUNK)
    flat = [v for c in columns for v in c] + numels + [v for c in after for v in c] + starts
    return torch.tensor(flat, dtype=torch.int64), starts[-1]


@needs_cxx
def test_emulated_ssd_dampen_and_accumulate_bit_identical(emu):
    g = torch.Generator().manual_seed(5)
    shapes = [(0,), (1,), (7,), (_cuda.CHUNK + 9,), (3, 333)]
    theta = [torch.randn(s, generator=g) for s in shapes] + [torch.randn(1002, generator=g)[1:]]  # misaligned
    d = [torch.rand(t.shape, generator=g) * (torch.rand(t.shape, generator=g) > 0.1) for t in theta]
    f = [torch.rand(t.shape, generator=g) * 10 for t in theta]
    work = [t.clone() for t in theta]
    meta, blocks = _emu_table(
        [[_ptr(t) for t in work], [_ptr(x) for x in d], [_ptr(x) for x in f]], [t.numel() for t in work]
    )
    counts = torch.zeros(len(work), dtype=torch.int64)
    fn = emu["importance"].emu_ssd_dampen
    fn.argtypes = [P, I32, I64, I64, F32, F32, P]
    fn(_ptr(meta), len(work), _cuda.CHUNK, blocks, 2.0, 0.5, _ptr(counts))
    for i, (t0, dd, ff) in enumerate(zip(theta, d, f)):
        want, c = ssd_oracle(t0, dd, ff, 2.0, 0.5)
        assert torch.equal(work[i], want) and int(counts[i]) == c, i

    fn = emu["importance"].emu_accumulate
    fn.argtypes = [P, I32, I64, I64, F32, I32]
    for dtype, mode in [(torch.float32, 0), (torch.float16, 1), (torch.bfloat16, 0)]:
        acc = [torch.rand(t.shape, generator=g) for t in theta]
        grads = [(torch.randn(t.shape, generator=g) * 3).to(dtype) for t in theta]
        work = [a.clone() for a in acc]
        meta, blocks = _emu_table([[_ptr(a) for a in work], [_ptr(x) for x in grads]], [a.numel() for a in acc],
                                  after=[[_cuda._DTYPE_CODE[dtype]] * len(acc)])
        fn(_ptr(meta), len(acc), _cuda.CHUNK, blocks, 0.25, mode)
        for a0, gg, a in zip(acc, grads, work):
            x = gg.float()
            assert torch.equal(a, a0 + ((x * x) if mode == 0 else x.abs()) * torch.tensor(0.25))


@needs_cxx
def test_emulated_find_invalid(emu):
    fn = emu["importance"].emu_find_invalid
    fn.argtypes = [P, I32, I64, I64, P]
    imps = [torch.rand(s) for s in [(0,), (5,), (2 * _cuda.CHUNK + 3,), (40,), (7,)]]
    imps[2][[_cuda.CHUNK + 1, 9, 2 * _cuda.CHUNK + 2]] = torch.tensor([float("nan"), -1.0, float("inf")])
    imps[3][39] = float("-inf")
    meta, blocks = _emu_table([[_ptr(t) for t in imps]], [t.numel() for t in imps])
    first = torch.full((len(imps),), torch.iinfo(torch.int64).max, dtype=torch.int64)
    fn(_ptr(meta), len(imps), _cuda.CHUNK, blocks, _ptr(first))
    big = torch.iinfo(torch.int64).max
    assert first.tolist() == [big, big, 9, 39, big]


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_kv_accumulate(emu, dtype):
    fn = emu["kvscore"].emu_kv_accumulate
    fn.argtypes = [P, P, I32, P, P, P, I32, I32, I32, I32, I32, F32]
    g = torch.Generator().manual_seed(6)
    for alpha, group, renorm, masked in [(0.9, 1, False, False), (1.0, 2, False, True), (0.0, 2, False, True),
                                         (0.5, 2, True, True)]:
        b, kvh, q, t = 2, 2, 3, 300
        scores = torch.rand(b, kvh, t, generator=g)
        scores[0, 1, 7] = float("inf")
        attn = torch.softmax(torch.randn(b, kvh * group, t, q, generator=g), dim=2).to(dtype).transpose(2, 3)
        valid = (torch.rand(b, kvh, t, generator=g) > 0.2) if masked else None
        want = kv_accumulate_oracle(scores, attn, alpha, group, valid=valid, renorm=renorm)
        inv = torch.empty(b * kvh * group * q) if renorm else None
        strides = torch.tensor(attn.stride(), dtype=torch.int64)
        fn(_ptr(scores), _ptr(attn), _cuda._DTYPE_CODE[dtype], _ptr(strides), _ptr(valid), _ptr(inv),
           b, kvh, group, q, t, alpha)
        if renorm:
            torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(scores, want), (alpha, group)


@needs_cxx
def test_emulated_kv_accumulate_renormalises_subnormal_rows(emu):
    # regression: 1 / (row sum) overflowed for rows of subnormal probabilities, giving +inf
    fn = emu["kvscore"].emu_kv_accumulate
    fn.argtypes = [P, P, I32, P, P, P, I32, I32, I32, I32, I32, F32]
    for tiny in (1e-40, 1e-44, 3e-39):
        scores, attn = torch.zeros(1, 1, 4), torch.full((1, 1, 1, 4), tiny)
        rsum = torch.empty(1)
        strides = torch.tensor(attn.stride(), dtype=torch.int64)
        fn(_ptr(scores), _ptr(attn), _cuda._DTYPE_CODE[torch.float32], _ptr(strides), None, _ptr(rsum),
           1, 1, 1, 1, 4, 0.5)
        torch.testing.assert_close(scores, torch.full((1, 1, 4), 0.25))


@needs_cxx
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_emulated_fused_attention_scores_match_the_rust_kernel(emu, seed):
    """cuda/kvscore.cu's fused scoring (kv_row_stats + kv_colsum) against the Rust fused kernel
    on seeded cases: GQA, causal prefill, a chunk over older slots out of token order with
    invalid slots, left-padded queries, alpha 1 / 0.9 / 0.5 / 0, row skipping (tol > 0)."""
    from forgetcore import kvscore

    fn = emu["kvscore"].emu_kv_attention_scores
    fn.argtypes = [P, P, P, P, P, P, P, P, I32, I32, I32, I32, I32, I32, I32, F32, F32, F32]
    g = torch.Generator().manual_seed(seed)
    for alpha, tol in [(1.0, 0.0), (0.9, 0.0), (0.5, 1e-2), (0.0, 0.0)]:   # 0.5, 1e-2: 8 of 13 rows
        b, hkv, group, q, old, d = 2, 2, 2, 13, 9, 12    # small: every emulated thread is an OS thread
        s = old + q
        query = torch.randn(b, hkv * group, q, d, generator=g)
        keys = torch.randn(b, hkv, s, d, generator=g)
        pos = torch.stack([torch.randperm(s, generator=g) for _ in range(b * hkv)]).view(b, hkv, s)
        valid = torch.rand(b, hkv, s, generator=g) > 0.15
        qpos = (old + torch.arange(q)).expand(b, q).contiguous()
        qvalid = torch.ones(b, q, dtype=torch.bool)
        qvalid[1, :5] = False                           # left padding in the second row
        scores = torch.rand(b, hkv, s, generator=g)
        scores[0, 1, 3] = float("inf")                  # the evicted sentinel
        want = kvscore.attention_scores_(scores.clone(), query, keys, 0.25, alpha, positions=pos, valid=valid,
                                         query_positions=qpos, query_valid=qvalid, tol=tol)
        first = q - kvscore.rows_needed(alpha, tol, q)
        stats = torch.full((2 * b * hkv * group * (q - first),), float("nan"))
        decay = float(torch.tensor(alpha, dtype=torch.float32) ** q)
        got = scores.clone()
        fn(_ptr(got), _ptr(query), _ptr(keys), _ptr(pos), _ptr(valid), _ptr(qpos), _ptr(qvalid), _ptr(stats),
           b, hkv * group, hkv, q, s, d, first, 0.25, alpha, decay)
        assert got[0, 1, 3] == float("inf") or alpha != 0.0
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
        # the kept set is the Rust kernel's (scores away from ties by far more than the tolerance)
        budget = s // 3
        assert torch.equal(kvscore.select_keep(got, budget, positions=pos, valid=valid),
                           kvscore.select_keep(want, budget, positions=pos, valid=valid))


@needs_cxx
def test_emulated_select_keep_and_evict_one(emu):
    sel, ev = emu["kvscore"].emu_kv_select_keep, emu["kvscore"].emu_kv_evict_one
    sel.argtypes = [P, P, P, I64, I32, I32, I32, I32, P]
    ev.argtypes = [P, P, P, I64, I32, I32, I32, P]
    g = torch.Generator().manual_seed(7)
    for t in [1, 45, 700, 2600]:
        b, h = 1, 3
        scores = (torch.rand(b, h, t, generator=g) * 6).floor()  # heavy ties
        scores[0, 1] = torch.rand(t, generator=g)  # a row without ties
        scores[0, 2] = 1.0  # one score for all: every choice is a tie, settled by position
        positions = torch.stack([torch.randperm(t, generator=g) for _ in range(b * h)]).view(b, h, t) * 3 - 50
        valid = torch.rand(b, h, t, generator=g) > 0.25
        valid[0, 2, : t // 2 + 1] = False
        for budget, n_sink, n_recent in {
            (t, 0, 0),
            (1, 1, 0),
            (max(t // 3, 2), 1, 1),
            (t // 2, 0, t // 4),
            (t // 2, 3, 0),
        }:
            if n_sink + n_recent > budget or budget == 0 or budget > t:
                continue
            for pos, val in [(positions, valid), (None, None)]:
                p_ = torch.arange(t).expand(b, h, t) if pos is None else pos
                v_ = torch.ones(b, h, t, dtype=torch.bool) if val is None else val
                out = torch.full((b, h, budget), -7, dtype=torch.int64)
                sel(_ptr(scores), _ptr(pos), _ptr(val), b * h, t, budget, n_sink, n_recent, _ptr(out))
                assert torch.equal(out, select_keep_oracle(scores, budget, n_sink, n_recent, p_, v_)), (
                    t,
                    budget,
                    n_sink,
                    n_recent,
                )
                out = torch.full((b, h), -7, dtype=torch.int64)
                ev(_ptr(scores), _ptr(pos), _ptr(val), b * h, t, n_sink, n_recent, _ptr(out))
                assert torch.equal(out, evict_one_oracle(scores, n_sink, n_recent, p_, v_)), (t, n_sink, n_recent)


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------


def _param_like_shapes():
    # Real layer shapes (small), an empty tensor, one element, odd sizes, more than one chunk.
    return [(64, 3, 3, 3), (64,), (0,), (1,), (7,), (3 * _cuda.CHUNK + 5,), (10, 33), (1001,)]


@gpu
@pytest.mark.parametrize("seed", [0, 1])
def test_ssd_dampen_bit_identical(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = _param_like_shapes()
    theta = [torch.randn(s, generator=g) for s in shapes]
    d = [torch.rand(s, generator=g) * (torch.rand(s, generator=g) > 0.1) for s in shapes]
    f = [torch.rand(s, generator=g) * 10 for s in shapes]
    # A misaligned view (offset 1 float): the kernel's scalar path.
    buf = torch.randn(1002, generator=g)
    theta.append(buf[1:])
    d.append(torch.rand(1001, generator=g))
    f.append(torch.rand(1001, generator=g) * 10)
    for alpha, lam in [(10.0, 1.0), (1.0, 0.5), (0.0, 3.0)]:
        dev = [t.cuda() for t in theta]
        counts = _cuda.ssd_dampen_(dev, [x.cuda() for x in d], [x.cuda() for x in f], alpha, lam)
        assert counts.device.type == "cuda" and counts.dtype == torch.int64
        for i, (t0, dd, ff) in enumerate(zip(theta, d, f)):
            want, c = ssd_oracle(t0, dd, ff, alpha, lam)
            assert torch.equal(dev[i].cpu().view(torch.int32), want.view(torch.int32)), (i, alpha, lam)
            assert int(counts[i]) == c


@gpu
def test_importance_primitives_on_cuda_equal_the_reference():
    from forgetcore import importance, reference

    g = torch.Generator().manual_seed(8)
    shapes = _param_like_shapes()
    theta = [torch.randn(s, generator=g) for s in shapes]
    d = [torch.rand(s, generator=g) for s in shapes]
    f = [torch.rand(s, generator=g) * 10 for s in shapes]
    want = [t.clone() for t in theta]
    want_counts = reference.ssd_dampen_(want, d, f, 5.0, 0.7)
    dev = [t.cuda() for t in theta]
    counts = importance.ssd_dampen_(dev, [x.cuda() for x in d], [x.cuda() for x in f], 5.0, 0.7)
    assert counts.device.type == "cuda" and counts.cpu().tolist() == want_counts.tolist()
    assert all(torch.equal(a.cpu(), b) for a, b in zip(dev, want))
    bad = [x.cuda() for x in f]
    bad[5][3] = -1.0
    bad[4][6] = float("nan")
    before = [t.clone() for t in dev]
    with pytest.raises(
        ValueError, match=r"^imp_forget\[4\]: expected finite non-negative importances, got nan at flat index 6"
    ):
        importance.ssd_dampen_(dev, [x.cuda() for x in d], bad, 5.0, 0.7)
    assert all(torch.equal(a, b) for a, b in zip(dev, before))
    acc = [torch.rand(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
    dev = [a.cuda() for a in acc]
    reference.accumulate_(acc, grads, 0.3, "sq")
    importance.accumulate_(dev, [x.cuda() for x in grads], 0.3, mode="sq")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(dev, acc))


@gpu
def test_kvscore_primitives_on_cuda_equal_the_reference():
    from forgetcore import kvscore, reference

    g = torch.Generator().manual_seed(9)
    b, h, t = 2, 3, 257
    scores = (torch.rand(b, h, t, generator=g) * 5).floor()
    positions = torch.stack([torch.randperm(t, generator=g) for _ in range(b * h)]).view(b, h, t)
    valid = torch.rand(b, h, t, generator=g) > 0.2
    dev = [x.cuda() for x in (scores, positions, valid)]
    want = reference.kv_select_keep(scores, 64, 4, 16, positions, valid)
    assert torch.equal(kvscore.select_keep(*dev[:1], 64, 4, 16, dev[1], dev[2]).cpu(), want)
    assert torch.equal(
        kvscore.evict_one(dev[0], 4, 16, dev[1], dev[2]).cpu(), reference.kv_evict_one(scores, 4, 16, positions, valid)
    )
    attn = torch.softmax(torch.randn(b, h * 2, 4, t, generator=g), -1).to(torch.bfloat16)
    for renorm in (False, True):
        got = kvscore.accumulate_(dev[0].clone(), attn.cuda(), 0.8, 2, renorm=renorm, valid=dev[2])
        ref = reference.kv_accumulate_(scores.clone(), attn, 0.8, 2, renorm=renorm, valid=valid)
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)  # closed form vs recurrence


@gpu
@pytest.mark.parametrize("alpha, tol", [(1.0, 0.0), (0.9, 1e-7), (0.0, 0.0)])
def test_fused_attention_scores_on_cuda_equal_the_rust_kernel(alpha, tol):
    from forgetcore import kvscore

    g = torch.Generator().manual_seed(10)
    b, hkv, group, q, s, d = 2, 2, 3, 300, 700, 64
    query, keys = torch.randn(b, hkv * group, q, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    pos = torch.stack([torch.randperm(s, generator=g) for _ in range(b * hkv)]).view(b, hkv, s)
    valid = torch.rand(b, hkv, s, generator=g) > 0.1
    qpos = (s - q + torch.arange(q)).expand(b, q).contiguous()
    qvalid = torch.ones(b, q, dtype=torch.bool)
    qvalid[0, :7] = False
    scores = torch.rand(b, hkv, s, generator=g)
    kw = dict(positions=pos, valid=valid, query_positions=qpos, query_valid=qvalid, tol=tol)
    want = kvscore.attention_scores_(scores.clone(), query, keys, d**-0.5, alpha, **kw)
    got = kvscore.attention_scores_(scores.cuda(), query.cuda(), keys.cuda(), d**-0.5, alpha,
                                    **{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=2e-6)


@gpu
def test_find_invalid_importance():
    imps = [torch.rand(s, device="cuda") for s in [(5,), (2 * _cuda.CHUNK + 3,), (40,)]]
    assert _cuda.find_invalid_importance(imps) is None
    imps[1][[_cuda.CHUNK + 1, 2 * _cuda.CHUNK + 2]] = torch.tensor([float("nan"), -2.0], device="cuda")
    imps[2][3] = float("inf")
    assert _cuda.find_invalid_importance(imps) == (1, _cuda.CHUNK + 1, pytest.approx(float("nan"), nan_ok=True))
    imps[1][7] = -2.0
    assert _cuda.find_invalid_importance(imps) == (1, 7, -2.0)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sq", "abs"])
def test_accumulate_bit_identical(dtype, mode):
    g = torch.Generator().manual_seed(3)
    shapes = _param_like_shapes()
    acc = [torch.rand(s, generator=g) for s in shapes]
    grads = [(torch.randn(s, generator=g) * 3).to(dtype) for s in shapes]
    grads[1] = torch.randn(64, 2, generator=g).to(dtype)[:, 0]  # non-contiguous: copied first
    dev = [a.cuda() for a in acc]
    _cuda.accumulate_(dev, [x.cuda() for x in grads], 0.25, mode=mode)
    for a0, gg, a in zip(acc, grads, dev):
        x = gg.float()
        want = a0 + ((x * x) if mode == "sq" else x.abs()) * torch.tensor(0.25)
        assert torch.equal(a.cpu(), want)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha,group,renorm", [(0.9, 1, False), (1.0, 4, False), (0.0, 2, False), (0.5, 2, True)])
def test_kv_accumulate(dtype, alpha, group, renorm):
    g = torch.Generator().manual_seed(4)
    b, kvh, q, t = 2, 3, 5, 77
    scores = torch.rand(b, kvh, t, generator=g)
    scores[0, 0, 3] = float("inf")  # the step-wise simulation's "evicted" sentinel
    attn = torch.softmax(torch.randn(b, kvh * group, t, q, generator=g), dim=2).to(dtype).transpose(2, 3)
    valid = torch.rand(b, kvh, t, generator=g) > 0.2
    want = kv_accumulate_oracle(scores, attn, alpha, group, valid=valid, renorm=renorm)
    dev = scores.cuda()
    _cuda.kv_accumulate_(dev, attn.cuda(), alpha, group, valid=valid.cuda(), renorm=renorm)
    if renorm:  # row sums reduced in parallel: float32 rounding, not bit-identical
        torch.testing.assert_close(dev.cpu(), want, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(dev.cpu(), want)


@gpu
@pytest.mark.parametrize("seed", range(4))
def test_select_keep_and_evict_one_equal_the_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, t = 2, 3, [1, 40, 300, 1500][seed]
    scores = (torch.rand(b, h, t, generator=g) * 8).floor()  # many ties: exercises tie-breaking
    positions = torch.stack([torch.randperm(t, generator=g) for _ in range(b * h)]).view(b, h, t) + 100
    valid = torch.rand(b, h, t, generator=g) > 0.3
    valid[0, 0] = False  # a row with no valid slot
    valid[1, 2, : t // 2] = False  # left padding
    dev = [x.cuda() for x in (scores, positions, valid)]
    for budget, n_sink, n_recent in [
        (t, 0, 0),
        (min(t, 1), min(t, 1), 0),
        (max(t // 3, 3) if t >= 3 else t, 1, 1 if t >= 3 else 0),
        (t // 2, 0, t // 4),
    ]:
        got = _cuda.kv_select_keep(dev[0], budget, n_sink, n_recent, positions=dev[1], valid=dev[2])
        want = select_keep_oracle(scores, budget, n_sink, n_recent, positions, valid)
        assert torch.equal(got.cpu(), want), (budget, n_sink, n_recent)
        got = _cuda.kv_evict_one(dev[0], n_sink, n_recent, positions=dev[1], valid=dev[2])
        assert torch.equal(got.cpu(), evict_one_oracle(scores, n_sink, n_recent, positions, valid))
    # Defaults: positions = slot index, every slot valid.
    got = _cuda.kv_select_keep(dev[0], max(t // 2, 0), 0, 0)
    want = select_keep_oracle(
        scores, max(t // 2, 0), 0, 0, torch.arange(t).expand(b, h, t), torch.ones(b, h, t, dtype=torch.bool)
    )
    assert torch.equal(got.cpu(), want)


@gpu
def test_runs_on_torchs_current_stream_in_its_context():
    arch, driver = _cuda.device_info(0)
    major, minor = torch.cuda.get_device_capability(0)
    assert arch == major * 10 + minor and driver >= 12000
    s = torch.cuda.Stream()
    x = torch.ones(1 << 22, device="cuda")
    y = torch.full_like(x, 3.0)
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        # Queued behind the fill on the side stream; a launch on another stream could race it.
        x.fill_(2.0)
        _cuda.accumulate_([x], [y], 1.0)
    s.synchronize()
    assert bool((x == 11.0).all())
    assert torch.cuda.current_stream().cuda_stream != s.cuda_stream
    # torch still works in the same (primary) context afterwards.
    assert float((x * 2).sum()) == 22.0 * (1 << 22)


@gpu
def test_no_host_synchronisation():
    # The convention: no host sync in the CUDA path unless the result is needed on the host.
    p = [torch.randn(1000, device="cuda") for _ in range(3)]
    d = [torch.rand(1000, device="cuda") for _ in range(3)]
    scores = torch.rand(2, 4, 512, device="cuda")
    attn = torch.softmax(torch.randn(2, 8, 2, 512, device="cuda"), -1)
    valid = torch.ones(2, 4, 512, dtype=torch.bool, device="cuda")
    _cuda.ssd_dampen_(p, d, d, 1.0, 1.0)  # first call compiles and loads the module
    _cuda.kv_select_keep(scores, 64, 4, 8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _cuda.ssd_dampen_(p, d, d, 1.0, 1.0)
        _cuda.accumulate_(p, d, 0.5)
        _cuda.kv_accumulate_(scores, attn, 0.9, 2, valid=valid, renorm=True)
        _cuda.kv_select_keep(scores, 64, 4, 8, valid=valid)
        _cuda.kv_evict_one(scores, 4, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_package_still_imports_without_cuda():
    assert forgetcore.__version__ == _core.__version__
