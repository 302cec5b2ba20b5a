"""The CUDA path: NVRTC-compiled kernels (``cuda/*.cu``) launched on torch's current stream.

The functions here take torch CUDA tensors, check them, and hand device pointers to the Rust
launchers (``rust/cuda/``), which compile the embedded sources on first use to a cubin for the
device's architecture (cached per architecture and device) and launch in the device's primary
context, the one torch uses. Nothing here synchronises with the host: counts and indices come
back as CUDA tensors.

Libraries: libnvrtc comes with torch's CUDA wheels (``site-packages/nvidia/*/lib``); it is
loaded from there before the first compile (``FORGETCORE_NVRTC=/path/to/libnvrtc.so.N``
overrides the search). The driver (``libcuda.so.1``) comes with the NVIDIA driver. Either one
missing raises :class:`CudaUnavailableError` (a ``RuntimeError``) naming what is missing; NVRTC
rejecting a source raises :class:`CudaCompileError` (a ``RuntimeError``) whose ``log`` holds the
compiler log. Both are created by the Rust extension, which raises them itself.

Semantics are those of the Rust kernels and ``reference.py``; see ``cuda/importance.cu`` and
``cuda/kvscore.cu`` for what is bit-identical.
"""

from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import _checks, _core

__all__ = [
    "CHUNK",
    "CudaCompileError",
    "CudaUnavailableError",
    "accumulate_",
    "compile_check",
    "device_info",
    "find_invalid_importance",
    "is_available",
    "kv_accumulate_",
    "kv_attention_scores_",
    "kv_evict_one",
    "kv_select_keep",
    "load_nvrtc",
    "nvrtc_candidates",
    "ssd_dampen_",
]

#: Elements per block of the multi-tensor kernels (a multiple of 4: float4 loads).
CHUNK = 16384

# Attention / gradient storage codes shared with the .cu files (DT_F32, DT_F16, DT_BF16).
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


CudaUnavailableError = _core.CudaUnavailableError
CudaCompileError = _core.CudaCompileError


# ---------------------------------------------------------------------------------------------
# Finding and loading the libraries
# ---------------------------------------------------------------------------------------------

_loaded_nvrtc: str | None = None


def _site_dirs() -> list[Path]:
    dirs = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    seen: list[Path] = []
    for d in dirs:
        p = Path(d)
        if p.is_dir() and p not in seen:
            seen.append(p)
    return seen


def nvrtc_candidates() -> list[Path]:
    """libnvrtc files in the nvidia wheels under site-packages, torch's CUDA major first."""
    patterns = ["nvidia/*/lib/libnvrtc.so.*", "nvidia/*/bin/nvrtc64_*.dll"]
    found: list[Path] = []
    for d in _site_dirs():
        for pat in patterns:
            for f in sorted(glob.glob(str(d / pat))):
                p = Path(f)
                if "builtins" not in p.name and p not in found:
                    found.append(p)
    major = (torch.version.cuda or "").split(".")[0]
    # cu13 wheels: nvidia/cu13/lib/libnvrtc.so.13; cu12 wheels: nvidia/cuda_nvrtc/lib/libnvrtc.so.12
    found.sort(key=lambda p: 0 if major and (p.name.endswith(f".so.{major}") or f"_{major}" in p.name) else 1)
    return found


def load_nvrtc() -> str:
    """Load libnvrtc (once) and return its path; raise CudaUnavailableError if impossible.

    ``FORGETCORE_NVRTC`` names the file explicitly; otherwise the nvidia wheels torch installs
    are searched. The library is loaded globally, so the Rust loader (which looks it up by
    name, ``libnvrtc.so.N``) finds this copy.
    """
    global _loaded_nvrtc
    if _loaded_nvrtc is not None:
        return _loaded_nvrtc
    explicit = os.environ.get("FORGETCORE_NVRTC")
    if explicit:
        if not Path(explicit).is_file():
            raise CudaUnavailableError(f"FORGETCORE_NVRTC: expected the path of libnvrtc, got {explicit!r}, "
                                       "which does not exist")
        paths = [Path(explicit)]
    else:
        paths = nvrtc_candidates()
        if not paths:
            raise CudaUnavailableError(
                "libnvrtc: not found under site-packages/nvidia/ (it comes with torch's CUDA wheels from "
                "PyPI, e.g. nvidia-cuda-nvrtc); install one or set FORGETCORE_NVRTC to the library's path"
            )
    errors = []
    for p in paths:
        try:
            ctypes.CDLL(str(p), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            errors.append(f"{p}: {e}")
            continue
        _loaded_nvrtc = str(p)
        return _loaded_nvrtc
    raise CudaUnavailableError("libnvrtc: could not load " + "; ".join(errors))


def _call(fn, *args):
    """Call a Rust CUDA binding with libnvrtc loaded (the binding raises the typed errors)."""
    load_nvrtc()
    return fn(*args)


def compile_check(arch: int, *, cubin: bool = False) -> list[tuple[str, int]]:
    """Compile every kernel source for sm_``arch`` with NVRTC (no GPU needed)."""
    return _call(_core.cuda_compile_check, int(arch), bool(cubin))


def device_info(device: int | torch.device = 0) -> tuple[int, int]:
    """(compute capability as 90, driver version as 13000) of a CUDA device."""
    index = torch.device("cuda", device).index if isinstance(device, int) else device.index
    return _call(_core.cuda_device_info, 0 if index is None else index)


def is_available() -> bool:
    """True when a CUDA device, its driver and libnvrtc are all usable."""
    if not torch.cuda.is_available():
        return False
    try:
        load_nvrtc()
    except CudaUnavailableError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _cuda_tensor(name: str, t, dtype, device: torch.device | None, *, contiguous: bool = True) -> torch.Tensor:
    _checks.tensor(name, t, dtype=dtype)
    if t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got {_checks.describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {_checks.describe(t)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got {_checks.describe(t)} with strides {t.stride()}")
    return t


def _tensor_list(name: str, ts) -> list[torch.Tensor]:
    if isinstance(ts, torch.Tensor) or not isinstance(ts, Sequence):
        raise TypeError(f"{name}: expected a list of tensors, got {_checks.describe(ts)}")
    return list(ts)


def _stream(device: torch.device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


def _table(columns: list[list[int]], numels: list[int], device: torch.device,
           after: Sequence[Sequence[int]] = ()) -> tuple[torch.Tensor, int]:
    """The table [col_0[n], ..., numel[n], after_0[n], ..., block_start[n + 1]] as a CUDA int64 tensor.

    Built on the host and copied asynchronously from pinned memory (no host sync); torch's
    allocator keeps both buffers alive until the stream has used them.
    """
    starts = [0]
    for m in numels:
        starts.append(starts[-1] + (m + CHUNK - 1) // CHUNK)
    flat = [v for col in columns for v in col] + numels + [v for col in after for v in col] + starts
    host = torch.tensor(flat, dtype=torch.int64, pin_memory=True)
    return host.to(device, non_blocking=True), starts[-1]


# ---------------------------------------------------------------------------------------------
# importance
# ---------------------------------------------------------------------------------------------


def accumulate_(acc: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float = 1.0,
                mode: str = "sq") -> None:
    """acc[t] += (g[t] * g[t]) * scale (``mode="sq"``) or |g[t]| * scale (``"abs"``), one launch.

    ``acc``: contiguous float32 CUDA tensors (updated in place); ``grads``: float32, float16 or
    bfloat16 tensors of the same shapes on the same device (float32 is bit-identical to the
    Rust kernel; half inputs are widened exactly first).
    """
    acc, grads = _tensor_list("acc", acc), _tensor_list("grads", grads)
    if len(acc) != len(grads):
        raise ValueError(f"grads: expected {len(acc)} tensors, got {len(grads)}")
    if mode not in ("sq", "abs"):
        raise ValueError(f"mode: expected 'sq' or 'abs', got {mode!r}")
    scale = _checks.real("scale", scale)
    if not acc:
        return
    device = acc[0].device
    for i, (a, g) in enumerate(zip(acc, grads)):
        _cuda_tensor(f"acc[{i}]", a, torch.float32, device)
        _cuda_tensor(f"grads[{i}]", g, tuple(_DTYPE_CODE), device, contiguous=False)
        if g.shape != a.shape:
            raise ValueError(f"grads[{i}]: expected shape {tuple(a.shape)}, got {_checks.describe(g)}")
    grads = [g.contiguous() for g in grads]
    meta, blocks = _table(
        [[a.data_ptr() for a in acc], [g.data_ptr() for g in grads]],
        [a.numel() for a in acc],
        device,
        after=[[_DTYPE_CODE[g.dtype] for g in grads]],
    )
    _call(_core._cuda_accumulate_, device.index, _stream(device), meta.data_ptr(), [a.numel() for a in acc],
          [g.numel() for g in grads], CHUNK, blocks, scale, mode)
    # meta (and the grads' contiguous copies) may be freed now: the caching allocator only
    # reuses their memory for work queued after this launch on the same stream.


def ssd_dampen_(params: Sequence[torch.Tensor], imp_full: Sequence[torch.Tensor], imp_forget: Sequence[torch.Tensor],
                alpha: float, lam: float = 1.0) -> torch.Tensor:
    """SSD dampening in place over every tensor, one launch; returns selected counts (int64, on the device).

    Wherever ``imp_forget > alpha * imp_full``: ``theta *= min((lam * imp_full) / imp_forget, 1)``,
    in float32 with the roundings of the Rust kernel (bit-identical). Importances are not
    checked for NaN or sign here (the caller validates them).
    """
    params = _tensor_list("params", params)
    imp_full, imp_forget = _tensor_list("imp_full", imp_full), _tensor_list("imp_forget", imp_forget)
    for name, lst in (("imp_full", imp_full), ("imp_forget", imp_forget)):
        if len(lst) != len(params):
            raise ValueError(f"{name}: expected {len(params)} tensors, got {len(lst)}")
    alpha = _checks.real("alpha", alpha, low=0.0)
    lam = _checks.real("lam", lam, low=0.0)
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    device = params[0].device
    for i, (p, d, f) in enumerate(zip(params, imp_full, imp_forget)):
        _cuda_tensor(f"params[{i}]", p, torch.float32, device)
        for name, t in ((f"imp_full[{i}]", d), (f"imp_forget[{i}]", f)):
            _cuda_tensor(name, t, torch.float32, device)
            if t.shape != p.shape:
                raise ValueError(f"{name}: expected shape {tuple(p.shape)}, got {_checks.describe(t)}")
    n = len(params)
    counts = torch.zeros(n, dtype=torch.int64, device=device)
    meta, blocks = _table(
        [[p.data_ptr() for p in params], [d.data_ptr() for d in imp_full], [f.data_ptr() for f in imp_forget]],
        [p.numel() for p in params],
        device,
    )
    numels = [[t.numel() for t in ts] for ts in (params, imp_full, imp_forget)]
    _call(_core._cuda_ssd_dampen_, device.index, _stream(device), meta.data_ptr(), numels, CHUNK, blocks,
          alpha, lam, counts.data_ptr())
    return counts


def find_invalid_importance(imps: Sequence[torch.Tensor]) -> tuple[int, int, float] | None:
    """(tensor index, flat index, value) of the first NaN, infinite or negative value, or None.

    One launch over every tensor, then one host sync to read the answer (needed to raise).
    The same position and value as the Rust ``find_invalid_importance`` (whose named result has
    ``tensor``, ``index`` and ``value``).
    """
    imps = _tensor_list("imps", imps)
    if not imps:
        return None
    device = imps[0].device
    for i, t in enumerate(imps):
        _cuda_tensor(f"imps[{i}]", t, torch.float32, device)
    n = len(imps)
    first = torch.full((n,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    meta, blocks = _table([[t.data_ptr() for t in imps]], [t.numel() for t in imps], device)
    _call(_core._cuda_find_invalid, device.index, _stream(device), meta.data_ptr(), n, CHUNK, blocks, first.data_ptr())
    host = first.tolist()  # the one sync
    for ti, i in enumerate(host):
        if i != torch.iinfo(torch.int64).max:
            return ti, i, float(imps[ti].reshape(-1)[i])
    return None


# ---------------------------------------------------------------------------------------------
# kvscore
# ---------------------------------------------------------------------------------------------


def _row_tensors(scores, positions, valid) -> tuple[torch.Tensor, int, int, int, int]:
    _cuda_tensor("scores", scores, torch.float32, None)
    if scores.dim() != 3:
        raise ValueError(f"scores: expected shape (batch, kv_heads, slots), got {_checks.describe(scores)}")
    device = scores.device
    pos_ptr = valid_ptr = 0
    if positions is not None:
        _cuda_tensor("positions", positions, torch.int64, device)
        if positions.shape != scores.shape:
            raise ValueError(f"positions: expected shape {tuple(scores.shape)}, got {_checks.describe(positions)}")
        pos_ptr = positions.data_ptr()
    if valid is not None:
        _cuda_tensor("valid", valid, torch.bool, device)
        if valid.shape != scores.shape:
            raise ValueError(f"valid: expected shape {tuple(scores.shape)}, got {_checks.describe(valid)}")
        valid_ptr = valid.data_ptr()
    b, h, t = scores.shape
    return device, pos_ptr, valid_ptr, b * h, t


def kv_accumulate_(scores: torch.Tensor, attn: torch.Tensor, alpha: float, group: int = 1, *,
                   renorm: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
    """S <- alpha^q S + sum_i alpha^(q-1-i) A_i in place, the query heads of each GQA group summed.

    ``scores``: contiguous float32 (batch, kv_heads, slots); ``attn``: float32/float16/bfloat16
    (batch, kv_heads * group, q, slots), any strides; ``valid``: bool (batch, kv_heads, slots),
    invalid slots receive nothing. ``renorm=True`` divides each query head's row by its sum over
    the valid slots first (A2SF); otherwise rows are added as they are (H2O). ``alpha == 0``
    keeps +inf scores and zeroes the rest before adding. Without ``renorm`` the result is
    bit-identical to the Rust kernel; with it, equal within float32 rounding of the row sums.
    Returns ``scores``.
    """
    device, _, valid_ptr, _, t = _row_tensors(scores, None, valid)
    _cuda_tensor("attn", attn, tuple(_DTYPE_CODE), device, contiguous=False)
    alpha = _checks.real("alpha", alpha, low=0.0, high=1.0)
    group = _checks.positive_int("group", group)
    b, kvh, _ = scores.shape
    if attn.dim() != 4 or attn.shape[0] != b or attn.shape[1] != kvh * group or attn.shape[3] != t:
        raise ValueError(f"attn: expected shape ({b}, {kvh * group}, q, {t}), got {_checks.describe(attn)}")
    q = attn.shape[2]
    inv = torch.empty(b * kvh * group * q, dtype=torch.float32, device=device) if renorm else None
    _call(_core._cuda_kv_accumulate_, device.index, _stream(device), scores.data_ptr(), attn.data_ptr(),
          str(attn.dtype).removeprefix("torch."), list(attn.stride()), valid_ptr,
          0 if inv is None else inv.data_ptr(), [b, kvh, group, q, t], alpha)
    return scores


def kv_attention_scores_(scores: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                         valid: torch.Tensor, query_positions: torch.Tensor, query_valid: torch.Tensor,
                         scaling: float, alpha: float, tol: float) -> torch.Tensor:
    """The fused scoring of ``cuda/kvscore.cu`` (``kv_row_stats`` + ``kv_colsum``): the alpha-weighted
    softmax column sums of ``query`` over ``keys`` added to ``scores`` in place, as the Rust
    kernel computes them (within float32 rounding), never holding a (q x slots) matrix.
    Contiguous tensors on one device: scores float32 (B, Hkv, S), query float32 (B, Hq, Lq, D),
    keys float32 (B, Hkv, S, D), positions/valid (B, Hkv, S), query_positions/query_valid (B, Lq).
    Returns ``scores``."""
    device = scores.device
    _cuda_tensor("scores", scores, torch.float32, None)
    for name, t, dt in [("query", query, torch.float32), ("keys", keys, torch.float32),
                        ("positions", positions, torch.int64), ("valid", valid, torch.bool),
                        ("query_positions", query_positions, torch.int64), ("query_valid", query_valid, torch.bool)]:
        _cuda_tensor(name, t, dt, device)
    b, hq, lq, d = query.shape
    _, hkv, s = scores.shape
    from . import kvscore  # the same row count the Rust kernel uses (scratch size)

    w = kvscore.rows_needed(alpha, tol, lq)
    stats = torch.empty(2 * b * hq * w, dtype=torch.float32, device=device)
    ptrs = [t.data_ptr() for t in (scores, query, keys, positions, valid, query_positions, query_valid, stats)]
    _call(_core._cuda_kv_attention_scores_, device.index, _stream(device), ptrs, [b, hq, hkv, lq, s, d],
          scaling, alpha, tol)
    return scores


def kv_select_keep(scores: torch.Tensor, budget: int, n_sink: int = 0, n_recent: int = 0,
                   positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The ``budget`` slots to keep per (batch, kv-head), ascending: int64 (batch, kv_heads, budget).

    Sinks are the first ``n_sink`` valid tokens by position, the recent window the ``n_recent``
    highest positions among the rest, the remaining places go to the highest scores (ties: the
    later token). A row with fewer valid slots than the budget keeps all of them and is filled
    up with its lowest invalid slots. ``positions=None``: slot index; ``valid=None``: all valid.
    Valid positions of a row must be distinct. Same result as the Rust kernel.
    """
    device, pos_ptr, valid_ptr, rows, t = _row_tensors(scores, positions, valid)
    budget = _checks.positive_int("budget", budget, allow_zero=True)
    n_sink = _checks.positive_int("n_sink", n_sink, allow_zero=True)
    n_recent = _checks.positive_int("n_recent", n_recent, allow_zero=True)
    if budget > t:
        raise ValueError(f"budget: expected at most the {t} cached slots, got {budget}")
    if n_sink + n_recent > budget:
        raise ValueError(f"budget: expected at least n_sink + n_recent = {n_sink + n_recent}, got {budget}")
    out = torch.empty(*scores.shape[:2], budget, dtype=torch.int64, device=device)
    _call(_core._cuda_kv_select_keep, device.index, _stream(device), scores.data_ptr(), pos_ptr, valid_ptr,
          rows, t, budget, n_sink, n_recent, out.data_ptr())
    return out


def kv_evict_one(scores: torch.Tensor, n_sink: int = 0, n_recent: int = 0, positions: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per (batch, kv-head) the slot to evict, int64 (batch, kv_heads), or -1 where none is evictable.

    The lowest score among valid slots that are neither sinks nor recent (ties: the older token).
    """
    device, pos_ptr, valid_ptr, rows, t = _row_tensors(scores, positions, valid)
    n_sink = _checks.positive_int("n_sink", n_sink, allow_zero=True)
    n_recent = _checks.positive_int("n_recent", n_recent, allow_zero=True)
    out = torch.empty(*scores.shape[:2], dtype=torch.int64, device=device)
    _call(_core._cuda_kv_evict_one, device.index, _stream(device), scores.data_ptr(), pos_ptr, valid_ptr,
          rows, t, n_sink, n_recent, out.data_ptr())
    return out
