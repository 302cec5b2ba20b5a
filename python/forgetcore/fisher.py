"""Diagonal Fisher information of a model over a dataset: :func:`fisher_diagonal`.

Three estimates (``mode=``): the official SSD / Avalanche batch estimate, the exact empirical
Fisher and the Monte-Carlo true Fisher; correct under ``torch.distributed``. The exact estimates
never form a per-sample gradient where a layer allows a contraction: ``nn.Linear`` layers
contract squared inputs with squared output gradients, convolutions contract unfolded inputs
with output gradients per sample (the per-sample weight gradient of a convolution is a product
of two small matrices; BackPACK's SumGradSquared does the same). Everything else gets
per-sample gradients from ``torch.func`` in chunks.

``forgetcore.importance`` re-exports every public name of this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from . import _checks

__all__ = ["fisher_diagonal", "cross_entropy", "output_norm_loss", "MODES"]

log = logging.getLogger(__name__)

MODES = ("batch", "empirical", "mc")

# Elements of one unfolded input chunk of a convolution (1 MiB of float32): small enough that
# the unfold writes into cache and the batched product reads it back from there (on the MNIST
# CNN's layers this ran 1.3-1.8x faster than unfolding a whole batch of 256 at once), and it
# bounds the memory of the contraction path whatever the batch size.
UNFOLD_BUDGET = 1 << 18


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (the default loss of :func:`fisher_diagonal`)."""
    return F.cross_entropy(output, target, reduction="none")


def output_norm_loss(output: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample squared l2 norm of the output, ``||f(x)||_2^2``: LF-SSD's label-free loss."""
    return output.float().pow(2).flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------
# Fisher diagonal
# ---------------------------------------------------------------------------------------------


def _loader(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            n = None
        if n == 0:
            raise ValueError("data: expected a non-empty dataset, got 0 examples")
        # Unshuffled, last partial batch kept: the batch estimate depends on both.
        if isinstance(data, TensorDataset):
            # Same batches as the DataLoader, by slicing instead of per-example collation.
            return [tuple(t[s:s + batch_size] for t in data.tensors) for s in range(0, n or 0, batch_size)]
        return DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=False)
    if isinstance(data, (DataLoader, Iterable)):
        return data
    raise TypeError(f"data: expected a Dataset or an iterable of (x, y) batches, got {type(data).__name__}")


def _split(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        x = batch[0].to(device)
        y = batch[1].to(device) if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        # Read-only checks before the batch is used: NaN/inf inputs or targets would give a NaN Fisher.
        for what, t in (("inputs", x), ("targets", y)):
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"data: {what} must be finite, got NaN or inf in a batch of {_checks.describe(t)}")
        return x, y
    raise TypeError(f"data: expected batches of (x, y) tensors, got {type(batch).__name__}")


def _check_labels(y: torch.Tensor | None, n: int, classes: int | None) -> None:
    """The default cross-entropy's targets: class indices in [0, classes), one per input (or, as
    ``F.cross_entropy`` also takes, class probabilities of shape (n, classes))."""
    if y is None or classes is None:
        return
    if y.is_floating_point():
        if y.shape != (n, classes):
            raise ValueError(f"data: expected integer labels (targets) of shape ({n},) or class probabilities of "
                             f"shape ({n}, {classes}), got {_checks.describe(y)}")
        return
    if y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"data: labels (targets) for the default cross-entropy must be integer class "
                        f"indices, got {_checks.describe(y)}")
    if y.shape != (n,):
        raise ValueError(f"data: expected labels (targets) of shape ({n},), got {_checks.describe(y)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"data: labels (targets) must lie in [0, {classes}) (the model's {classes} outputs), "
                         f"got values in [{int(y.min())}, {int(y.max())}]")


def _loss(loss_fn, out: torch.Tensor, y: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per-sample losses, checked; an out-of-range index inside a custom loss names ``data``."""
    if loss_fn is cross_entropy:
        _check_labels(y, n, out.shape[1] if out.dim() >= 2 else None)
    try:
        loss = loss_fn(out, y)
    except IndexError as e:
        raise ValueError(f"data: loss_fn failed on the labels (targets), out of range for the model's "
                         f"output {_checks.describe(out)}: {e}") from e
    return _per_sample("loss_fn", loss, n)


def _dist_world(distributed: bool | None) -> int:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = on and dist.get_world_size() > 1
    if distributed and not on:
        raise ValueError("distributed: True needs an initialised torch.distributed process group")
    return dist.get_world_size() if distributed else 1


def _per_sample(name: str, loss: torch.Tensor, n: int) -> torch.Tensor:
    if loss.dim() != 1 or loss.shape[0] != n:
        raise ValueError(f"loss_fn: expected per-sample losses of shape ({n},) (use reduction='none'), "
                         f"got {_checks.describe(loss)}")
    return loss


def fisher_diagonal(
    model: nn.Module,
    data: Dataset | Iterable[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    mode: str = "batch",
    *,
    batch_size: int = 64,
    chunk_size: int = 32,
    accumulate: str = "sq",
    seed: int = 0,
    distributed: bool | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of ``model`` over ``data``: name -> float32 tensor like each parameter.

    ``data``: a ``Dataset`` of ``(x, y)`` (batched here with ``batch_size``, unshuffled, last
    partial batch kept) or any iterable of ``(x, y)`` batches (used as given). Batches move to
    the model's device. ``loss_fn(output, target)`` returns per-sample losses (default:
    cross-entropy); the model's train/eval mode is left as it is (use ``eval()`` for a
    deterministic Fisher, as SSD does). Only parameters with ``requires_grad`` are included.

    Modes:

    - ``"batch"``: mean over batches of the squared gradient of each batch's mean loss. This is
      what the official SSD code (``calc_importance``) and Avalanche's EWC compute; it depends on
      batch size and order. ``accumulate="abs"`` sums ``|g|`` instead (LF-SSD).
    - ``"empirical"``: the exact ``F = (1/N) sum_n (grad l_n)**2``. No per-sample gradient is
      formed for layers called once per forward whose gradient is a contraction: ``nn.Linear``
      contracts squared inputs with squared output gradients (``sum_n (g_n**2)^T x_n**2``);
      ``nn.Conv1d``/``nn.Conv2d`` (one group, zero padding) square the per-sample products of
      output gradients and unfolded inputs (BackPACK's SumGradSquared does both the same way).
      Over sequences (Linear input with more than two dims) the per-sample gradient sums over
      positions, so it is formed for ``chunk_size`` samples at a time; every other parameter
      (grouped convolutions, norms, embeddings, custom layers) gets per-sample gradients from
      ``torch.func`` in chunks of ``chunk_size``. Memory stays bounded by one batch and one
      chunk whatever the dataset size.
    - ``"mc"``: the true Fisher, one label per input drawn (with ``seed``) from the model's own
      softmax, then as ``"empirical"``.

    Under ``torch.distributed`` (``distributed=None`` detects an initialised group with more
    than one rank) every rank passes its own data; the result is all-reduced so that every rank
    holds the single-process value on the union of the data. In batch mode global batch ``b`` is
    the union of the ranks' batches ``b`` (a rank that runs out contributes nothing).

    Bad input (read-only checks; the model is never modified): NaN/inf inputs or float targets,
    and labels outside ``[0, classes)`` for the default cross-entropy (or an ``IndexError`` from
    a custom ``loss_fn``), raise ``ValueError`` naming ``data``; NaN/inf parameters or buffers,
    and gradients or a result that are not finite on finite data, raise ``ValueError`` naming
    ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if accumulate not in ("sq", "abs"):
        raise ValueError(f"accumulate: expected 'sq' or 'abs', got {accumulate!r}")
    if accumulate == "abs" and mode != "batch":
        raise ValueError(f"accumulate: 'abs' is defined for mode='batch' (LF-SSD), got mode={mode!r}")
    batch_size = _checks.positive_int("batch_size", batch_size)
    chunk_size = _checks.positive_int("chunk_size", chunk_size)
    seed = _checks.seed(seed)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (output, target) -> per-sample losses, got "
                        f"{type(loss_fn).__name__}")
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed: expected True, False or None, got {type(distributed).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: has no parameter with requires_grad=True")
    if any(type(p).__name__ == "DTensor" for _, p in named):  # FSDP: would be silently wrong here
        raise ValueError("model: its parameters are sharded (FSDP fully_shard / DTensor), which this function "
                         "does not reduce; use forgetcore.distributed.fsdp_fisher_diagonal (batch mode; the "
                         "per-sample modes bypass FSDP's unshard hooks and are not offered under FSDP)")
    loss_fn = cross_entropy if loss_fn is None else loss_fn
    # NaN/inf weights would give a NaN Fisher: refuse them before any work (read-only).
    for name, t in [*named, *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"model: {name} must be finite, got NaN or inf in {_checks.describe(t)}")
    device = named[0][1].device
    world = _dist_world(distributed)
    loader = _loader(data, batch_size)
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in named}
    if mode == "batch":
        count = _batch_fisher(model, named, acc, loader, loss_fn, accumulate, device, world, progress)
    else:
        count = _sample_fisher(model, named, acc, loader, loss_fn, mode, chunk_size, seed, device,
                               world, progress)
    if count == 0:
        raise ValueError("data: expected a non-empty dataset, got no batches")
    for name, a in acc.items():
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"model: the Fisher of {name} is not finite: the loss or its gradients overflow "
                             f"or are NaN on finite data")
    for a in acc.values():
        a.div_(count)
    return acc


def _batch_fisher(model, named, acc, loader, loss_fn, accumulate, device, world, progress) -> int:
    from . import importance  # imported here: importance re-exports this module's names

    params = [p for _, p in named]
    accs = [acc[n] for n, _ in named]
    if world == 1:
        nb = 0
        for batch in tqdm(loader, desc="fisher (batch)", disable=not progress, leave=False):
            x, y = _split(batch, device)
            loss = _loss(loss_fn, model(x), y, x.shape[0]).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            _finite_grads(grads)
            importance.accumulate_(accs, list(grads), 1.0, accumulate, validated=True)
            nb += 1
        return nb
    import torch.distributed as dist

    # Global batch b = union of the ranks' batches b: all-reduce the summed gradient and the
    # count, then square. Every rank steps as often as the rank with the most batches.
    batches = list(loader) if not hasattr(loader, "__len__") else loader
    steps = torch.tensor([len(batches)], dtype=torch.int64, device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    it = iter(batches)
    sizes = [p.numel() for p in params]
    for _ in tqdm(range(int(steps)), desc="fisher (batch)", disable=not progress, leave=False):
        flat = torch.zeros(sum(sizes) + 1, dtype=torch.float32, device=device)
        batch = next(it, None)
        if batch is not None:
            x, y = _split(batch, device)
            loss = _loss(loss_fn, model(x), y, x.shape[0]).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            _finite_grads(grads)
            off = 0
            for g, s in zip(grads, sizes):
                if g is not None:
                    flat[off:off + s] = g.reshape(-1).float()
                off += s
            flat[-1] = x.shape[0]
        dist.all_reduce(flat)
        n = flat[-1]
        if n > 0:
            gs = list((flat[:-1] / n).split(sizes))
            importance.accumulate_(accs, [g.view(p.shape) for g, p in zip(gs, params)], 1.0, accumulate)
    return int(steps)


def _finite_grads(grads) -> None:
    """Gradients of a finite batch that are NaN/inf come from the model (they would poison the sum)."""
    for g in grads:
        if g is not None and not bool(torch.isfinite(g).all()):
            raise ValueError("model: its loss gradients are not finite (NaN or inf) on finite data; "
                             "the Fisher would be NaN")


def _contractible(m: nn.Module, inp: torch.Tensor) -> bool:
    """Whether ``m``'s per-sample gradient is a contraction of its input and output gradient."""
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        # F.unfold covers zero padding given as numbers, stride, dilation; one group only.
        return (m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                and inp.dim() == m.weight.dim())
    return False


def _classify(model: nn.Module, named, x: torch.Tensor) -> tuple[set[nn.Module], int | None]:
    """Linear and convolution modules that can take the contraction path (called once per forward),
    and the number of classes of the model's output (its second dimension) when it has one."""
    calls: dict[nn.Module, int] = {}
    ok: dict[nn.Module, bool] = {}

    def seen(m: nn.Module, i: tuple[torch.Tensor, ...], o: torch.Tensor) -> None:
        calls[m] = calls.get(m, 0) + 1
        ok[m] = ok.get(m, True) and len(i) >= 1 and isinstance(i[0], torch.Tensor) and _contractible(m, i[0])

    hooks = [m.register_forward_hook(seen) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    ids = {id(p) for _, p in named}
    fast = set()
    for m, c in calls.items():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if c == 1 and ok[m] and own and all(id(p) in ids for p in own):
            fast.add(m)
    classes = out.shape[1] if isinstance(out, torch.Tensor) and out.dim() >= 2 else None
    return fast, classes


def _sample_fisher(model, named, acc, loader, loss_fn, mode, chunk_size, seed, device, world, progress) -> int:
    from torch.func import functional_call, grad, vmap

    fast: set[nn.Module] | None = None
    classes: int | None = None
    generic: dict[str, torch.Tensor] = {}
    gen = torch.Generator(device=device)
    rank = 0
    if world > 1:
        import torch.distributed as dist

        rank = dist.get_rank()
    gen.manual_seed((seed * 1000003 + rank) % 2**64)
    total = 0
    for batch in tqdm(loader, desc=f"fisher ({mode})", disable=not progress, leave=False):
        x, y = _split(batch, device)
        n = x.shape[0]
        if n == 0:
            continue
        if fast is None:
            fast, classes = _classify(model, named, x[:2])
            fast_ids = {id(p) for m in fast for p in m.parameters(recurse=False)}
            generic = {name: p for name, p in named if id(p) not in fast_ids}
            names_of = {id(p): name for name, p in named}
        if mode == "mc":
            with torch.no_grad():
                logits = model(x)
            if logits.dim() != 2:
                raise ValueError(f"model: mode='mc' samples one class per input from (N, classes) logits, "
                                 f"got output {_checks.describe(logits)}")
            if not bool(torch.isfinite(logits).all()):
                raise ValueError("model: its outputs (logits) are not finite on finite data; mode='mc' cannot "
                                 "sample labels from them")
            y = torch.multinomial(F.softmax(logits.float(), dim=1), 1, generator=gen).flatten()
        elif y is None:
            y = torch.zeros(n, dtype=torch.long, device=device)  # label-free losses ignore it
        if fast:
            _fast_pass(model, fast, names_of, acc, x, y, loss_fn, chunk_size)
        if generic:
            def one(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
                out = functional_call(model, params, (xi.unsqueeze(0),), strict=False)
                return loss_fn(out, yi.unsqueeze(0)).sum()

            per = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")
            detached = {k: v.detach() for k, v in generic.items()}
            if loss_fn is cross_entropy:
                _check_labels(y, n, classes)
            for s in range(0, n, chunk_size):
                try:
                    gs = per(detached, x[s:s + chunk_size], y[s:s + chunk_size])
                except IndexError as e:
                    raise ValueError(f"data: loss_fn failed on the labels (targets): {e}") from e
                for k, g in gs.items():
                    acc[k].add_(g.float().pow(2).sum(0))
        total += n
    if world > 1:
        import torch.distributed as dist

        names = list(acc)
        flat = torch.cat([acc[k].reshape(-1) for k in names] + [torch.tensor([float(total)], device=device)])
        dist.all_reduce(flat)
        total = round(float(flat[-1]))
        for k, v in zip(names, flat[:-1].split([acc[k].numel() for k in names])):
            acc[k].copy_(v.view(acc[k].shape))
    return total


def _fast_pass(model, fast, names_of, acc, x, y, loss_fn, chunk_size) -> None:
    """One forward/backward; each fast module contracts its saved input with its output gradient."""
    saved: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        saved[m] = (inp[0].detach(), out)
        # Hand the rest of the network a copy so an in-place op downstream (ReLU(inplace=True))
        # cannot change the tensor whose gradient we ask for.
        return out.clone()

    hooks = [m.register_forward_hook(hook) for m in fast]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    loss = _loss(loss_fn, out, y, x.shape[0]).sum()
    mods = list(saved)
    gouts = torch.autograd.grad(loss, [saved[m][1] for m in mods], allow_unused=True)
    for m, g in zip(mods, gouts):
        if g is None:
            continue
        xin, g = saved[m][0].float(), g.float()
        if isinstance(m, nn.Linear):
            _linear(m, names_of, acc, xin, g, chunk_size)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            _conv(m, names_of, acc, xin, g)


def _linear(m: nn.Linear, names_of, acc, xin: torch.Tensor, g: torch.Tensor, chunk_size: int) -> None:
    w, b = m.weight, m.bias
    if xin.dim() == 2:
        g2 = g * g
        if w.requires_grad:
            acc[names_of[id(w)]].add_(g2.t() @ (xin * xin))
        if b is not None and b.requires_grad:
            acc[names_of[id(b)]].add_(g2.sum(0))
        return
    # Sequences: the per-sample gradient sums over positions before it is squared.
    xs, gs = xin.flatten(1, -2), g.flatten(1, -2)
    for s in range(0, xs.shape[0], chunk_size):
        xc, gc = xs[s:s + chunk_size], gs[s:s + chunk_size]
        if w.requires_grad:
            acc[names_of[id(w)]].add_(torch.einsum("nso,nsi->noi", gc, xc).pow_(2).sum(0))
        if b is not None and b.requires_grad:
            acc[names_of[id(b)]].add_(gc.sum(1).pow_(2).sum(0))


def _unfold(x: torch.Tensor, ks, dil, pad, st) -> torch.Tensor:
    """Unfolded input of a 2-D convolution, (n, c * kh * kw, positions), like ``F.unfold``.

    Built as one strided view and one copy, which runs 1.4-1.8x faster than ``F.unfold``'s
    im2col on the CPU (measured on the MNIST CNN's layers).
    """
    if pad[0] or pad[1]:
        x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    x = x.contiguous()
    n, c, h, w = x.shape
    ho = (h - dil[0] * (ks[0] - 1) - 1) // st[0] + 1
    wo = (w - dil[1] * (ks[1] - 1) - 1) // st[1] + 1
    sn, sc, sh, sw = x.stride()
    view = x.as_strided((n, c, ks[0], ks[1], ho, wo), (sn, sc, sh * dil[0], sw * dil[1], sh * st[0], sw * st[1]))
    return view.reshape(n, c * ks[0] * ks[1], ho * wo)


def _conv(m: nn.Conv1d | nn.Conv2d, names_of, acc, xin: torch.Tensor, g: torch.Tensor) -> None:
    """Per-sample gradients of a convolution, ``G_n U_n^T``, squared and summed over samples.

    ``U_n`` (in_channels * kernel, positions) is sample n's unfolded input and ``G_n``
    (out_channels, positions) its output gradient; the bias gradient is ``G_n`` summed over
    positions. Samples go in chunks whose unfolded input stays under ``UNFOLD_BUDGET`` elements.
    """
    w, b = m.weight, m.bias
    # _contractible admitted numeric padding only: every geometry entry is an int here.
    ks, dil, pad, st = (tuple(int(v) for v in t) for t in (m.kernel_size, m.dilation, m.padding, m.stride))
    if isinstance(m, nn.Conv1d):  # a 1-D convolution is a 2-D one of height 1
        xin = xin.unsqueeze(2)
        ks, dil, pad, st = (1, *ks), (1, *dil), (0, *pad), (1, *st)
    n, o = g.shape[0], g.shape[1]
    g = g.reshape(n, o, -1)
    k = w[0].numel()
    rows = max(1, UNFOLD_BUDGET // max(1, k * g.shape[2]))
    for s in range(0, n, rows):
        gc = g[s:s + rows]
        if w.requires_grad:
            u = _unfold(xin[s:s + rows], ks, dil, pad, st)
            acc[names_of[id(w)]].add_(torch.bmm(gc, u.transpose(1, 2)).pow_(2).sum(0).view(w.shape))
        if b is not None and b.requires_grad:
            acc[names_of[id(b)]].add_(gc.sum(2).pow_(2).sum(0))
