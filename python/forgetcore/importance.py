"""Importance family: diagonal Fisher estimates and fused multi-tensor updates.

- :func:`accumulate_`: ``acc += scale * g**2`` (or ``scale * |g|``) over a whole list of tensors in
  one call.
- :func:`ssd_dampen_`: Selective Synaptic Dampening's parameter update over a whole model in one
  call; returns how many elements it dampened per tensor.
- :func:`fisher_diagonal`: the diagonal Fisher of a model over a dataset, in three modes
  (``"batch"``: the official SSD / Avalanche estimate; ``"empirical"``: the exact per-sample
  estimate; ``"mc"``: the true Fisher with labels sampled from the model), correct under
  ``torch.distributed``; defined in :mod:`forgetcore.fisher` and re-exported here.

CPU tensors run the Rust kernels (multi-threaded, GIL released), CUDA tensors the fused
NVRTC kernels of ``cuda/importance.cu`` (one launch per call, on torch's current stream), other
devices the torch formulation in :mod:`forgetcore.reference`; all give bit-identical float32
results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import _backend, _checks, _core, _cuda, reference

# The Fisher estimator lives in forgetcore.fisher; its public names stay importable from here.
from .fisher import MODES, cross_entropy, fisher_diagonal, output_norm_loss

__all__ = ["accumulate_", "ssd_dampen_", "fisher_diagonal", "cross_entropy", "output_norm_loss", "MODES"]

log = logging.getLogger(__name__)

ParamsLike = nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
ImpLike = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


# ---------------------------------------------------------------------------------------------
# argument handling shared by the two in-place primitives
# ---------------------------------------------------------------------------------------------


def _named(arg: str, params: Any) -> tuple[list[str] | None, list[torch.Tensor]]:
    """Return (names or None, tensors) for a module, a dict, named pairs or a plain list."""
    if isinstance(params, nn.Module):
        pairs = list(params.named_parameters())
        return [n for n, _ in pairs], [p for _, p in pairs]
    if isinstance(params, Mapping):
        return list(params.keys()), list(params.values())
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{arg}: expected a list or dict of tensors, got a single tensor {_checks.describe(params)}")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"{arg}: expected a module, a dict or a list of tensors, got {type(params).__name__}") from None
    if items and all(isinstance(i, tuple) and len(i) == 2 for i in items):
        return [str(n) for n, _ in items], [t for _, t in items]
    return None, items


def _match(arg: str, imps: Any, names: list[str] | None, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Order ``imps`` like ``params`` and check each is a float32 tensor of the parameter's shape."""
    if names is not None and isinstance(imps, Mapping):
        missing = [n for n in names if n not in imps]
        extra = [n for n in imps if n not in set(names)]
        if missing or extra:
            raise ValueError(
                f"{arg}: names do not match the parameters (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        out = [imps[n] for n in names]
    else:
        if isinstance(imps, Mapping):
            raise TypeError(f"{arg}: got a dict but the parameters are unnamed; pass a list in parameter order")
        if isinstance(imps, torch.Tensor):
            raise TypeError(f"{arg}: expected a list or dict of tensors, got a single tensor {_checks.describe(imps)}")
        out = _checks.tensor_list(arg, imps)
        if len(out) != len(params):
            raise ValueError(f"{arg}: expected {len(params)} tensors (one per parameter), got {len(out)}")
    for i, (t, p) in enumerate(zip(out, params)):
        label = f"{arg}[{names[i]!r}]" if names is not None else f"{arg}[{i}]"
        _checks.tensor(label, t, dtype=torch.float32, shape=tuple(p.shape), device=p.device)
    return out


def _check_params(arg: str, params: list[torch.Tensor]) -> None:
    for i, p in enumerate(params):
        _checks.tensor(f"{arg}[{i}]", p)
        if not p.is_floating_point():
            raise TypeError(f"{arg}[{i}]: expected a floating-point tensor, got {_checks.describe(p)}")
        if p.device != params[0].device:
            raise ValueError(f"{arg}[{i}]: expected every tensor on {params[0].device}, got {_checks.describe(p)}")


def _unsupported(arg: str, tensors: list[torch.Tensor]) -> str | None:
    """Why the kernels cannot write ``tensors`` in place (None when they can): they take
    contiguous float32 tensors (anything else goes to the reference, and the dispatch says so)."""
    for i, t in enumerate(tensors):
        if t.dtype != torch.float32:
            return f"{arg}[{i}] is {_checks.describe(t)}, not float32"
        if not t.is_contiguous():
            return f"{arg}[{i}] is not contiguous (strides {t.stride()})"
    return None


def _validate(arg: str, imps: list[torch.Tensor], names: list[str] | None, use_rust: bool,
              use_cuda: bool = False) -> None:
    """Raise ValueError at the first NaN, infinite or negative importance (one read pass)."""
    bad: tuple[int, int, float] | None = None
    if use_cuda:
        bad = _cuda.find_invalid_importance([t.contiguous() for t in imps])
    elif use_rust:
        found = _core.find_invalid_importance([_checks.numpy_view(t.contiguous()) for t in imps])
        bad = None if found is None else (found.tensor, found.index, found.value)
    else:
        for ti, t in enumerate(imps):
            flat = t.reshape(-1)
            mask = ~((flat >= 0) & (flat < float("inf")))
            if bool(mask.any()):
                i = int(mask.nonzero()[0, 0])
                bad = (ti, i, float(flat[i]))
                break
    if bad is not None:
        ti, i, v = bad
        label = f"{arg}[{names[ti]!r}]" if names is not None else f"{arg}[{ti}]"
        raise ValueError(f"{label}: expected finite non-negative importances, got {v} at flat index {i}")


def _check_finite(arg: str, ts: list[torch.Tensor], index: list[int], names: list[str] | None,
                  use_rust: bool) -> None:
    """Raise ValueError at the first NaN or infinity of ``ts`` (one read pass, nothing written).

    ``index[k]`` is the position of ``ts[k]`` in the caller's list (for the message).
    """
    bad = None
    if use_rust and all(t.dtype == torch.float32 and t.is_contiguous() for t in ts):
        found = _core.find_nonfinite([_checks.numpy_view(t) for t in ts])
        bad = None if found is None else (found.tensor, found.index, found.value)
    else:
        # aminmax reads each tensor once without a temporary; NaN propagates into both ends.
        ends = [torch.stack(torch.aminmax(t.reshape(-1).float())) for t in ts if t.numel()]
        nonempty = [k for k, t in enumerate(ts) if t.numel()]
        if ends and not bool(torch.isfinite(torch.stack(ends)).all()):
            k = next(k for k, e in zip(nonempty, ends) if not bool(torch.isfinite(e).all()))
            flat = ts[k].reshape(-1)
            i = int((~torch.isfinite(flat)).nonzero()[0, 0])
            bad = (k, i, float(flat[i]))
    if bad is not None:
        k, i, v = bad
        ti = index[k]
        label = f"{arg}[{names[ti]!r}]" if names is not None else f"{arg}[{ti}]"
        raise ValueError(f"{label}: expected finite values, got {v} at flat index {i}")


def _bump_version(params: list[torch.Tensor]) -> None:
    # Writes through numpy bypass autograd's version counter; bump it so a graph that saved
    # these tensors notices the in-place change, as it would after a torch in-place op.
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        for p in params:
            bump(p)


# ---------------------------------------------------------------------------------------------
# public primitives
# ---------------------------------------------------------------------------------------------


def accumulate_(acc: ImpLike | ParamsLike, grads: ImpLike, scale: float = 1.0, mode: str = "sq", *,
                validated: bool = False) -> None:
    """``acc[t] += scale * g[t]**2`` (``mode="sq"``) or ``scale * |g[t]|`` (``"abs"``) for every tensor.

    ``acc``: float32 tensors (a list or a name -> tensor dict); ``grads``: matching tensors
    (float16/bfloat16 are widened to float32; ``None`` entries add nothing). One fused,
    multi-threaded pass on CPU; bit-identical to ``reference.accumulate_``. Raises before
    touching ``acc`` if anything is off: gradients must be finite, which one read pass checks
    before anything is written (the update writes every element and cannot be undone in
    float32); ``validated=True`` skips that pass for gradients the caller vouches for.
    Tensors that share memory (an accumulator twice, overlapping views, an accumulator that is
    also a gradient) are refused on every path: they would add twice. Not differentiable:
    tensors that require grad are read and written through detached views.
    """
    if mode not in ("sq", "abs"):
        raise ValueError(f"mode: expected 'sq' or 'abs', got {mode!r}")
    scale = _checks.real("scale", scale)
    validated = _checks.flag("validated", validated)
    names, accs = _named("acc", acc)
    for i, a in enumerate(accs):
        _checks.tensor(f"acc[{i}]", a, dtype=torch.float32)
        if a.device != accs[0].device:
            raise ValueError(f"acc[{i}]: expected every tensor on {accs[0].device}, got {_checks.describe(a)}")
    if names is not None and isinstance(grads, Mapping):
        extra = [n for n in grads if n not in set(names)]
        if extra:
            raise ValueError(f"grads: names do not match acc (unexpected {extra[:3]})")
        glist = [grads.get(n) for n in names]
    else:
        glist = _checks.tensor_list("grads", grads)
        if len(glist) != len(accs):
            raise ValueError(f"grads: expected {len(accs)} tensors (one per accumulator), got {len(glist)}")
    pairs = []
    for i, (a, g) in enumerate(zip(accs, glist)):
        if g is None:
            continue
        _checks.tensor(f"grads[{i}]", g, shape=tuple(a.shape), device=a.device)
        if not g.is_floating_point():
            raise TypeError(f"grads[{i}]: expected a floating-point tensor, got {_checks.describe(g)}")
        pairs.append((a, g.detach()))
    if not pairs:
        return
    a_l, g_l = [a for a, _ in pairs], [g for _, g in pairs]
    # Every path (kernels and reference): an accumulator aliasing another or a gradient would add twice.
    _checks.disjoint("acc", a_l, {"grads": g_l})
    backend = _backend.dispatch("importance.accumulate_", a_l[0].device, cuda_kernel=True,
                                unsupported=_unsupported("acc", a_l))
    if not validated:
        _check_finite("grads", g_l, [i for i, (_, g) in enumerate(zip(accs, glist)) if g is not None], names,
                      backend == _backend.RUST)
    if backend == _backend.CUDA:
        # float16/bfloat16 gradients are widened in the kernel (no float32 copy); others copied
        g_l = [g if g.dtype in (torch.float32, torch.float16, torch.bfloat16) else g.to(torch.float32) for g in g_l]
        _cuda.accumulate_(a_l, g_l, scale, mode)
        _bump_version(a_l)
    elif backend == _backend.RUST:
        g_l = [g.to(torch.float32) for g in g_l]
        _core.accumulate_([_checks.numpy_view(a) for a in a_l],
                          [_checks.numpy_view(g.contiguous()) for g in g_l], scale, mode)
        _bump_version(a_l)
    else:
        # torch's own in-place ops bump the version counters here.
        with torch.no_grad():
            reference.accumulate_(a_l, g_l, scale, mode)


def ssd_dampen_(params: ParamsLike, imp_full: ImpLike, imp_forget: ImpLike, alpha: float,
                lam: float = 1.0, *, validated: bool = False) -> torch.Tensor:
    """Selective Synaptic Dampening's update, in place, over every parameter tensor at once.

    Foster, Schoepf & Brintrup, "Fast Machine Unlearning Without Retraining Through Selective
    Synaptic Dampening", AAAI 2024 (eq. 3-4 of the paper, ``modify_weight`` in the official
    code): wherever ``imp_forget > alpha * imp_full``,
    ``theta <- theta * min(lam * imp_full / imp_forget, 1)``.

    ``params``: a module, a name -> tensor dict, named pairs or a list; ``imp_full`` and
    ``imp_forget``: float32 importances of the same shapes (dicts keyed by the parameter names
    when ``params`` is named, as :func:`fisher_diagonal` returns them). ``alpha`` and ``lam``
    are finite and >= 0. Importances must be finite and non-negative and parameters finite;
    checking that costs read passes (before anything is written), which ``validated=True`` skips
    (for importances :func:`fisher_diagonal` made and parameters the caller vouches for).
    Parameters that share memory with each other or with an importance are refused on every
    path (they would be dampened twice). Not differentiable: parameters that require grad are
    updated in place under ``no_grad`` (their version counters are bumped).

    Returns the number of selected elements per tensor, an int64 tensor on the parameters'
    device. float32 results are bit-identical to ``reference.ssd_dampen_``. If it raises, no
    parameter has changed.
    """
    alpha = _checks.real("alpha", alpha, low=0.0)
    lam = _checks.real("lam", lam, low=0.0)
    validated = _checks.flag("validated", validated)
    names, plist = _named("params", params)
    _check_params("params", plist)
    full = _match("imp_full", imp_full, names, plist)
    forget = _match("imp_forget", imp_forget, names, plist)
    if not plist:
        return torch.zeros(0, dtype=torch.int64)
    device = plist[0].device
    backend = _backend.dispatch("importance.ssd_dampen_", device, cuda_kernel=True,
                                unsupported=_unsupported("params", plist))
    use_rust, use_cuda = backend == _backend.RUST, backend == _backend.CUDA
    # Every path: a parameter given twice (or overlapping another / an importance) would be dampened twice.
    _checks.disjoint("params", plist, {"imp_full": full, "imp_forget": forget})
    if not validated:
        # NaN/inf parameters would pass through the dampening silently: one read pass, before any write.
        _check_finite("params", plist, list(range(len(plist))), names, use_rust)
        _validate("imp_full", full, names, use_rust, use_cuda)
        _validate("imp_forget", forget, names, use_rust, use_cuda)
    with torch.no_grad():
        if use_cuda:
            counts = _cuda.ssd_dampen_(plist, [d.contiguous() for d in full], [f.contiguous() for f in forget],
                                       alpha, lam)
            _bump_version(plist)
            return counts
        if use_rust:
            counts_np = _core.ssd_dampen_([_checks.numpy_view(p) for p in plist],
                                          [_checks.numpy_view(d.contiguous()) for d in full],
                                          [_checks.numpy_view(f.contiguous()) for f in forget],
                                          alpha, lam)
            _bump_version(plist)
            return torch.from_numpy(counts_np)
        return reference.ssd_dampen_(plist, full, forget, alpha, lam).to(device)
