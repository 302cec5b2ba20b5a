"""The baseline continual methods: Finetune (lower bound), ER (replay), Joint (upper bound)."""

from __future__ import annotations

from typing import Any

import torch

from .. import _checks
from ..replay import ReservoirBuffer
from .scenarios import Task
from .trainer import Batch, Context, Plugin


class Finetune(Plugin):
    """Naive sequential fine-tuning: train on each task in turn with nothing against forgetting.

    The lower bound of continual-learning comparisons (fine-tuning in van de Ven, Tuytelaars
    and Tolias, "Three types of incremental learning", Nature Machine Intelligence 2022;
    "single" in Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017; Avalanche's ``Naive``). It changes nothing in the loop:
    ``Trainer(model, opt)`` with no plugin trains the same way; the named class makes
    comparisons read plainly.
    """


class ER(Plugin):
    """Experience replay with a reservoir memory (or any buffer you pass).

    Chaudhry, Rohrbach, Elhoseiny, Ajanthan, Dokania, Torr and Ranzato, "On Tiny Episodic
    Memories in Continual Learning" (arXiv 1902.10486, 2019), Algorithm 1 with reservoir
    ``UpdateMemory`` (Vitter, "Random Sampling with a Reservoir", ACM TOMS 1985, Algorithm R):
    every step trains on the stream batch concatenated with a batch drawn uniformly without
    replacement from the memory (line "B_M ~ M", update on B_n ∪ B_M), and then offers the
    stream batch, not the replayed part, to the reservoir.

    Departures: the paper uses a single pass (one epoch) over each task; here the trainer's
    ``epochs`` apply and the same stream example is offered to the reservoir once per epoch
    (as Mammoth's ER does). A plugin that puts copies of an example in the stream batch marks
    the rows to store with a boolean ``batch["store"]`` over the stream rows (View-Batch stores
    each example's first, unaltered copy once). Replay starts as soon as the memory holds anything, also
    within the first task (as in the paper and Mammoth). In task-incremental scenarios each
    replayed example keeps its own task id, so its logits are masked to its own task's classes.

    The memory is pluggable (Avalanche's ``storage_policy`` idea): ``buffer=`` takes any object
    with ``add(**fields)``, ``sample(n)`` (a dict of tensors with the fields ``x``, ``y``,
    ``task``), ``len()``, ``state_dict()`` and ``load_state_dict()``, e.g.
    :class:`forgetcore.replay.ClassBalancedReservoir`; the default is a :class:`ReservoirBuffer`.

    Args:
        capacity: examples the default reservoir holds (leave None when passing ``buffer``).
        batch_size: replayed examples per step; default the stream batch's size (the paper's
            choice, 10 + 10).
        seed: seeds the reservoir's decisions and its sampling.
        device: where the memory lives; default the device of the first stream batch.
        buffer: the memory to use instead of a reservoir.
    """

    def __init__(self, capacity: int | None = None, batch_size: int | None = None, seed: int = 0,
                 device: torch.device | str | None = None, *, buffer: Any = None) -> None:
        self.batch_size = None if batch_size is None else _checks.positive_int("batch_size", batch_size)
        if buffer is None:
            if capacity is None:
                raise ValueError("capacity: expected the reservoir's size (or pass buffer=), got None")
            buffer = ReservoirBuffer(capacity, seed=seed, device=device)  # checks capacity, seed
        else:
            if capacity is not None:
                raise ValueError(f"capacity: pass either capacity or buffer, not both (got capacity={capacity})")
            _checks.replay_buffer("buffer", buffer)
        self.buffer = buffer

    def transform_batch(self, ctx: Context, batch: Batch) -> Batch:
        if len(self.buffer) == 0:
            return batch
        n = min(self.batch_size or batch["n_stream"], len(self.buffer))
        mem = self.buffer.sample(n)
        out = dict(batch)
        for k in ("x", "y", "task"):
            out[k] = torch.cat([batch[k], mem[k].to(batch[k].device)])
        return out

    def after_step(self, ctx: Context, batch: Batch) -> None:
        n = batch["n_stream"]
        x, y, t = batch["x"][:n].detach(), batch["y"][:n], batch["task"][:n]
        keep = batch.get("store")  # another plugin may say which stream rows are new examples
        if keep is not None:
            x, y, t = x[keep], y[keep], t[keep]
        if len(y):
            self.buffer.add(x=x, y=y, task=t)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the memory (its own load validates the whole state before applying it)."""
        _checks.state_mapping("state", state, ("buffer",))
        self.buffer.load_state_dict(state["buffer"])


class Joint(Plugin):
    """Joint training, the usual upper bound: at task t, train on the union of tasks 0..t.

    This is the cumulative form (Avalanche's ``Cumulative`` strategy), not one run over
    everything at once (the "joint training" upper bound of e.g. van de Ven, Tuytelaars and
    Tolias, "Three types of incremental learning", Nature Machine Intelligence 2022): the
    model keeps training from where the previous task left it, each task's epochs run over
    every example seen so far, and row t of the accuracy matrix is comparable with the other
    methods'. After the last task the model has been trained on the whole data set, which is
    the "everything at once" bound (plus warm starts from the earlier tasks).
    """

    def train_data(self, ctx: Context, task: Task) -> dict[str, torch.Tensor]:
        seen = ctx.scenario[: task.id + 1]
        xs, ys = zip(*(t.train.tensors for t in seen))
        ids = [torch.full((len(t.train),), t.id, dtype=torch.long) for t in seen]
        return {"x": torch.cat(xs), "y": torch.cat(ys), "task": torch.cat(ids)}
