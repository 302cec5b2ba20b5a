"""Argument checks shared by every primitive and method.

Every message opens with the argument's name, then says what was expected and what came,
as the project's convention asks: ``"imp_forget: expected float32 tensor of shape (1024,), got float64 (1024, 3)"``.
Checks run before anything is modified, so a call that raises leaves all state as it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def describe(t: Any) -> str:
    """Short description of what came: dtype, shape and device for tensors, the type otherwise."""
    if isinstance(t, torch.Tensor):
        dev = "" if t.device.type == "cpu" else f" on {t.device}"
        return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}{dev}"
    if isinstance(t, np.ndarray):
        return f"numpy {t.dtype} {t.shape}"
    return type(t).__name__


def tensor(
    name: str,
    t: Any,
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with the given dtype(s), shape (None = any size), ndim and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {describe(t)}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            want = " or ".join(str(d).removeprefix("torch.") for d in allowed)
            raise TypeError(f"{name}: expected {want} tensor, got {describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {describe(t)}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            dims = ["*" if s is None else str(s) for s in shape]
            want = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
            raise ValueError(f"{name}: expected shape {want}, got {describe(t)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {torch.device(device)}, got {describe(t)}")
    return t


def finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Raise ValueError if ``t`` holds NaN or inf (one reduction; a host sync on CUDA)."""
    if t.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor with values, got a meta tensor {describe(t)}")
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf of {t.numel()}")
    return t


def positive_int(name: str, v: Any, *, allow_zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    lo = 0 if allow_zero else 1
    if v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return int(v)


def seed(v: Any, name: str = "seed") -> int:
    """A seed of the Rust generators: an int in [0, 2**64)."""
    v = positive_int(name, v, allow_zero=True)
    if v >= 2**64:
        raise ValueError(f"{name}: expected an int below 2**64, got {v}")
    return v


def rng_tensor(words: Sequence[int]) -> torch.Tensor:
    """A xoshiro256++ state (four 64-bit words as signed ints) as saved in state dicts."""
    return torch.tensor(list(words), dtype=torch.int64)


def rng_words(name: str, t: Any) -> list[int]:
    """The four words of a saved generator state (see :func:`rng_tensor`)."""
    tensor(name, t, dtype=torch.int64, shape=(4,))
    return [int(v) for v in t.tolist()]


def real(name: str, v: Any, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """Check a finite real number within [low, high] (ends open where asked)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x}")
    if low is not None and (x < low or (low_open and x == low)):
        raise ValueError(f"{name}: expected a number {'>' if low_open else '>='} {low}, got {x}")
    if high is not None and (x > high or (high_open and x == high)):
        raise ValueError(f"{name}: expected a number {'<' if high_open else '<='} {high}, got {x}")
    return x


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor (shares memory, so in-place kernels write through).

    numpy has no bfloat16: such tensors travel as an int16 view and the kernel widens them.
    """
    if t.device.type != "cpu":
        raise ValueError(f"internal: numpy_view needs a CPU tensor, got {describe(t)}")
    if not t.is_contiguous():
        raise ValueError(f"internal: numpy_view needs a contiguous tensor, got {describe(t)}")
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.detach().numpy()


def replay_buffer(name: str, buffer: Any) -> Any:
    """Check that ``buffer`` has what replay needs: ``add``, ``sample``, ``len``, ``state_dict``,
    ``load_state_dict`` (any such buffer works, not only forgetcore's)."""
    missing = [m for m in ("add", "sample", "__len__", "state_dict", "load_state_dict")
               if not callable(getattr(buffer, m, None))]
    if missing:
        raise TypeError(f"{name}: expected a replay buffer with add, sample, len, state_dict and "
                        f"load_state_dict, got {type(buffer).__name__} without {missing}")
    return buffer


def memory_bytes(device: torch.device | str | None = None) -> int:
    """The memory a single allocation on ``device`` can at most hope for: the physical memory of
    the host (CPU) or the device's total memory (CUDA). Sizes are checked against it before
    anything is allocated, so an impossible size is a ValueError rather than an abort."""
    import os

    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf: fall back to a generous 1 TiB
        return 1 << 40


def fits(name: str, nbytes: int, device: torch.device | str | None = None, what: str = "") -> None:
    """Raise ValueError naming ``name`` and the bytes needed when ``nbytes`` exceed :func:`memory_bytes`."""
    limit = memory_bytes(device)
    if nbytes > limit:
        dev = torch.device("cpu" if device is None else device)
        raise ValueError(f"{name}: would need {nbytes} bytes{' ' + what if what else ''}, more than the "
                         f"{limit} bytes of memory on {dev}")


def state_mapping(name: str, state: Any, keys: Sequence[str] = ()) -> Any:
    """A loaded state must be a mapping holding ``keys``: TypeError otherwise, ValueError naming
    the first missing key as ``name['key']``."""
    from collections.abc import Mapping

    if not isinstance(state, Mapping):
        raise TypeError(f"{name}: expected a dict (a state_dict()), got {type(state).__name__}")
    for k in keys:
        if k not in state:
            raise ValueError(f"{name}[{k!r}]: missing from the state dict")
    return state


def state_int(name: str, v: Any, *, low: int = 0, high: int | None = None) -> int:
    """An int of a loaded state in ``[low, high]`` (``high`` defaults to 2**63 - 1): as strict as a
    constructor argument (no bool, no float, nothing out of range)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if high is None:
        high = 2**63 - 1  # counts, positions and ids of a state are int64 (tensors save them so)
    if v < low or v > high:
        raise ValueError(f"{name}: expected an int in [{low}, {high}], got {v}")
    return int(v)


def tensor_list(name: str, v: Any) -> list[Any]:
    """``v`` as a list (a sequence of tensors is expected): ``None``, a single tensor, a string or
    anything not iterable is a TypeError naming ``name``, not Python's "'NoneType' object is not
    iterable"."""
    if v is None or isinstance(v, (torch.Tensor, str, bytes)) or not hasattr(v, "__iter__"):
        what = f"a single tensor {describe(v)}" if isinstance(v, torch.Tensor) else describe(v)
        raise TypeError(f"{name}: expected a list of tensors, got {what}")
    return list(v)


# Above this many bytes per tensor the exact overlap test (one int64 per byte touched) is skipped
# and intersecting byte ranges count as an overlap: conservative, and said so in the message.
_EXACT_OVERLAP_BYTES = 1 << 24


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes of memory that ``t``'s elements touch (absolute addresses)."""
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        if stride < 0:
            lo += (size - 1) * stride
        else:
            hi += (size - 1) * stride
    es = t.element_size()
    return t.data_ptr() + lo * es, t.data_ptr() + (hi + 1) * es


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Sorted absolute addresses of every byte ``t``'s elements touch (int64, on the CPU)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride)
    es = t.element_size()
    out = (offsets.reshape(-1, 1) * es + torch.arange(es, dtype=torch.int64)).reshape(-1) + t.data_ptr()
    return out.sort().values


def _exact(a: torch.Tensor, b: torch.Tensor | None) -> bool | None:
    """Whether ``a`` and ``b`` share a byte (``b=None``: whether ``a`` touches a byte twice).
    ``None`` when too large to tell exactly."""
    if a.numel() * a.element_size() > _EXACT_OVERLAP_BYTES or (
            b is not None and b.numel() * b.element_size() > _EXACT_OVERLAP_BYTES):
        return None
    x = _bytes(a)
    if b is None:
        return bool((x[1:] == x[:-1]).any()) if x.numel() > 1 else False
    return bool(torch.isin(x, _bytes(b)).any())


def self_overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (an ``expand``-ed or ``as_strided`` view)."""
    if t.numel() <= 1 or t.is_contiguous():
        return False
    if any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride())):
        return True
    lo, hi = _byte_range(t)
    if hi - lo < t.numel() * t.element_size():
        return True
    # Sorted by stride, each stride must clear the extent of the smaller dims: no overlap then.
    dims = sorted((abs(s), n) for n, s in zip(t.shape, t.stride()) if n > 1)
    extent = 1
    for s, n in dims:
        if s < extent:
            return _exact(t, None) is not False
        extent = s * (n - 1) + extent
    return False


def disjoint(name: str, written: Sequence[torch.Tensor],
             reads: Mapping[str, Sequence[torch.Tensor]] | None = None) -> None:
    """Refuse in-place arguments that share memory: two ``written`` tensors, a written tensor with
    one of ``reads`` (argument name -> tensors), or a written tensor whose own elements overlap.
    Any layout: the test is on absolute byte ranges (so views of one storage and tensors sharing a
    numpy buffer are both caught), refined exactly for strided views whose ranges interleave
    (e.g. ``x[:, 0]`` and ``x[:, 1]`` are disjoint); above 16 MiB such interleaved views are
    refused conservatively, and the message says so. An in-place kernel given the same memory
    twice would apply its update twice (or race). Tensors are on one device (checked before).
    """
    tensors: list[tuple[str, torch.Tensor]] = []
    spans: list[tuple[int, int, int]] = []  # (first byte, end, index into tensors)
    groups = [(name, written)] + list((reads or {}).items())
    for g, (label, ts) in enumerate(groups):
        for i, t in enumerate(ts):
            if not t.numel() or t.device.type == "meta":  # meta tensors have no memory
                continue
            if t.is_contiguous():  # the common case: no Python loop over dimensions
                lo = t.data_ptr()
                hi = lo + t.numel() * t.element_size()
            else:
                if g == 0 and self_overlapping(t):
                    raise ValueError(f"{label}[{i}]: its elements share memory ({describe(t)} with strides "
                                     f"{t.stride()}); an in-place update would write them twice: pass a tensor "
                                     f"that owns its memory")
                lo, hi = _byte_range(t)
            spans.append((lo, hi, len(tensors)))
            tensors.append((f"{label}[{i}]", t))
    n_written = sum(1 for t in written if t.numel() and t.device.type != "meta")
    spans.sort()
    for j, (_, hi, a) in enumerate(spans):
        for lo2, _, b in spans[j + 1:]:
            if lo2 >= hi:
                break
            if a >= n_written and b >= n_written:
                continue  # two read-only arguments may share memory
            exact = _exact(tensors[a][1], tensors[b][1])
            if exact is False:
                continue
            first, second = sorted((a, b))
            how = "shares memory with" if exact else "may share memory with (their byte ranges intersect)"
            raise ValueError(f"{tensors[first][0]}: {how} {tensors[second][0]}; an in-place update would "
                             f"apply twice: pass tensors that do not overlap (e.g. .clone() one)")


def flag(name: str, v: Any) -> bool:
    """A bool argument (``check=``, ``validated=``): a string or a number is a TypeError, not truthy."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return bool(v)


def device(name: str, v: Any) -> torch.device:
    """A torch device from a ``torch.device`` or a string; an unknown string is a ValueError naming ``name``."""
    if isinstance(v, torch.device):
        return v
    if not isinstance(v, str):
        raise TypeError(f"{name}: expected a torch.device or a str, got {type(v).__name__}")
    try:
        return torch.device(v)
    except RuntimeError as e:
        raise ValueError(f"{name}: expected a device such as 'cpu' or 'cuda:0', got {v!r} ({e})") from None
