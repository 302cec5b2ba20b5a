"""Orthonormal bases and gradient projection: the primitive family behind GPM, FOT and GU.

Functions (CPU tensors run the Rust kernels with the GIL released, other devices the torch
reference; all take float32):

- ``project_out_(grads, bases)``: ``G <- G - (G U) U^T`` for many (out, in) gradients at once,
  ``U`` (in, rank) orthonormal on the input side (GPM, FOT).
- ``project_out_flat_(g, vectors)``: ``g <- g - V^T (V g)`` for one vector over all parameters
  and orthonormal rows ``V`` (GU's global projection).
- ``extend_basis`` / ``extend_bases``: grow a basis from a representation matrix with GPM's
  energy criterion (``count="official"`` or ``"reach"``) or FOT's norm-ratio criterion.
- ``orthonormalize(vectors, tol)``: Gram-Schmidt applied twice (GU's multi-vector variant).

Objects: ``Subspace`` (per-layer bases with ``state_dict``) and ``GradientProjector`` (finds a
model's Linear and Conv2d layers, collects their input representations, projects ``.grad``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend, _checks, _core, reference

log = logging.getLogger(__name__)

__all__ = [
    "project_out_", "project_out_flat_", "extend_basis", "extend_bases", "orthonormalize",
    "check_orthonormal", "Subspace", "GradientProjector", "CRITERIA", "COUNTS",
]

CRITERIA = ("energy", "norm_ratio")
COUNTS = ("official", "reach")
# A basis set once and used for many projections is checked fully (U^T U = I) at that time.
ORTHONORMAL_TOL = 1e-3


def _f32(name: str, t: Any, ndim: int) -> torch.Tensor:
    return _checks.tensor(name, t, dtype=torch.float32, ndim=ndim)


def _same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {_checks.describe(t)}")


def check_orthonormal(name: str, basis: torch.Tensor, tol: float = ORTHONORMAL_TOL) -> torch.Tensor:
    """Full check that the columns of ``basis`` (dim, rank) are orthonormal: ``|U^T U - I| <= tol``."""
    _f32(name, basis, 2)
    d, r = basis.shape
    if r > d:
        raise ValueError(f"{name}: rank {r} exceeds the dimension {d}")
    _checks.finite(name, basis)
    if r:
        u = basis.to(torch.float64)
        err = float((u.T @ u - torch.eye(r, dtype=torch.float64, device=u.device)).abs().max())
        if err > tol:
            raise ValueError(f"{name}: expected orthonormal columns, max |U^T U - I| = {err:.2e}")
    return basis


def project_out_(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], *, check: bool = True) -> None:
    """``G <- G - (G U) U^T`` in place for every (out, in) gradient and its (in, rank) basis.

    Every argument is checked before anything is written: a NaN gradient, a basis of the wrong
    dimension or one that is not orthonormal (a cheap O(in * rank) probe when ``check``), or two
    gradients that share memory (the same tensor twice, overlapping views: it would project
    twice) raises and leaves all gradients unchanged. Non-contiguous gradients are projected
    through a copy. Not differentiable: gradients and bases that require grad are written and
    read through detached views (``forgetcore.ops.project_grad`` is the differentiable form).
    """
    grads, bases = _checks.tensor_list("grads", grads), _checks.tensor_list("bases", bases)
    check = _checks.flag("check", check)
    if len(grads) != len(bases):
        raise ValueError(f"bases: expected one basis per gradient ({len(grads)}), got {len(bases)}")
    if not grads:
        return
    device = _f32("grads[0]", grads[0], 2).device
    for i, (g, u) in enumerate(zip(grads, bases)):
        _f32(f"grads[{i}]", g, 2)
        _f32(f"bases[{i}]", u, 2)
        _same_device(f"grads[{i}]", g, device)
        _same_device(f"bases[{i}]", u, device)
        if u.shape[0] != g.shape[1]:
            raise ValueError(f"bases[{i}]: expected a basis of dimension {g.shape[1]} (the gradient's "
                             f"columns), got {_checks.describe(u)}")
        if u.shape[1] > u.shape[0]:
            raise ValueError(f"bases[{i}]: rank {u.shape[1]} exceeds the dimension {u.shape[0]}")
    _checks.disjoint("grads", grads, {"bases": bases})
    grads = [g.detach() for g in grads]  # writes through: same memory, outside autograd
    bases = [u.detach() for u in bases]
    if _backend.dispatch("subspace.project_out_", device) == _backend.RUST:
        # The kernel checks every gradient and basis before it writes any (all-or-nothing).
        work = [g if g.is_contiguous() else g.contiguous() for g in grads]
        _core.project_out_([_checks.numpy_view(g) for g in work],
                           [_checks.numpy_view(u.contiguous()) for u in bases], check)
        for g, w in zip(grads, work):
            if w is not g:
                g.copy_(w)
        return
    for i, g in enumerate(grads):
        _checks.finite(f"grads[{i}]", g)
    if check:
        for i, u in enumerate(bases):
            check_orthonormal(f"bases[{i}]", u)
    with torch.no_grad():
        reference.project_out_(grads, bases)


def project_out_flat_(g: torch.Tensor, vectors: torch.Tensor, *, check: bool = True) -> None:
    """``g <- g - V^T (V g)`` in place for a flat (n,) vector and orthonormal rows ``V`` (rank, n).

    Checked before writing (NaN, orthonormality when ``check``, ``g`` sharing memory with
    ``vectors``); inputs that require grad are used through detached views (not differentiable).
    """
    _f32("g", g, 1)
    _f32("vectors", vectors, 2)
    check = _checks.flag("check", check)
    _same_device("vectors", vectors, g.device)
    if vectors.shape[1] != g.shape[0]:
        raise ValueError(f"vectors: expected shape (*, {g.shape[0]}), got {_checks.describe(vectors)}")
    if g.numel() and vectors.shape[0] > g.shape[0]:
        raise ValueError(f"vectors: rank {vectors.shape[0]} exceeds the dimension {g.shape[0]}")
    _checks.disjoint("g", [g], {"vectors": [vectors]})
    g, vectors = g.detach(), vectors.detach()
    unsupported = None if g.is_contiguous() else f"g is not contiguous (stride {g.stride()})"
    if _backend.dispatch("subspace.project_out_flat_", g.device, unsupported=unsupported) == _backend.RUST:
        _core.project_out_flat_(_checks.numpy_view(g), _checks.numpy_view(vectors.contiguous()), check)
        return
    _checks.finite("g", g)
    _checks.finite("vectors", vectors)
    if check:
        check_orthonormal("vectors", vectors.T)
    with torch.no_grad():
        reference.project_out_flat_(g, vectors)


def orthonormalize(vectors: torch.Tensor, tol: float | None = None) -> tuple[torch.Tensor, list[int]]:
    """Gram-Schmidt applied twice over the rows of ``vectors`` (k, n), with global dot products.

    A row is dropped when its residual norm is at most ``tol`` times its original norm;
    ``tol`` defaults to GU's ``max(1e-8, 8 * eps_fp32)``. Returns the kept orthonormal rows
    (m, n) and their indices in ``vectors``.
    """
    _f32("vectors", vectors, 2)
    tol = max(1e-8, 8 * torch.finfo(torch.float32).eps) if tol is None else _checks.real("tol", tol, low=0.0)
    _checks.finite("vectors", vectors)
    if _backend.dispatch("subspace.orthonormalize", vectors.device) == _backend.RUST:
        out, kept = _core.orthonormalize(_checks.numpy_view(vectors.contiguous()), tol)
        return torch.from_numpy(out), list(kept)
    return reference.orthonormalize(vectors, tol)


def _check_criterion(criterion: str, count: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {CRITERIA}, got {criterion!r}")
    if count not in COUNTS:
        raise ValueError(f"count: expected one of {COUNTS}, got {count!r}")


def extend_bases(
    bases: Sequence[torch.Tensor],
    reps: Sequence[torch.Tensor],
    thresholds: float | Sequence[float],
    *,
    criterion: str = "energy",
    count: str = "official",
    ratios: Sequence[float | None] | None = None,
) -> list[torch.Tensor]:
    """``extend_basis`` for many layers in one call (Rust: parallel across layers).

    Returns new tensors; the inputs are never modified.
    """
    bases, reps = _checks.tensor_list("bases", bases), _checks.tensor_list("reps", reps)
    _check_criterion(criterion, count)
    if len(reps) != len(bases):
        raise ValueError(f"reps: expected one matrix per basis ({len(bases)}), got {len(reps)}")
    th = [thresholds] * len(bases) if isinstance(thresholds, (int, float)) else list(thresholds)
    if len(th) != len(bases):
        raise ValueError(f"threshold: expected one threshold per basis ({len(bases)}), got {len(th)}")
    th = [_checks.real("threshold", t, low=0.0, high=1.0, low_open=True) for t in th]
    rs = [None] * len(bases) if ratios is None else list(ratios)
    if len(rs) != len(bases):
        raise ValueError(f"ratios: expected one ratio per basis ({len(bases)}), got {len(rs)}")
    if criterion == "energy" and any(r is not None for r in rs):
        raise ValueError("ratios: only the 'norm_ratio' criterion takes a ratio")
    rs = [None if r is None else _checks.real("ratios", r, low=0.0, high=1.0 + 1e-6) for r in rs]
    if not bases:
        return []
    device = _f32("bases[0]", bases[0], 2).device
    for i, (u, a) in enumerate(zip(bases, reps)):
        _f32(f"bases[{i}]", u, 2)
        _f32(f"reps[{i}]", a, 2)
        _same_device(f"bases[{i}]", u, device)
        _same_device(f"reps[{i}]", a, device)
        if a.shape[0] != u.shape[0]:
            raise ValueError(f"reps[{i}]: expected {u.shape[0]} rows (the basis dimension), got {_checks.describe(a)}")
        check_orthonormal(f"bases[{i}]", u)
        _checks.finite(f"reps[{i}]", a)
    if _backend.dispatch("subspace.extend_bases", device) == _backend.RUST:
        out = _core.extend_bases([_checks.numpy_view(u.contiguous()) for u in bases],
                                 [_checks.numpy_view(a.contiguous()) for a in reps], th, criterion, count, rs)
        return [torch.from_numpy(o) for o in out]
    return [reference.extend_basis(u, a, t, criterion=criterion, count=count, ratio=r)
            for u, a, t, r in zip(bases, reps, th, rs)]


def extend_basis(
    basis: torch.Tensor | None,
    reps: torch.Tensor,
    threshold: float,
    *,
    criterion: str = "energy",
    count: str = "official",
    ratio: float | None = None,
) -> torch.Tensor:
    """Grow an orthonormal basis (dim, rank) from a representation matrix ``reps`` (dim, n).

    Removes the component of ``reps`` in span(basis), decomposes the residual and appends its
    leading left singular directions, chosen by

    - ``criterion="energy"`` (GPM, Saha et al. 2021, Alg. 1 / main_pmnist.py ``update_GPM``):
      on an empty basis ``count="official"`` keeps ``sum(cumsum(sigma^2)/||A||^2 < threshold)``
      directions, one short of reaching it as the official code does; ``count="reach"`` keeps the
      fewest that reach it. On a non-empty basis, directions are added while the captured energy
      ``(||A||^2 - ||R||^2 + sum sigma_j^2) / ||A||^2`` is below ``threshold`` (both counts);
    - ``criterion="norm_ratio"`` (FOT, Bakman et al. 2024, ``expand_orth_set``): with
      ``r = ratio`` (the clients' weighted mean) or ``||R|| / ||A||``, ``eps' = (r - (1 - threshold)) / r``
      and the fewest directions whose share of ``||R||^2`` exceeds eps', at least one.

    The new columns are re-orthonormalised against the old ones (the old columns are returned
    unchanged); a full basis stays full; numerically zero directions are never added.
    ``basis=None`` starts from an empty basis.
    """
    if basis is None:
        _f32("reps", reps, 2)
        basis = reps.new_zeros((reps.shape[0], 0))
    return extend_bases([basis], [reps], [threshold], criterion=criterion, count=count,
                        ratios=None if ratio is None else [ratio])[0]


class Subspace:
    """Per-layer orthonormal bases on the input side of each layer: name -> (dim, rank) float32.

    ``extend`` grows them from representation matrices; ``project_(grads)`` removes their span
    from (out, dim) gradients. Bases live on the CPU unless ``device`` says otherwise.
    """

    def __init__(self, bases: Mapping[str, torch.Tensor] | None = None, *, device: torch.device | str = "cpu"):
        self.device = _checks.device("device", device)
        self._bases: dict[str, torch.Tensor] = {}
        if bases is not None and not isinstance(bases, Mapping):
            raise TypeError(f"bases: expected a mapping name -> (dim, rank) tensor, got {type(bases).__name__}")
        for name, u in (bases or {}).items():
            self.set(name, u)

    def set(self, name: str, basis: torch.Tensor) -> None:
        """Set one layer's basis after a full orthonormality check (then reused without checks)."""
        if not isinstance(name, str):
            raise TypeError(f"name: expected a str, got {type(name).__name__}")
        check_orthonormal(f"bases[{name!r}]", basis)
        self._bases[name] = basis.detach().to(self.device).contiguous().clone()

    def __contains__(self, name: object) -> bool:
        return name in self._bases

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._bases[name]

    def names(self) -> list[str]:
        return list(self._bases)

    def ranks(self) -> dict[str, int]:
        return {k: int(u.shape[1]) for k, u in self._bases.items()}

    def dims(self) -> dict[str, int]:
        return {k: int(u.shape[0]) for k, u in self._bases.items()}

    def extend(
        self,
        reps: Mapping[str, torch.Tensor],
        threshold: float | Mapping[str, float],
        *,
        criterion: str = "energy",
        count: str = "official",
        ratios: Mapping[str, float] | None = None,
    ) -> dict[str, int]:
        """Extend each named layer's basis from its (dim, n) representation matrix.

        Layers not seen before start empty. Returns the number of directions added per layer;
        raises before changing anything.
        """
        if not isinstance(reps, Mapping):
            raise TypeError(f"reps: expected a mapping layer name -> (dim, n) tensor, got {type(reps).__name__}")
        names = list(reps)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"reps: expected str layer names, got {type(name).__name__} {name!r}")
            a = _f32(f"reps[{name!r}]", reps[name], 2)
            if name in self._bases and self._bases[name].shape[0] != a.shape[0]:
                raise ValueError(f"reps[{name!r}]: expected {self._bases[name].shape[0]} rows, "
                                 f"got {_checks.describe(a)}")
        old = [self._bases.get(n, torch.zeros((reps[n].shape[0], 0), device=self.device)) for n in names]
        if isinstance(threshold, Mapping):
            missing = [n for n in names if n not in threshold]
            if missing:
                raise ValueError(f"threshold: expected a threshold for every layer of reps, missing {missing[:3]}")
            th = [threshold[n] for n in names]
        else:
            th = [threshold] * len(names)
        rs = None if ratios is None else [ratios.get(n) for n in names]
        new = extend_bases(old, [reps[n].detach().to(self.device) for n in names], th,
                           criterion=criterion, count=count, ratios=rs)
        added = {}
        for n, u0, u in zip(names, old, new):
            self._bases[n] = u.to(self.device).contiguous()
            added[n] = int(u.shape[1] - u0.shape[1])
        log.info("subspace ranks after extension: %s", self.ranks())
        return added

    def project_(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Remove the span of each named basis from the (out, dim) gradient of the same name."""
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads: expected a mapping layer name -> (out, dim) tensor, got {type(grads).__name__}")
        names = [n for n in grads if n in self._bases and self._bases[n].shape[1] > 0]
        if names:
            project_out_([grads[n] for n in names], [self._bases[n] for n in names], check=False)

    def state_dict(self) -> dict[str, Any]:
        return {"bases": {k: u.detach().cpu().clone() for k, u in self._bases.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping, got {type(state).__name__}")
        bases = state.get("bases")
        if not isinstance(bases, Mapping):
            raise ValueError("state: expected a mapping with a 'bases' mapping")
        for name, u in bases.items():  # everything is checked before anything is replaced
            if not isinstance(name, str):
                raise TypeError(f"state['bases']: expected str layer names, got {type(name).__name__} {name!r}")
            check_orthonormal(f"state['bases'][{name!r}]", u)
        self._bases = {k: u.detach().to(self.device).contiguous().clone() for k, u in bases.items()}


def _layers(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Linear | nn.Conv2d]:
    found: dict[str, nn.Linear | nn.Conv2d] = {n: m for n, m in model.named_modules()
                                               if isinstance(m, (nn.Linear, nn.Conv2d))}
    if names is not None:
        names = list(names)
        missing = [n for n in names if n not in found]
        if missing:
            raise ValueError(f"layers: expected names of Linear/Conv2d modules of the model, got unknown {missing}")
        found = {n: found[n] for n in names}
    for n, m in found.items():
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"layers: grouped convolution {n!r} (groups={m.groups}) is not supported")
    return found


def unfold_input(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patches of a Conv2d input as columns: (in * kh * kw, N * L), with the layer's own kernel,
    stride, padding (and padding mode) and dilation, in the order of ``weight.view(out, -1)``."""
    if conv.padding_mode != "zeros" and any(conv._reversed_padding_repeated_twice):
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding: Any = 0
    else:
        padding = conv.padding
    if isinstance(padding, str):  # "same" / "valid"
        padding = 0 if padding == "valid" else tuple(
            d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
        if padding and any((d * (k - 1)) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
            raise ValueError("layers: padding='same' with an even kernel is not supported")
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return cols.permute(1, 0, 2).reshape(cols.shape[1], -1)


class GradientProjector:
    """Projects the weight gradients of a model's Linear and Conv2d layers against a ``Subspace``.

    The basis of a layer lives on its input side: Linear inputs, or Conv2d input patches
    unfolded with the layer's own kernel size, stride, padding and dilation (so a conv weight
    gradient (out, in, kh, kw) is projected as (out, in * kh * kw)). Biases are not projected
    (GPM and FOT use bias-free layers). Call ``project_()`` after ``backward`` and before the
    optimizer step; ``representations(x)`` collects the input matrices for ``Subspace.extend``.
    """

    def __init__(self, model: nn.Module, subspace: Subspace, *, layers: Iterable[str] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(subspace, Subspace):
            raise TypeError(f"subspace: expected a forgetcore.subspace.Subspace, got {type(subspace).__name__}")
        self.model = model
        self.subspace = subspace
        self.layers = _layers(model, layers)

    def input_dims(self) -> dict[str, int]:
        return {n: int(m.weight[0].numel()) for n, m in self.layers.items()}

    def weight_grads(self) -> dict[str, torch.Tensor]:
        """Each layer's weight gradient viewed as (out, in * kh * kw), sharing memory."""
        out = {}
        for n, m in self.layers.items():
            g = m.weight.grad
            if g is not None:
                out[n] = g.view(g.shape[0], -1) if g.is_contiguous() else g.reshape(g.shape[0], -1)
        return out

    def project_(self) -> None:
        """Project every layer's ``weight.grad`` in place (a layer without a basis is left alone)."""
        grads = self.weight_grads()
        names = [n for n in grads if n in self.subspace and self.subspace[n].shape[1] > 0]
        if not names:
            return
        views = [grads[n] for n in names]
        # Non-contiguous gradients were reshaped into copies: write the projection back.
        project_out_(views, [self.subspace[n].to(views[0].device) for n in names], check=False)
        for n, v in zip(names, views):
            w = self.layers[n].weight.grad
            if w is not None and v.data_ptr() != w.data_ptr():
                w.copy_(v.view_as(w))

    def project_tensors_(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Project per-layer weight-shaped tensors (e.g. a federated update) in place."""
        names = [n for n in tensors if n in self.subspace and self.subspace[n].shape[1] > 0]
        if names:
            views = [tensors[n].view(tensors[n].shape[0], -1) for n in names]
            project_out_(views, [self.subspace[n] for n in names], check=False)

    @torch.no_grad()
    def representations(self, x: torch.Tensor, *, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Input representation matrices (dim, n_columns) of every layer for the inputs ``x``.

        Runs the model in eval mode (restored afterwards) and records each layer's input:
        Linear inputs as columns, Conv2d inputs as unfolded patches. ``x`` must be finite, and so
        must what the model feeds its layers (a NaN there is an error naming ``model``): a basis
        grown from NaN representations would be NaN.
        """
        _checks.tensor("x", x)
        _checks.finite("x", x)
        batch_size = _checks.positive_int("batch_size", batch_size)
        cols: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}

        def hook(name: str, mod: nn.Module):
            def f(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: Any) -> None:
                z = inp[0].detach()
                if isinstance(mod, nn.Conv2d):
                    cols[name].append(unfold_input(mod, z).float())
                else:
                    cols[name].append(z.reshape(-1, z.shape[-1]).T.float())
            return f

        handles = [m.register_forward_hook(hook(n, m)) for n, m in self.layers.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(x), batch_size):
                try:
                    self.model(x[s:s + batch_size])
                except RuntimeError as e:  # a shape or dtype the model cannot take
                    raise ValueError(f"x: the model cannot run on x ({_checks.describe(x)}): {e}") from e
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        reps = {n: torch.cat(c, dim=1).contiguous() for n, c in cols.items() if c}
        for n, r in reps.items():
            if not bool(torch.isfinite(r).all()):
                raise ValueError(f"model: produced non-finite inputs to layer {n!r} from finite x "
                                 f"({int((~torch.isfinite(r)).sum())} NaN/inf of {r.numel()})")
        return reps
