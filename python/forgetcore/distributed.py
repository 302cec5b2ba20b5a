"""forgetcore under ``torch.distributed``: rank helpers, agreement checks, sharding, replay, sweeps.

forgetcore runs no distributed runtime of its own: ``torch.distributed`` (gloo on CPU, NCCL on
GPU) is the engine inside a job. This module holds what the methods need on top of it:

- :func:`rank`, :func:`world_size`, :func:`resolve_world`: ``1``/``0`` when no process group is
  initialised, so every helper is the identity in a single process;
- :func:`check_agree`: a checksum all-gather of a tensor or a nested state (a basis, a buffer's
  ``state_dict``); when the ranks disagree every rank raises the same ``ValueError`` naming the
  ranks that differ from rank 0 (so no rank is left waiting in a collective);
- :func:`mean_across_ranks`, :func:`gather_rows`, :func:`gram_root`: the reductions methods use
  (GU's averaged gradients, GPM's all-reduced representation Gram);
- :class:`ShardBatches`: the ``Trainer`` plugin that makes a run under DDP equal to the
  single-process run with ``world * batch_size`` examples per step (seeded sharding through
  the ``batch_indices`` hook, gradients averaged in ``after_backward``);
- :class:`DistributedReservoir`: the replay semantics chosen here (see its docstring);
- :func:`save_once`: rank 0 writes, everybody waits;
- :func:`sweep`: process-parallel seed sweeps (``spawn``, one torch thread per worker).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _checks

__all__ = ["rank", "world_size", "is_distributed", "resolve_world", "check_agree", "checksum",
           "mean_across_ranks", "broadcast_object", "gather_rows", "gram_root", "ShardBatches", "DistributedReservoir",
           "save_once", "sweep", "is_sharded", "fsdp_fisher_diagonal", "fsdp_ssd_dampen_"]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one rank is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_world(distributed: bool | None) -> int:
    """``distributed=None``: the group's size when one is initialised, else 1; ``True`` needs a group."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = on
    if distributed and not on:
        raise ValueError("distributed: True needs an initialised torch.distributed process group")
    return dist.get_world_size() if distributed else 1


def _device() -> torch.device:
    # Collectives run where the backend wants them: NCCL on the current CUDA device, gloo on CPU.
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------- agreement
def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(obj, np.ndarray):
        _feed(h, torch.from_numpy(np.ascontiguousarray(obj)))
    else:
        h.update(repr(obj).encode())


def checksum(obj: Any) -> int:
    """A 63-bit digest of a tensor or of nested dicts/lists of tensors and plain values (bitwise)."""
    h = hashlib.blake2b(digest_size=8)
    _feed(h, obj)
    return int.from_bytes(h.digest(), "little") >> 1


def check_agree(name: str, obj: Any) -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold bitwise the same ``obj``.

    One all-gather of an 8-byte checksum; a no-op in a single process. The message starts with
    ``name`` and lists the ranks whose value differs from rank 0's.
    """
    if not is_distributed():
        return
    import torch.distributed as dist

    mine = torch.tensor([checksum(obj)], dtype=torch.int64, device=_device())
    got = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(got, mine)
    sums = [int(g) for g in got]
    bad = [r for r, s in enumerate(sums) if s != sums[0]]
    if bad:
        raise ValueError(f"{name}: ranks disagree: rank(s) {bad} differ from rank 0 "
                         f"(checksums {sums}); every rank must hold the same {name}")


def _same_int(name: str, value: int) -> None:
    """All ranks must pass the same integer (else a ValueError naming the ranks, on every rank)."""
    check_agree(name, int(value))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable value) on every rank; ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


# ---------------------------------------------------------------------------------- reductions
def mean_across_ranks(t: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Weighted mean of ``t`` over ranks (``sum_r w_r t_r / sum_r w_r``); ``t`` itself in one process.

    With ``weight`` = the rank's number of examples, a per-rank mean gradient becomes the mean
    gradient over the union of the ranks' examples.
    """
    if not is_distributed():
        return t
    import torch.distributed as dist

    flat = torch.cat([(t.reshape(-1).double() * weight), torch.tensor([float(weight)], dtype=torch.float64,
                                                                      device=t.device)])
    flat = flat.to(_device())
    dist.all_reduce(flat)
    if float(flat[-1]) <= 0:
        raise ValueError("weight: the ranks' weights sum to zero")
    return (flat[:-1] / flat[-1]).to(t.device, t.dtype).view(t.shape)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order (row counts may differ)."""
    if not is_distributed():
        return t
    import torch.distributed as dist

    w, dev = dist.get_world_size(), _device()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    ns = [torch.zeros_like(n) for _ in range(w)]
    dist.all_gather(ns, n)
    sizes = [int(v) for v in ns]
    top = max(sizes)
    pad = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[: t.shape[0]] = t.to(dev)
    out = [torch.empty_like(pad) for _ in range(w)]
    dist.all_gather(out, pad)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(t.device)


def gram_root(a: torch.Tensor) -> torch.Tensor:
    """A ``(d, d)`` matrix ``B`` with ``B B^T = sum_r A_r A_r^T`` for the ranks' ``(d, n_r)`` matrices.

    ``B`` has the left singular vectors and singular values of the column-concatenation
    ``[A_0 ... A_{W-1}]``, which is all that an energy- or norm-based basis extension reads
    (``A - U U^T A`` keeps the same property), so bases grown from ``B`` equal those grown from
    the single-process representation matrix, at the cost of one ``d x d`` all-reduce. In a single
    process ``a`` is returned unchanged.
    """
    if not is_distributed():
        return a
    import torch.distributed as dist

    g = (a.double() @ a.double().T).to(_device())
    dist.all_reduce(g)
    g = g.cpu()
    g = (g + g.T) / 2
    vals, vecs = torch.linalg.eigh(g)
    return ((vecs * vals.clamp_min(0).sqrt()) @ vecs.T).to(a.dtype).to(a.device)


def _sum_int(v: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([int(v)], dtype=torch.int64, device=_device())
    dist.all_reduce(t)
    return int(t)


# ---------------------------------------------------------------------------------- Trainer
class ShardBatches:
    """``Trainer`` plugin: seeded sharding of each task and averaged gradients under DDP.

    Every rank holds the whole scenario and the same initial model. Each epoch the global
    order is the Trainer's own default (``randperm`` from ``(seed, task, epoch)``); it is cut into
    global batches of ``world * batch_size`` and rank ``r`` trains on the ``r``-th slice of each.
    ``after_backward`` replaces every gradient by its mean over ranks, so with equal slices a run
    on ``W`` ranks takes the same steps as one process with ``batch_size * W`` (the test checks
    it). Put this plugin first, before any plugin whose ``after_backward`` is not linear in the
    gradient. Models with batch norm keep per-rank running statistics (use SyncBatchNorm).

    The last global batch must split evenly over the ranks (else the mean over ranks is not the
    mean over examples): ``drop_last=True`` drops it instead of raising.

    Evaluation is gathered: from the first task on, each rank scores every ``W``-th test example
    and the correct counts are summed over ranks, so every rank reports the single process's
    accuracies (the initial row, before any task, is computed whole on every rank); :meth:`check`
    verifies that the models agree. ``state_dict`` records the world size and whether a task
    is under way: a state saved at a task boundary (the end of a run, or a ``max_steps`` pause
    on a task's last step) resumes on any world size, the next task taking the new global
    batch; a state saved inside a task under another world size is a ``ValueError``, since the
    task's global batch (and so its run) would change mid-task.
    """

    def __init__(self, *, drop_last: bool = False, check_every: int = 0) -> None:
        self.drop_last = bool(drop_last)
        self.check_every = _checks.positive_int("check_every", check_every, allow_zero=True)
        self.world = world_size()
        self.rank = rank()
        self._in_task = False

    def before_task(self, ctx: Any, task: Any) -> None:
        self.resume_task(ctx, task)

    def after_task(self, ctx: Any, task: Any) -> None:
        self._in_task = False

    def resume_task(self, ctx: Any, task: Any) -> None:
        self._in_task = True
        # Sharded evaluation: the Trainer scores every world-th test example and sums the counts.
        if self.world > 1:
            ctx.trainer.eval_shard = (self.rank, self.world)
            ctx.trainer.eval_shard_sum = _sum_int

    def batch_indices(self, ctx: Any, task: Any, epoch: int, n: int) -> list[torch.Tensor]:
        from .continual.trainer import _epoch_generator  # the Trainer's own seeded order

        bs, w, r = ctx.trainer.batch_size, self.world, self.rank
        order = torch.randperm(n, generator=_epoch_generator(ctx.seed, task.id, epoch))
        out = []
        for g in order.split(bs * w):
            if len(g) % w:
                if self.drop_last:
                    continue
                raise ValueError(f"world_size: {w} ranks do not divide the last global batch of task {task.id} "
                                 f"({len(g)} of {n} examples, batch_size {bs}); use a task size that "
                                 f"leaves a multiple of {w}, or ShardBatches(drop_last=True)")
            k = len(g) // w
            out.append(g[r * k:(r + 1) * k])
        if not out:
            raise ValueError(f"world_size: task {task.id} has {n} examples, fewer than one global batch "
                             f"of {bs * w} with drop_last=True")
        return out

    def after_backward(self, ctx: Any) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        params = [p for p in ctx.model.parameters() if p.requires_grad]
        has = [p.grad is not None for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(_device())
        dist.all_reduce(flat)
        flat /= self.world
        off = 0
        for p, h in zip(params, has):
            k = p.numel()
            if h or bool(flat[off:off + k].any()):
                p.grad = flat[off:off + k].view_as(p).to(p.device, p.dtype).clone()
            off += k

    def after_step(self, ctx: Any, batch: Any) -> None:
        if self.check_every and ctx.step % self.check_every == 0:
            self.check(ctx.model)

    def check(self, model: torch.nn.Module) -> None:
        """Raise on every rank unless all ranks hold the same model parameters and buffers."""
        check_agree("model", dict(model.state_dict()))

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world, "in_task": self._in_task}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _checks.state_mapping("state", state, ("world_size",))
        w = _checks.state_int("state['world_size']", state["world_size"], low=1)
        in_task = state.get("in_task", True)  # a checkpoint without it: assume inside a task
        if not isinstance(in_task, bool):
            raise TypeError(f"state['in_task']: expected a bool, got {type(in_task).__name__}")
        if w != self.world and in_task:
            raise ValueError(f"world_size: the checkpoint was written by {w} ranks inside a task, this run has "
                             f"{self.world}; the task's global batch (world_size * batch_size) would change "
                             f"mid-task, so resume with {w} ranks (or from a checkpoint saved at a task boundary)")
        self._in_task = in_task


# ---------------------------------------------------------------------------------- replay
class DistributedReservoir:
    """A replicated replay buffer: identical on every rank, equal to one process on the global stream.

    Semantics (chosen here): ``add`` all-gathers the ranks' stream rows in rank order (with
    :class:`ShardBatches` that is exactly the global batch) and offers them to a local copy of
    ``buffer``; every copy starts from the same seed, so all ranks make the same reservoir
    decisions and the reservoir invariant (each of the ``seen`` global stream items is kept with
    probability ``capacity / seen``) holds over the global stream. ``sample(n)`` draws one
    global sample of ``min(n * W, len)`` rows with the shared generator and hands rank ``r`` its
    ``r``-th slice, so the union of the ranks' replay batches is the single process's replay
    batch of ``n * W`` rows (ER on top matches the single process when the slices are equal,
    i.e. whenever that count divides by ``W``; with uneven slices the rows are the same but
    their loss weights differ slightly). Memory is replicated (``W`` copies): fine for the
    buffer sizes of the literature (hundreds to thousands of examples). :meth:`check` verifies
    all copies agree (checksum all-gather). Every rank must call ``add`` (a collective) and
    ``sample`` (which advances the shared random stream) at the same steps: ER skips ``add`` for
    an empty stream batch, so a plugin that marks no row of one rank's batch for storage would
    leave the other ranks waiting.
    """

    def __init__(self, buffer: Any) -> None:
        self.buffer = _checks.replay_buffer("buffer", buffer)

    def __len__(self) -> int:
        return len(self.buffer)

    @property
    def capacity(self) -> int:
        return self.buffer.capacity

    @property
    def seen(self) -> int:
        return self.buffer.seen

    def add(self, **fields: torch.Tensor) -> Any:
        return self.buffer.add(**{k: gather_rows(v) for k, v in sorted(fields.items())})

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        n = _checks.positive_int("n", n)
        w, r = world_size(), rank()
        m = min(n * w, len(self.buffer))
        rows = self.buffer.sample(m, generator) if generator is not None else self.buffer.sample(m)
        lo, hi = (r * m) // w, ((r + 1) * m) // w
        return {k: v[lo:hi] for k, v in rows.items()}

    def check(self) -> None:
        check_agree("buffer", self.buffer.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state)


# ---------------------------------------------------------------------------------- FSDP
def is_sharded(p: torch.Tensor) -> bool:
    """True for a parameter sharded by FSDP (``fully_shard``) or any other ``DTensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(p, DTensor)


def fsdp_fisher_diagonal(model: torch.nn.Module, data: Any, loss_fn: Callable[..., torch.Tensor] | None = None,
                         *, batch_size: int = 64, accumulate: str = "sq",
                         progress: bool = False) -> dict[str, torch.Tensor]:
    """``fisher_diagonal(mode="batch")`` for a model sharded by FSDP: each rank gets its own shard.

    Every rank passes its own ``data`` (a ``TensorDataset`` or a list of ``(x, y)`` batches; the
    same number of batches on every rank, as FSDP's collectives need). Global batch ``b`` is the
    union of the ranks' batches ``b``: each rank back-propagates its summed loss scaled by
    ``world / n_b`` (``n_b`` the global batch size, all-reduced), FSDP's reduce-scatter
    averages over ranks, so each rank's gradient shard is the shard of the global batch's mean
    gradient; its square (``"abs"``: absolute value, LF-SSD) is accumulated and divided by the
    number of batches, as the batch mode does. Returns name -> float32 local shard (a plain
    tensor shaped like ``p.to_local()``). The per-sample modes differentiate functional copies
    of the parameters and bypass FSDP's unshard hooks: they are not offered here.
    """
    import torch.distributed as dist
    import torch.nn.functional as F

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if accumulate not in ("sq", "abs"):
        raise ValueError(f"accumulate: expected 'sq' or 'abs', got {accumulate!r}")
    batch_size = _checks.positive_int("batch_size", batch_size)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named or not any(is_sharded(p) for _, p in named):
        raise ValueError("model: expected parameters sharded by FSDP (fully_shard); use "
                         "forgetcore.importance.fisher_diagonal for an unsharded model")
    if isinstance(data, torch.utils.data.TensorDataset):
        ts = data.tensors
        batches = [tuple(t[s:s + batch_size] for t in ts) for s in range(0, len(ts[0]), batch_size)]
    else:
        batches = list(data)
    _same_int("data", len(batches))
    if not batches:
        raise ValueError("data: expected a non-empty dataset, got no batches")
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="none"))
    device = next(iter(model.parameters())).device
    acc = {n: torch.zeros_like(_local(p), dtype=torch.float32) for n, p in named}
    world = world_size()
    for x, y in tqdm(batches, desc="fisher (fsdp)", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        n = torch.tensor([float(len(y))], device=_device())
        dist.all_reduce(n)
        model.zero_grad(set_to_none=True)
        (loss_fn(model(x), y).sum() * (world / float(n))).backward()
        for name, p in named:
            if p.grad is not None:
                g = _local(p.grad).float()
                acc[name].add_(g.pow(2) if accumulate == "sq" else g.abs())
    model.zero_grad(set_to_none=True)
    for a in acc.values():
        a.div_(len(batches))
    return acc


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def fsdp_ssd_dampen_(model: torch.nn.Module, imp_full: Mapping[str, torch.Tensor],
                     imp_forget: Mapping[str, torch.Tensor], alpha: float, lam: float = 1.0) -> torch.Tensor:
    """SSD's dampening on FSDP-sharded parameters: each rank dampens its own shard in place with
    the matching shards of the importances (from :func:`fsdp_fisher_diagonal`). Returns the
    global number of dampened elements per tensor (all-reduced)."""
    from .importance import ssd_dampen_

    with torch.no_grad():
        params = {n: _local(p) for n, p in model.named_parameters() if n in imp_full}
        counts = ssd_dampen_(params, dict(imp_full), dict(imp_forget), alpha, lam)
    if is_distributed():
        import torch.distributed as dist

        counts = counts.to(_device())
        dist.all_reduce(counts)
    return counts


# ---------------------------------------------------------------------------------- saving
def save_once(obj: Any, path: str | Path) -> None:
    """Rank 0 writes ``obj`` with ``torch.save``; every rank returns after the file exists."""
    if rank() == 0:
        torch.save(obj, path)
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------- sweeps
def _sweep_worker(args: tuple[Callable[..., Any], int, dict[str, Any]]) -> Any:
    fn, seed, kw = args
    torch.set_num_threads(1)
    return fn(seed, **kw)


def sweep(fn: Callable[..., Any], seeds: Sequence[int] | Iterable[int], *, processes: int | None = None,
          progress: bool = True, desc: str = "seeds", **kwargs: Any) -> list[Any]:
    """``[fn(seed, **kwargs) for seed in seeds]``, across ``processes`` spawned workers.

    ``fn`` must be importable (a module-level function) and its results picklable. Workers use
    the ``spawn`` start method (forked children of a process that already ran torch can hang)
    and one torch thread each; results come back in the order of ``seeds``, so a seeded ``fn``
    gives exactly the sequential results. ``processes=1`` (or one seed) runs in this process.
    """
    seeds = [_checks.positive_int("seeds", s, allow_zero=True) for s in seeds]
    if not seeds:
        raise ValueError("seeds: expected at least one seed, got none")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    if processes is None:
        processes = min(len(seeds), os.cpu_count() or 1)
    processes = _checks.positive_int("processes", processes)
    if processes == 1 or len(seeds) == 1:
        return [fn(s, **kwargs) for s in tqdm(seeds, desc=desc, disable=not progress)]
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(min(processes, len(seeds))) as pool:
        it = pool.imap(_sweep_worker, [(fn, s, kwargs) for s in seeds])
        return list(tqdm(it, total=len(seeds), desc=desc, disable=not progress))
