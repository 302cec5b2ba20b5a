"""Torch integration: forgetcore's primitives inside your own training loop, and inside ``torch.compile``.

Custom ops (``torch.library.custom_op``, namespace ``forgetcore``), each with a fake
implementation so ``torch.compile(..., fullgraph=True)`` traces through them without a graph
break; each calls the public primitive of the same name, so it runs the Rust kernel on CPU, the
CUDA kernel on GPU and the torch reference elsewhere:

- ``torch.ops.forgetcore.project_out_(grads, bases, check)``: :func:`forgetcore.subspace.project_out_`
- ``torch.ops.forgetcore.project_out(grad, basis, check) -> Tensor``: the same, out of place, for
  one gradient of any shape (viewed as (rows, dim) like a Conv2d weight in GPM)
- ``torch.ops.forgetcore.accumulate_(acc, grads, scale, kind)``: :func:`forgetcore.importance.accumulate_`
  (``kind`` is its ``mode``)
- ``torch.ops.forgetcore.ssd_dampen_(params, imp_full, imp_forget, alpha, lam, validated) -> Tensor``:
  :func:`forgetcore.importance.ssd_dampen_`
- ``torch.ops.forgetcore.kv_accumulate_(scores, attn, alpha, group, renorm, valid)``:
  :func:`forgetcore.kvscore.accumulate_`

The functions below wrap them with the primitives' keyword arguments. The in-place ones run
under ``torch.no_grad()`` (they update parameters or statistics, not a graph) and detach what
they only read. They validate at run time, as the primitives do (compiled code included): a
bad argument raises the primitive's ``ValueError``/``TypeError`` naming it, before anything is
written. CUDA graphs: on CUDA, ``accumulate_`` and ``ssd_dampen_(..., validated=True)`` launch
forgetcore's kernels without a host synchronisation; ``kv_accumulate_``, the checked
``ssd_dampen_`` and the projections read a NaN check back to the host, so they cannot be
captured. Capture of the first two is not tested yet (the test suite has no GPU).

Gradient projection without the ``Trainer`` (GPM, Saha et al., "Gradient Projection Memory for
Continual Learning", ICLR 2021; GU's projection in the same form): ``g <- g - (g U) U^T`` for a
(rows, dim) gradient and an orthonormal (dim, rank) basis ``U``, offered two ways:

- :func:`project_grad` — an autograd function: identity forward, projected backward. Use it on a
  weight inside ``forward`` (``F.linear(x, project_grad(w, U))``): only that path's gradient is
  projected, and it composes with ``torch.compile``.
- :func:`register_projection_hooks` — tensor hooks on the weights of a module's Linear/Conv2d
  layers, looking the basis up in a :class:`~forgetcore.subspace.Subspace` (or a dict) at every
  backward, so a basis that grows between tasks is used at once. ``handle.remove()`` undoes it.

Both project the gradient as ``backward`` produces it, so ``weight.grad`` is already projected
before the optimizer step (weight decay added by the optimizer afterwards is not projected,
as with ``GradientProjector.project_()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import _checks, importance, kvscore, subspace

__all__ = [
    "project_out_", "project_out", "accumulate_", "ssd_dampen_", "kv_accumulate_",
    "project_grad", "register_projection_hooks", "ProjectionHooks",
]


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> int:
    # GPM's view of a weight: (out, in * kh * kw); a vector is one row
    return int(t.shape[0]) if t.dim() >= 2 else 1


@torch.library.custom_op("forgetcore::project_out_", mutates_args=("grads",))
def _project_out_op(grads: list[torch.Tensor], bases: list[torch.Tensor], check: bool) -> None:
    subspace.project_out_(grads, bases, check=check)


@_project_out_op.register_fake
def _(grads: list[torch.Tensor], bases: list[torch.Tensor], check: bool) -> None:
    return None


@torch.library.custom_op("forgetcore::project_out", mutates_args=())
def _project_out_functional_op(grad: torch.Tensor, basis: torch.Tensor, check: bool) -> torch.Tensor:
    out = grad.detach().reshape(_rows(grad), -1).clone(memory_format=torch.contiguous_format)
    subspace.project_out_([out], [basis], check=check)
    return out.view(grad.shape)


@_project_out_functional_op.register_fake
def _(grad: torch.Tensor, basis: torch.Tensor, check: bool) -> torch.Tensor:
    return grad.new_empty(grad.shape)


@torch.library.custom_op("forgetcore::accumulate_", mutates_args=("acc",))
def _accumulate_op(acc: list[torch.Tensor], grads: list[torch.Tensor], scale: float, kind: str) -> None:
    # `kind` is the primitive's `mode`: torch's op tracing reserves the keyword `mode`
    importance.accumulate_(acc, grads, scale, kind)


@_accumulate_op.register_fake
def _(acc: list[torch.Tensor], grads: list[torch.Tensor], scale: float, kind: str) -> None:
    return None


@torch.library.custom_op("forgetcore::ssd_dampen_", mutates_args=("params",))
def _ssd_dampen_op(params: list[torch.Tensor], imp_full: list[torch.Tensor], imp_forget: list[torch.Tensor],
                   alpha: float, lam: float, validated: bool) -> torch.Tensor:
    counts = importance.ssd_dampen_(params, imp_full, imp_forget, alpha, lam, validated=validated)
    return counts.to(params[0].device) if params else counts


@_ssd_dampen_op.register_fake
def _(params: list[torch.Tensor], imp_full: list[torch.Tensor], imp_forget: list[torch.Tensor],
      alpha: float, lam: float, validated: bool) -> torch.Tensor:
    device = params[0].device if params else torch.device("cpu")
    return torch.empty(len(params), dtype=torch.int64, device=device)


@torch.library.custom_op("forgetcore::kv_accumulate_", mutates_args=("scores",))
def _kv_accumulate_op(scores: torch.Tensor, attn: torch.Tensor, alpha: float, group: int, renorm: bool,
                      valid: torch.Tensor | None) -> None:
    kvscore.accumulate_(scores, attn, alpha, group, renorm=renorm, valid=valid)


@_kv_accumulate_op.register_fake
def _(scores: torch.Tensor, attn: torch.Tensor, alpha: float, group: int, renorm: bool,
      valid: torch.Tensor | None) -> None:
    return None


def _detached(ts: Iterable[torch.Tensor | None]) -> list[Any]:
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in ts]


def _tensors(name: str, v: Any) -> list[torch.Tensor]:
    """A list of tensors for an op's ``Tensor[]`` argument: anything else is a TypeError naming
    ``name`` here, not torch's schema ``RuntimeError`` (which names the op, not the argument)."""
    out = _checks.tensor_list(name, v)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {_checks.describe(t)}")
    return out


def _one_device(**lists: list[torch.Tensor]) -> None:
    """Every tensor on one device, checked before the op dispatches: torch sends a call with any
    meta tensor to the op's fake implementation, which checks nothing."""
    first = next((t.device for ts in lists.values() for t in ts), None)
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if t.device != first:
                raise ValueError(f"{name}[{i}]: expected every tensor on {first}, got {_checks.describe(t)}")


def project_out_(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], *, check: bool = True) -> None:
    """``G <- G - (G U) U^T`` in place for (out, in) gradients and (in, rank) bases, as a torch op."""
    grads, bases, check = _tensors("grads", grads), _tensors("bases", bases), _checks.flag("check", check)
    _one_device(grads=grads, bases=bases)
    with torch.no_grad():
        torch.ops.forgetcore.project_out_(grads, _detached(bases), check)


def project_out(grad: torch.Tensor, basis: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """A new tensor ``g - (g U) U^T``, ``g`` being ``grad`` viewed as (rows, dim); same shape as ``grad``."""
    _checks.tensor("grad", grad)
    _checks.tensor("basis", basis)
    if grad.device != basis.device:
        raise ValueError(f"basis: expected a tensor on {grad.device}, got {_checks.describe(basis)}")
    return torch.ops.forgetcore.project_out(grad.detach(), basis.detach(), _checks.flag("check", check))


def accumulate_(acc: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float = 1.0,
                mode: str = "sq") -> None:
    """``acc[t] += scale * g[t]**2`` (or ``|g[t]|`` for ``mode="abs"``) over lists of tensors, as a torch op.

    Unlike :func:`forgetcore.importance.accumulate_`, ``grads`` cannot hold ``None`` (the op's
    schema takes ``Tensor[]``): leave such pairs out of both lists.
    """
    acc, grads = _tensors("acc", acc), _tensors("grads", grads)
    _one_device(acc=acc, grads=grads)
    scale = _checks.real("scale", scale)
    if not isinstance(mode, str):
        raise TypeError(f"mode: expected a str, got {type(mode).__name__}")
    with torch.no_grad():
        torch.ops.forgetcore.accumulate_(acc, _detached(grads), scale, mode)


def ssd_dampen_(params: Sequence[torch.Tensor], imp_full: Sequence[torch.Tensor], imp_forget: Sequence[torch.Tensor],
                alpha: float, lam: float = 1.0, *, validated: bool = False) -> torch.Tensor:
    """SSD's dampening over lists of parameters and importances, as a torch op; returns the counts."""
    params, imp_full, imp_forget = _tensors("params", params), _tensors("imp_full", imp_full), \
        _tensors("imp_forget", imp_forget)
    alpha, lam = _checks.real("alpha", alpha, low=0.0), _checks.real("lam", lam, low=0.0)
    _one_device(params=params, imp_full=imp_full, imp_forget=imp_forget)
    with torch.no_grad():
        return torch.ops.forgetcore.ssd_dampen_(params, _detached(imp_full), _detached(imp_forget),
                                                alpha, lam, _checks.flag("validated", validated))


def kv_accumulate_(scores: torch.Tensor, attn: torch.Tensor, alpha: float, group: int = 1, *,
                   renorm: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Forgetting-factor score accumulation (A2SF/H2O) into ``scores`` in place, as a torch op; returns it."""
    with torch.no_grad():
        torch.ops.forgetcore.kv_accumulate_(scores, attn.detach(), float(alpha), int(group), bool(renorm),
                                            None if valid is None else valid.detach())
    return scores


# ---------------------------------------------------------------------------------------------
# gradient projection without the Trainer
# ---------------------------------------------------------------------------------------------


def _check_pair(name: str, x: torch.Tensor, basis: torch.Tensor) -> None:
    # metadata only (no data-dependent check), so torch.compile traces it without a break;
    # orthonormality and NaN are checked by the primitive when the gradient arrives
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(basis, torch.Tensor):
        raise TypeError(f"basis: expected a torch.Tensor, got {type(basis).__name__}")
    if x.dtype != torch.float32 or basis.dtype != torch.float32:
        raise TypeError(f"{name}: expected float32 tensor and basis, got {x.dtype} and {basis.dtype}")
    if basis.dim() != 2:
        raise ValueError(f"basis: expected a 2-D (dim, rank) tensor, got shape {tuple(basis.shape)}")
    if basis.device != x.device:
        raise ValueError(f"basis: expected a tensor on {x.device}, got one on {basis.device}")
    if x.dim() == 0:
        raise ValueError(f"{name}: expected a vector or a weight, got a 0-D tensor")
    dim = math.prod(x.shape[1:]) if x.dim() >= 2 else int(x.shape[0])
    if basis.shape[0] != dim:
        raise ValueError(f"basis: expected {dim} rows ({name} {tuple(x.shape)} viewed as ({_rows(x)}, {dim})), "
                         f"got shape {tuple(basis.shape)}")


class _ProjectGrad(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, basis: torch.Tensor, check: bool) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.check = inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (basis,) = ctx.saved_tensors
        return torch.ops.forgetcore.project_out(grad, basis, ctx.check), None, None


def project_grad(x: torch.Tensor, basis: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """``x`` unchanged in the forward pass; its gradient ``g`` becomes ``g - (g U) U^T`` in the backward.

    ``x``: a float32 weight (out, in) or (out, in, kh, kw) (viewed as (out, in * kh * kw)), or a
    vector (one row); ``basis``: float32 (dim, rank) with orthonormal columns, on ``x``'s device
    (not differentiated). ``check`` probes orthonormality cheaply at every backward; check a
    basis fully once with :func:`forgetcore.subspace.check_orthonormal`.
    """
    _check_pair("x", x, basis)
    return _ProjectGrad.apply(x, basis.detach(), bool(check))


BasesLike = subspace.Subspace | Mapping[str, torch.Tensor]


class ProjectionHooks:
    """Handles of :func:`register_projection_hooks`; ``remove()`` takes every hook off."""

    def __init__(self, handles: list[Any], layers: list[str]):
        self._handles = handles
        self.layers = layers

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ProjectionHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_projection_hooks(module: nn.Module, bases: BasesLike, *, layers: Iterable[str] | None = None,
                              check: bool = True) -> ProjectionHooks:
    """Project the weight gradient of each Linear/Conv2d layer of ``module`` against its basis.

    ``bases``: a :class:`~forgetcore.subspace.Subspace` or a dict, keyed by layer name as in
    ``module.named_modules()``, each (in * kh * kw, rank) orthonormal; read at every backward,
    so a layer without a basis (yet), or with rank 0, is left alone. ``layers``: which layers
    (default: every Linear and Conv2d). Biases are not projected (GPM's layers have none).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(bases, (subspace.Subspace, Mapping)):
        raise TypeError(f"bases: expected a forgetcore.subspace.Subspace or a dict, got {type(bases).__name__}")
    found = {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    names = list(found) if layers is None else list(layers)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"layers: expected names of Linear/Conv2d modules, got unknown {unknown[:3]}")
    for n in names:
        m = found[n]
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"layers: grouped convolution {n!r} (groups={m.groups}) is not supported")
        if m.weight.dtype != torch.float32:
            raise TypeError(f"module: layer {n!r} has a {m.weight.dtype} weight; projection needs float32")

    def hook(name: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def project(g: torch.Tensor) -> torch.Tensor | None:
            u = bases[name] if name in bases else None
            if u is None or u.shape[1] == 0:
                return None
            return project_out(g, u.to(g.device), check=check)
        return project

    handles = [found[n].weight.register_hook(hook(n)) for n in names]
    return ProjectionHooks(handles, names)
