"""Power-law rehearsal, as a plugin of ``forgetcore.continual.Trainer``."""

from __future__ import annotations

from typing import Any

import torch

from .. import _checks
from ..replay import PowerLawScheduler
from .scenarios import Task
from .trainer import Context, Plugin


class PowerLawRehearsal(Plugin):
    """Rehearse earlier tasks after each new one with power-law weights: Gandhi, Shah, Marupudi and
    Varma, "Catastrophic Interference is Mitigated in Naturalistic Power-Law Learning
    Environments" (arXiv 2401.10393, 2024; v3 "Natural Mitigation of Catastrophic Interference:
    Continual Learning in Power-Law Learning Environments").

    Phase t trains on task t's data together with ``n_i`` examples of each earlier task i < t,
    shuffled together (``train_data``); the counts come from a
    :class:`forgetcore.replay.PowerLawScheduler` (``n_i`` proportional to ``(t - i + c)^-d``
    under a fixed total ``budget`` per phase, variant A), and the examples are drawn uniformly
    from task i's training data (the paper assumes the environment gives access to past data).
    ``schedule="uniform"`` and ``"exponential"`` give the controls at the same total budget
    (compare schedules at the same ``budget``; otherwise the comparison measures the budget).

    No official code was found; the constants are parameters (see the scheduler). The phase's
    plan (counts and indices) is drawn in ``before_task`` and kept in ``state_dict``, so a run
    paused inside a task resumes with the same rehearsal set.

    Args:
        budget: rehearsed examples per phase, over all earlier tasks.
        schedule, variant, c, d, lam, reset_on_rehearsal, seed: as :class:`PowerLawScheduler`.
        scheduler: a ready scheduler instead (its budget and schedule are used).
    """

    def __init__(self, budget: int = 200, *, schedule: str = "power", variant: str = "total", c: float = 1.0,
                 d: float = 1.0, lam: float | None = None, reset_on_rehearsal: bool = False, seed: int = 0,
                 scheduler: PowerLawScheduler | None = None) -> None:
        if scheduler is None:
            scheduler = PowerLawScheduler(budget, schedule=schedule, variant=variant, c=c, d=d, lam=lam,
                                          reset_on_rehearsal=reset_on_rehearsal, seed=seed)
        elif not isinstance(scheduler, PowerLawScheduler):
            raise TypeError(f"scheduler: expected a forgetcore.replay.PowerLawScheduler, "
                            f"got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.counts: list[int] = []            # this phase's count per earlier task
        self.indices: list[torch.Tensor] = []  # and which of its examples
        self.history: list[list[int]] = []    # counts of every phase so far

    def before_task(self, ctx: Context, task: Task) -> None:
        if self.scheduler.phase != task.id:
            raise ValueError(f"scheduler: at phase {self.scheduler.phase}, but the trainer starts task {task.id} "
                             "(a scheduler follows one stream from its first task)")
        sizes = [len(t.train) for t in ctx.scenario[: task.id]]
        counts = self.scheduler.counts()
        indices = self.scheduler.sample_indices(counts, sizes)  # checks before anything changes
        self.scheduler.step()
        self.counts, self.indices = counts, indices
        self.history.append(list(counts))

    def train_data(self, ctx: Context, task: Task) -> dict[str, torch.Tensor]:
        xs, ys, ids = [task.train.tensors[0]], [task.train.tensors[1]], [torch.full((len(task.train),), task.id)]
        for i, idx in enumerate(self.indices):
            if len(idx):
                x, y = ctx.scenario[i].train.tensors
                xs.append(x[idx])
                ys.append(y[idx])
                ids.append(torch.full((len(idx),), i))
        return {"x": torch.cat(xs), "y": torch.cat(ys), "task": torch.cat(ids).long()}

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "counts": list(self.counts),
                "indices": [t.clone() for t in self.indices], "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, validated whole first (the scheduler's state, one index
        tensor per count, each of that many int64 indices, one history row per phase); a state
        that fails changes nothing."""
        _checks.state_mapping("state", state, ("scheduler", "counts", "indices", "history"))
        counts = _int_list("state['counts']", state["counts"])
        indices = state["indices"]
        if not isinstance(indices, (list, tuple)) or len(indices) != len(counts):
            raise ValueError(f"state['indices']: expected one index tensor per count ({len(counts)})")
        for i, (t, n) in enumerate(zip(indices, counts)):
            _checks.tensor(f"state['indices'][{i}]", t, dtype=torch.int64, shape=(n,))
            if n and int(t.min()) < 0:
                raise ValueError(f"state['indices'][{i}]: expected indices >= 0, got {int(t.min())}")
        history = state["history"]
        if not isinstance(history, (list, tuple)):
            raise TypeError(f"state['history']: expected a list of lists, got {type(history).__name__}")
        history = [_int_list(f"state['history'][{i}]", h) for i, h in enumerate(history)]
        sch = state["scheduler"]
        _checks.state_mapping("state['scheduler']", sch, ("phase",))
        if len(history) != sch["phase"]:
            raise ValueError(f"state['history']: expected one row per phase begun ({sch['phase']}), got {len(history)}")
        self.scheduler.load_state_dict(sch)  # validates the whole scheduler state, then applies
        self.counts = counts
        self.indices = [t.clone() for t in indices]
        self.history = history


def _int_list(name: str, v: Any) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{name}: expected a list of ints, got {type(v).__name__}")
    return [_checks.state_int(f"{name}[{i}]", x) for i, x in enumerate(v)]
