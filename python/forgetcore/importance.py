"""Importance family: diagonal Fisher estimates and fused multi-tensor updates.

- :func:`accumulate_`: ``acc += scale * g**2`` (or ``scale * |g|``) over a whole list of tensors in
  one call.
- :func:`ssd_dampen_`: Selective Synaptic Dampening's parameter update over a whole model in one
  call; returns how many elements it dampened per tensor.
- :func:`fisher_diagonal`: the diagonal Fisher of a model over a dataset, in three modes
  (``"batch"``: the official SSD / Avalanche estimate; ``"empirical"``: the exact per-sample
  estimate; ``"mc"``: the true Fisher with labels sampled from the model), correct under
  ``torch.distributed``.

CPU tensors run the Rust kernels (multi-threaded, GIL released), CUDA tensors the fused
NVRTC kernels of ``cuda/importance.cu`` (one launch per call, on torch's current stream), other
devices the torch formulation in :mod:`forgetcore.reference`; all give bit-identical float32
results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from . import _backend, _checks, _core, _cuda, reference

__all__ = ["accumulate_", "ssd_dampen_", "fisher_diagonal", "cross_entropy", "output_norm_loss", "MODES"]

log = logging.getLogger(__name__)

MODES = ("batch", "empirical", "mc")

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
            raise ValueError(f"{arg}: names do not match the parameters (missing {missing[:3]}, unexpected {extra[:3]})")
        out = [imps[n] for n in names]
    else:
        if isinstance(imps, Mapping):
            raise TypeError(f"{arg}: got a dict but the parameters are unnamed; pass a list in parameter order")
        if isinstance(imps, torch.Tensor):
            raise TypeError(f"{arg}: expected a list or dict of tensors, got a single tensor {_checks.describe(imps)}")
        out = list(imps)
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


def _check_disjoint(arg: str, written: list[torch.Tensor], read: list[torch.Tensor]) -> None:
    """Refuse written tensors that share memory with each other or with what is read.

    The kernels write chunks of every tensor in parallel: an alias would be a data race.
    """
    spans = []
    for kind, ts in (("w", written), ("r", read)):
        for i, t in enumerate(ts):
            if t.numel():
                start = t.data_ptr()
                spans.append((start, start + t.numel() * t.element_size(), kind, i))
    spans.sort()
    end, owner = -1, None
    for s, e, kind, i in spans:
        if owner is not None and s < end and "w" in (kind, owner[0]):
            a, b = sorted([owner, (kind, i)])
            raise ValueError(f"{arg}: tensor {b[1] if b[0] == 'w' else a[1]} shares memory with "
                             f"{'another tensor of the list' if a[0] == b[0] else 'an importance/gradient tensor'}")
        if e > end:
            end, owner = e, (kind, i)


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


def accumulate_(acc: ImpLike | ParamsLike, grads: ImpLike, scale: float = 1.0, mode: str = "sq") -> None:
    """``acc[t] += scale * g[t]**2`` (``mode="sq"``) or ``scale * |g[t]|`` (``"abs"``) for every tensor.

    ``acc``: float32 tensors (a list or a name -> tensor dict); ``grads``: matching tensors
    (float16/bfloat16 are widened to float32; ``None`` entries add nothing). One fused,
    multi-threaded pass on CPU; bit-identical to ``reference.accumulate_``. Raises before
    touching ``acc`` if anything is off.
    """
    if mode not in ("sq", "abs"):
        raise ValueError(f"mode: expected 'sq' or 'abs', got {mode!r}")
    scale = _checks.real("scale", scale)
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
        glist = list(grads)  # type: ignore[arg-type]
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
    backend = _backend.dispatch("importance.accumulate_", a_l[0].device, cuda_kernel=True,
                                unsupported=_unsupported("acc", a_l))
    if backend == _backend.CUDA:
        # float16/bfloat16 gradients are widened in the kernel (no float32 copy); others copied
        g_l = [g if g.dtype in (torch.float32, torch.float16, torch.bfloat16) else g.to(torch.float32) for g in g_l]
        _check_disjoint("acc", a_l, g_l)
        _cuda.accumulate_(a_l, g_l, scale, mode)
        _bump_version(a_l)
    elif backend == _backend.RUST:
        g_l = [g.to(torch.float32) for g in g_l]
        _check_disjoint("acc", a_l, g_l)
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
    are finite and >= 0. Importances must be finite and non-negative; checking that costs one
    read pass, which ``validated=True`` skips (for importances :func:`fisher_diagonal` made).

    Returns the number of selected elements per tensor, an int64 tensor on the parameters'
    device. float32 results are bit-identical to ``reference.ssd_dampen_``. If it raises, no
    parameter has changed.
    """
    alpha = _checks.real("alpha", alpha, low=0.0)
    lam = _checks.real("lam", lam, low=0.0)
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
    if use_rust or use_cuda:
        _check_disjoint("params", plist, full + forget)
    if not validated:
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
        return x, y
    raise TypeError(f"data: expected batches of (x, y) tensors, got {type(batch).__name__}")


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
    - ``"empirical"``: the exact ``F = (1/N) sum_n (grad l_n)**2``. Linear layers called once per
      forward contract squared inputs with squared output gradients (``sum_n (g_n**2)^T x_n**2``,
      BackPACK's SumGradSquared): no per-sample gradient exists. Over sequences (input with more
      than two dims) the per-sample gradient sums over positions, so it is formed for
      ``chunk_size`` samples at a time; every other parameter (convolutions, norms, embeddings,
      custom layers) gets per-sample gradients from ``torch.func`` in chunks of ``chunk_size``.
      Memory stays bounded by one batch and one chunk whatever the dataset size.
    - ``"mc"``: the true Fisher, one label per input drawn (with ``seed``) from the model's own
      softmax, then as ``"empirical"``.

    Under ``torch.distributed`` (``distributed=None`` detects an initialised group with more
    than one rank) every rank passes its own data; the result is all-reduced so that every rank
    holds the single-process value on the union of the data. In batch mode global batch ``b`` is
    the union of the ranks' batches ``b`` (a rank that runs out contributes nothing).
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
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: has no parameter with requires_grad=True")
    if any(type(p).__name__ == "DTensor" for _, p in named):  # FSDP: would be silently wrong here
        raise ValueError("model: its parameters are sharded (FSDP fully_shard / DTensor), which this function "
                         "does not reduce; use forgetcore.distributed.fsdp_fisher_diagonal (batch mode; the "
                         "per-sample modes bypass FSDP's unshard hooks and are not offered under FSDP)")
    loss_fn = cross_entropy if loss_fn is None else loss_fn
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
    for a in acc.values():
        a.div_(count)
    return acc


def _batch_fisher(model, named, acc, loader, loss_fn, accumulate, device, world, progress) -> int:
    params = [p for _, p in named]
    accs = [acc[n] for n, _ in named]
    if world == 1:
        nb = 0
        for batch in tqdm(loader, desc="fisher (batch)", disable=not progress, leave=False):
            x, y = _split(batch, device)
            loss = _per_sample("loss_fn", loss_fn(model(x), y), x.shape[0]).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            accumulate_(accs, list(grads), 1.0, accumulate)
            nb += 1
        return nb
    import torch.distributed as dist

    # Global batch b = union of the ranks' batches b: all-reduce the summed gradient and the
    # count, then square. Every rank steps as often as the rank with the most batches.
    batches = list(loader) if not hasattr(loader, "__len__") else loader
    steps = torch.tensor([len(batches)], dtype=torch.int64, device=device)  # type: ignore[arg-type]
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    it = iter(batches)
    sizes = [p.numel() for p in params]
    for _ in tqdm(range(int(steps)), desc="fisher (batch)", disable=not progress, leave=False):
        flat = torch.zeros(sum(sizes) + 1, dtype=torch.float32, device=device)
        batch = next(it, None)
        if batch is not None:
            x, y = _split(batch, device)
            loss = _per_sample("loss_fn", loss_fn(model(x), y), x.shape[0]).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
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
            accumulate_(accs, [g.view(p.shape) for g, p in zip(gs, params)], 1.0, accumulate)
    return int(steps)


def _classify(model: nn.Module, named, x: torch.Tensor) -> set[nn.Linear]:
    """Linear modules whose parameters can take the contraction path (called once per forward)."""
    calls: dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: calls.__setitem__(m, calls.get(m, 0) + 1))
             for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    ids = {id(p) for _, p in named}
    fast = set()
    for m, c in calls.items():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if c == 1 and own and all(id(p) in ids for p in own):
            fast.add(m)
    return fast


def _sample_fisher(model, named, acc, loader, loss_fn, mode, chunk_size, seed, device, world, progress) -> int:
    from torch.func import functional_call, grad, vmap

    fast: set[nn.Linear] | None = None
    generic: dict[str, torch.Tensor] = {}
    gen = torch.Generator(device=device)
    rank = 0
    if world > 1:
        import torch.distributed as dist

        rank = dist.get_rank()
    gen.manual_seed(int(seed) * 1000003 + rank)
    total = 0
    for batch in tqdm(loader, desc=f"fisher ({mode})", disable=not progress, leave=False):
        x, y = _split(batch, device)
        n = x.shape[0]
        if n == 0:
            continue
        if fast is None:
            fast = _classify(model, named, x[:2])
            fast_ids = {id(p) for m in fast for p in m.parameters(recurse=False)}
            generic = {name: p for name, p in named if id(p) not in fast_ids}
            names_of = {id(p): name for name, p in named}
        if mode == "mc":
            with torch.no_grad():
                logits = model(x)
            if logits.dim() != 2:
                raise ValueError(f"model: mode='mc' samples one class per input from (N, classes) logits, "
                                 f"got output {_checks.describe(logits)}")
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
            for s in range(0, n, chunk_size):
                gs = per(detached, x[s:s + chunk_size], y[s:s + chunk_size])
                for k, g in gs.items():
                    acc[k].add_(g.float().pow(2).sum(0))
        total += n
    if world > 1:
        import torch.distributed as dist

        names = list(acc)
        flat = torch.cat([acc[k].reshape(-1) for k in names] + [torch.tensor([float(total)], device=device)])
        dist.all_reduce(flat)
        total = int(round(float(flat[-1])))
        for k, v in zip(names, flat[:-1].split([acc[k].numel() for k in names])):
            acc[k].copy_(v.view(acc[k].shape))
    return total


def _fast_pass(model, fast, names_of, acc, x, y, loss_fn, chunk_size) -> None:
    """One forward/backward; each fast Linear contracts its saved input with its output gradient."""
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
    loss = _per_sample("loss_fn", loss_fn(out, y), x.shape[0]).sum()
    mods = list(saved)
    gouts = torch.autograd.grad(loss, [saved[m][1] for m in mods], allow_unused=True)
    for m, g in zip(mods, gouts):
        if g is None:
            continue
        xin = saved[m][0].float()
        g = g.float()
        w, b = m.weight, m.bias
        if xin.dim() == 2:
            g2 = g * g
            if w.requires_grad:
                acc[names_of[id(w)]].add_(g2.t() @ (xin * xin))
            if b is not None and b.requires_grad:
                acc[names_of[id(b)]].add_(g2.sum(0))
        else:
            # Sequences: the per-sample gradient sums over positions before it is squared.
            xs, gs = xin.flatten(1, -2), g.flatten(1, -2)
            for s in range(0, xs.shape[0], chunk_size):
                xc, gc = xs[s:s + chunk_size], gs[s:s + chunk_size]
                if w.requires_grad:
                    acc[names_of[id(w)]].add_(torch.einsum("nso,nsi->noi", gc, xc).pow_(2).sum(0))
                if b is not None and b.requires_grad:
                    acc[names_of[id(b)]].add_(gc.sum(1).pow_(2).sum(0))
