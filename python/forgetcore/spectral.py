"""Spectral primitives: singular values, condition numbers and spectral norms of many matrices.

The weights of a model are handed over in one call: on the CPU the Rust kernel (faer) works on
all of them in parallel with the GIL released; CUDA tensors use ``torch.linalg.svdvals`` on
their device (float64, matrices of one shape batched); other devices and float64 inputs use
``reference.py``. Tensors with more than two dimensions (conv kernels) are read as
``(out, in*k*k)``, the reshape the KappaTune spec asks for (the official code feeds 4-D
kernels to ``torch.linalg.svd``, which batches over the leading dimensions instead).

Accuracy (see ``rust/spectral/mod.rs``): float32 in, float64 out. The CPU path forms the
smaller Gram matrix in float64 and takes its eigenvalues (fast, and within ~1e-7 relative for
kappa <= 5e4); matrices whose Gram estimate of kappa exceeds 5e4 are recomputed with a float64
SVD, so every result is within ~1e-6 relative of a float64 SVD of the same float32 matrix.
``kappa`` of a square matrix from 2048 rows needs only the extreme singular values: a float64
LU and Lanczos give them (within ~1e-7 relative, any kappa) in a fraction of the time.
kappa is +inf for a matrix that is singular to working precision
(``sigma_min <= max(m, n) * eps64 * sigma_max``, the zero matrix included).

Not differentiable: inputs that require grad are read through detached views, and NaN/inf
inputs are a ``ValueError`` naming the matrix.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _backend, _checks, _core, reference

__all__ = ["singular_values", "kappa", "spectral_norm", "condition_numbers", "eligible_weights"]

log = logging.getLogger(__name__)

METHODS = ("auto", "gram", "svd")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# A name filter: exact names, a regular expression (re.search), or a predicate.
Include = None | str | Iterable[str] | Callable[[str], bool]


def _matrix(name: str, w: Any) -> torch.Tensor:
    """Check one weight and return it as a 2-D view (out, rest)."""
    _checks.tensor(name, w, dtype=_FLOATS)
    if w.dim() < 2:
        raise ValueError(f"{name}: expected a tensor with at least 2 dimensions, got {_checks.describe(w)}")
    return w.detach().reshape(w.shape[0], math.prod(w.shape[1:]))


def _to_kernel(w: torch.Tensor) -> np.ndarray:
    """float32 contiguous numpy view for the Rust kernel (half precision is widened here)."""
    return _checks.numpy_view(w.to(torch.float32).contiguous())


def _use_rust(op: str, mats: Sequence[torch.Tensor]) -> bool:
    """The dispatch of every spectral primitive: Rust for CPU matrices it computes in float32 or
    wider-from-half; float64 matrices keep their precision in the reference (logged)."""
    if not mats:
        return True
    devices = {w.device for w in mats}
    unsupported = None
    if len(devices) > 1:
        unsupported = f"matrices on several devices ({', '.join(sorted(map(str, devices)))})"
    else:
        wide = [i for i, w in enumerate(mats) if w.dtype == torch.float64]
        if wide:
            unsupported = f"matrices[{wide[0]}] is float64 (the kernel computes in float32)"
    return _backend.dispatch(f"spectral.{op}", mats[0].device, unsupported=unsupported) == _backend.RUST


def singular_values(matrices: Sequence[torch.Tensor], *, method: str = "auto") -> list[torch.Tensor]:
    """Singular values (descending, float64, on the CPU for CPU input) of every matrix.

    ``matrices``: tensors with at least 2 dimensions (more are read as ``(out, -1)``); an empty
    matrix gives an empty result. ``method``: ``"auto"`` (Gram, SVD where ill-conditioned),
    ``"gram"`` (Gram only: accurate for kappa <= ~5e4) or ``"svd"`` (float64 SVD); the CPU
    kernel honours it, the other paths always take the float64 SVD.
    """
    mats = _check_all(matrices, method)
    if _use_rust("singular_values", mats):
        out = _core.spectral_singular_values([_to_kernel(w) for w in mats], method)
        return [torch.from_numpy(s) for s in out]
    return reference.singular_values(mats)


def kappa(matrices: Sequence[torch.Tensor], *, method: str = "auto") -> torch.Tensor:
    """Condition number sigma_max / sigma_min of every matrix: float64 CPU tensor (inf if singular)."""
    mats = _check_all(matrices, method)
    for i, w in enumerate(mats):
        if w.numel() == 0:
            raise ValueError(f"matrices[{i}]: expected a non-empty matrix, got {_checks.describe(w)}")
    if _use_rust("kappa", mats):
        return torch.from_numpy(_core.spectral_condition_numbers([_to_kernel(w) for w in mats], method))
    return reference.kappa(mats)


def spectral_norm(matrices: Sequence[torch.Tensor], *, tol: float = 1e-6, max_iter: int = 100,
                  seed: int = 0) -> torch.Tensor:
    """Power-iteration estimate of the largest singular value of every matrix (float64 CPU tensor).

    Stops when successive estimates differ by at most ``tol`` relative, or after ``max_iter``
    passes (a warning is logged for the matrices that did not converge). The estimate is a lower
    bound on sigma_max; after convergence its relative error is about
    ``tol * sigma_1 / (sigma_1 - sigma_2)``, so a small spectral gap needs a smaller ``tol``.
    Use it when only the scale is needed: it costs ~2mn flops per pass against O(mn min(m, n)).
    """
    tol = _checks.real("tol", tol, low=0.0, low_open=True)
    max_iter = _checks.positive_int("max_iter", max_iter)
    seed = _checks.seed(seed)
    mats = _check_all(matrices, "auto")
    for i, w in enumerate(mats):
        if w.numel() == 0:
            raise ValueError(f"matrices[{i}]: expected a non-empty matrix, got {_checks.describe(w)}")
    if _use_rust("spectral_norm", mats):
        v, _, c = _core.spectral_norm_estimates([_to_kernel(w) for w in mats], tol, max_iter, seed)
        vals, conv = torch.from_numpy(v), torch.from_numpy(c)
    else:
        vals, _, conv = reference.spectral_norm(mats, tol, max_iter, seed)
    if not bool(conv.all()):
        log.warning("spectral_norm: %d of %d matrices did not converge to tol=%g in %d iterations",
                    int((~conv).sum()), len(mats), tol, max_iter)
    return vals


def _check_all(matrices: Any, method: str) -> list[torch.Tensor]:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if isinstance(matrices, torch.Tensor) or not isinstance(matrices, Sequence):
        raise TypeError(f"matrices: expected a sequence of tensors, got {_checks.describe(matrices)}")
    # Not differentiable: matrices that require grad are read through detached views.
    mats = [_matrix(f"matrices[{i}]", w).detach() for i, w in enumerate(matrices)]
    for i, w in enumerate(mats):
        _checks.finite(f"matrices[{i}]", w)
    return mats


def _named_tensors(model_or_tensors: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_tensors, torch.nn.Module):
        return [(n, p) for n, p in model_or_tensors.named_parameters()]
    if isinstance(model_or_tensors, Mapping):
        return [(str(n), t) for n, t in model_or_tensors.items()]
    if isinstance(model_or_tensors, Sequence) and not isinstance(model_or_tensors, (str, torch.Tensor)):
        return [(str(i), t) for i, t in enumerate(model_or_tensors)]
    raise TypeError("model_or_tensors: expected an nn.Module, a mapping name -> tensor or a sequence of "
                    f"tensors, got {_checks.describe(model_or_tensors)}")


def _name_filter(include: Include) -> tuple[Callable[[str], bool], set[str] | None]:
    """The predicate, and the explicit names when ``include`` lists them."""
    if include is None:
        return (lambda _: True), None
    if isinstance(include, str):
        try:
            pat = re.compile(include)
        except re.error as e:
            raise ValueError(f"include: expected a regular expression, got {include!r} ({e})") from None
        return (lambda n: pat.search(n) is not None), None
    if callable(include):
        return include, None
    names = set(include)
    return (lambda n: n in names), names


def eligible_weights(model_or_tensors: Any, *, include: Include = None,
                     max_dim: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs whose condition number KappaTune ranks.

    Every floating tensor with at least 2 dimensions passes (1-D tensors: biases, norms, are
    skipped; named explicitly in ``include`` they are an error), filtered by ``include`` (exact
    names, a regular expression searched in the name, or a predicate) and by ``max_dim``: a
    tensor with any dimension larger than ``max_dim`` is skipped, as the official code's
    ``max_dim_size_to_analyze`` (to leave out embeddings and the LM head).
    """
    named = _named_tensors(model_or_tensors)
    keep, explicit = _name_filter(include)
    if max_dim is not None:
        max_dim = _checks.positive_int("max_dim", max_dim)
    if explicit is not None:
        have = {n: t for n, t in named}
        missing = sorted(explicit - have.keys())
        if missing:
            raise ValueError(f"include: no tensor named {missing[:5]} in model_or_tensors")
        flat = sorted(n for n in explicit if have[n].dim() < 2)
        if flat:
            raise ValueError(f"include: {flat[:5]} have fewer than 2 dimensions; kappa needs a matrix")
    out = []
    for n, t in named:
        _checks.tensor(f"model_or_tensors[{n!r}]", t)
        if t.dim() < 2 or not t.is_floating_point() or not keep(n):
            continue
        if max_dim is not None and max(t.shape) > max_dim:
            continue
        if t.numel() == 0:
            raise ValueError(f"model_or_tensors[{n!r}]: expected a non-empty tensor, got {_checks.describe(t)}")
        out.append((n, t))
    return out


def condition_numbers(model_or_tensors: Any, *, include: Include = None, max_dim: int | None = None,
                      method: str = "auto", progress: bool = True) -> dict[str, float]:
    """name -> kappa = sigma_max / sigma_min for every eligible weight (see ``eligible_weights``).

    ``model_or_tensors``: an ``nn.Module`` (its named parameters), a mapping name -> tensor or a
    sequence of tensors (named "0", "1", ...). Conv kernels are read as ``(out, in*k*k)``.
    kappa is +inf for a weight that is singular to working precision. Large sets run in a few
    batches of similar-sized matrices so a progress bar can follow (``progress=False`` hides it).
    Raises ``ValueError`` naming the weight for NaN/inf entries, and ``model_or_tensors`` when
    nothing is eligible.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    named = eligible_weights(model_or_tensors, include=include, max_dim=max_dim)
    if not named:
        raise ValueError("model_or_tensors: expected at least one tensor with 2 or more dimensions "
                         f"(after include={include!r}, max_dim={max_dim}), got none")
    mats = []
    for n, t in named:
        w = t.detach().reshape(t.shape[0], math.prod(t.shape[1:]))
        _checks.finite(f"model_or_tensors[{n!r}]", w)
        mats.append(w)
    cost = [w.shape[0] * w.shape[1] * min(w.shape) for w in mats]
    order = sorted(range(len(mats)), key=lambda i: -cost[i])
    # About 20 batches of similar-sized matrices: enough steps for the bar, enough matrices per
    # call to keep every core busy.
    per = -(-len(order) // 20) if len(order) > 40 else len(order)
    batches = [order[j:j + per] for j in range(0, len(order), per)]
    result: dict[int, float] = {}
    with tqdm(total=len(mats), desc="kappa", unit="matrix", disable=not progress or len(mats) < 8) as bar:
        for b in batches:
            k = kappa([mats[i] for i in b], method=method)
            for i, v in zip(b, k.tolist()):
                result[i] = v
            bar.update(len(b))
    return {named[i][0]: result[i] for i in range(len(named))}
