"""Argument checks shared by every primitive and method.

Every message opens with the argument's name, then says what was expected and what came,
as the project's convention asks: ``"imp_forget: expected float32 tensor of shape (1024,), got float64 (1024, 3)"``.
Checks run before anything is modified, so a call that raises leaves all state as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
