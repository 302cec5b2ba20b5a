"""SCoLe's training pieces as Trainer plugins: per-minibatch logit masking and class replay.

Lesort, Ostapenko, Rodriguez, Misra, Arefin, Charlin and Rish, "Challenging Common Assumptions
about Catastrophic Forgetting and Knowledge Accumulation", CoLLAs 2023 (official code
``TLESORT/SCoLe-SCaling-Continual-Learning``: ``utils_training.get_loss``, ``replay.py``).
The streams are :func:`forgetcore.continual.scenarios.scole`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import _checks
from .scenarios import Task
from .trainer import Batch, Context, Plugin

REPLAY = ("frequency", "random")


class LogitMask(Plugin):
    """Cross-entropy over the classes present in the mini-batch only (SCoLe's "group" masking):
    every other logit is set to -1e9 before the loss, as ``get_loss`` does. Per mini-batch, not
    per task (replayed classes in the batch count as present); evaluation is not masked."""

    def loss(self, ctx: Context, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        present = torch.zeros(output.shape[1], dtype=torch.bool, device=output.device)
        present[batch["y"]] = True
        return F.cross_entropy(output.masked_fill(~present, -1e9), batch["y"])


class SCoLeReplay(Plugin):
    """SCoLe's class replay: each task's data is joined by the stored examples of a few other
    classes (``train_data``), chosen by frequency or at random (``replay.py``).

    Memory: up to ``per_class`` examples of every class seen; on each re-occurrence of a class,
    ``max(per_class / (occurrences + 1), 10)`` of its stored examples are refreshed with new
    ones from the task (random slots).

    - ``mode="frequency"`` (``FrequencyReplay``): with ``f_c`` = (tasks containing c) / (tasks so
      far) and classes seen fewer than 3 times ignored, scan the classes from the rarest to the
      most frequent, stop at the first with ``f_c > high``, and replay those with
      ``f_c > low``, at most ``classes_per_task`` of them, none of the current task's classes.
    - ``mode="random"`` (``RandomReplay``): each of ``classes_per_task`` slots is filled with
      probability ``budget`` by a random seen class not in the current task.

    The plan of a task is drawn in ``before_task`` from ``(seed, task id)`` and kept in
    ``state_dict`` (a paused run resumes with the same data).
    """

    def __init__(self, mode: str = "frequency", *, per_class: int = 200, classes_per_task: int = 2,
                 low: float = 0.01, high: float = 0.1, budget: float = 0.5, seed: int = 0) -> None:
        if mode not in REPLAY:
            raise ValueError(f"mode: expected one of {REPLAY}, got {mode!r}")
        self.mode = mode
        self.per_class = _checks.positive_int("per_class", per_class)
        self.classes_per_task = _checks.positive_int("classes_per_task", classes_per_task)
        self.low = _checks.real("low", low, low=0.0, high=1.0)
        self.high = _checks.real("high", high, low=0.0, high=1.0)
        self.budget = _checks.real("budget", budget, low=0.0, high=1.0)
        self.seed = _checks.seed(seed)
        self.occurrences: dict[int, int] = {}
        self.tasks_seen = 0
        self.memory: dict[int, dict[str, torch.Tensor]] = {}
        self.replayed: list[list[int]] = []  # the classes replayed in each task

    def _rng(self, task_id: int, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, task_id, salt])

    def _choose(self, task: Task) -> list[int]:
        current = set(task.classes)
        candidates = [c for c in self.memory if c not in current]
        if not candidates:
            return []
        if self.mode == "random":
            rng = self._rng(task.id, 0)
            out = []
            for _ in range(self.classes_per_task):
                if rng.random() < self.budget:
                    out.append(int(rng.choice(candidates)))
            return sorted(set(out))
        freq = {c: self.occurrences[c] / max(1, self.tasks_seen) for c in candidates if self.occurrences[c] >= 3}
        out = []
        for c in sorted(freq, key=lambda c: (freq[c], c)):  # rarest first
            if freq[c] > self.high or len(out) >= self.classes_per_task:
                break
            if freq[c] > self.low:
                out.append(c)
        return out

    def before_task(self, ctx: Context, task: Task) -> None:
        self.replayed.append(self._choose(task))

    def train_data(self, ctx: Context, task: Task) -> dict[str, torch.Tensor]:
        xs, ys = [task.train.tensors[0]], [task.train.tensors[1]]
        for c in self.replayed[-1]:
            xs.append(self.memory[c]["x"])
            ys.append(self.memory[c]["y"])
        y = torch.cat(ys)
        return {"x": torch.cat(xs), "y": y, "task": torch.full((len(y),), task.id, dtype=torch.long)}

    def after_task(self, ctx: Context, task: Task) -> None:
        x, y = task.train.tensors
        for c in task.classes:
            rows = torch.nonzero(y == c).flatten()
            occ = self.occurrences.get(c, 0)
            rng = self._rng(task.id, 1 + c)
            if c not in self.memory:
                take = rows[torch.from_numpy(rng.permutation(len(rows))[: self.per_class])]
                self.memory[c] = {"x": x[take].clone(), "y": y[take].clone()}
            else:
                mem = self.memory[c]
                k = min(max(self.per_class // (occ + 1), 10), len(rows), len(mem["y"]))
                slots = torch.from_numpy(rng.choice(len(mem["y"]), size=k, replace=False))
                new = rows[torch.from_numpy(rng.choice(len(rows), size=k, replace=False))]
                mem["x"][slots] = x[new]
            self.occurrences[c] = occ + 1
        self.tasks_seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"occurrences": {str(c): n for c, n in self.occurrences.items()}, "tasks_seen": self.tasks_seen,
                "memory": {str(c): {k: v.clone() for k, v in m.items()} for c, m in self.memory.items()},
                "replayed": [list(r) for r in self.replayed]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, validated whole first (class counts at most
        ``tasks_seen``, per-class memories of at most ``per_class`` labelled rows, one replay
        list per task begun); a state that fails changes nothing."""
        _checks.state_mapping("state", state, ("occurrences", "tasks_seen", "memory", "replayed"))
        tasks_seen = _checks.state_int("state['tasks_seen']", state["tasks_seen"])
        occ = {_class_id("state['occurrences']", c): _checks.state_int(f"state['occurrences'][{c!r}]", n,
                                                                       high=tasks_seen)
               for c, n in _checks.state_mapping("state['occurrences']", state["occurrences"]).items()}
        memory = {}
        for c, m in _checks.state_mapping("state['memory']", state["memory"]).items():
            name = f"state['memory'][{c!r}]"
            _checks.state_mapping(name, m, ("x", "y"))
            y = _checks.tensor(f"{name}['y']", m["y"], dtype=torch.int64, ndim=1)
            x = _checks.tensor(f"{name}['x']", m["x"])
            if len(y) > self.per_class or x.dim() == 0 or x.shape[0] != len(y):
                raise ValueError(f"{name}: expected x and y of one length <= per_class = {self.per_class}, got "
                                 f"{_checks.describe(x)} and {_checks.describe(y)}")
            _checks.finite(f"{name}['x']", x)
            cid = _class_id("state['memory']", c)
            if cid not in occ:
                raise ValueError(f"{name}: a class in memory that state['occurrences'] never counted")
            memory[cid] = {"x": x.clone(), "y": y.clone()}
        if set(memory) != set(occ):  # after_task stores every class it counts
            raise ValueError(f"state['memory']: expected one memory per counted class {sorted(occ)}, "
                             f"got {sorted(memory)}")
        replayed = state["replayed"]
        if not isinstance(replayed, (list, tuple)) or len(replayed) not in (tasks_seen, tasks_seen + 1):
            raise ValueError(f"state['replayed']: expected one list of classes per task begun "
                             f"({tasks_seen} or {tasks_seen + 1})")
        rows = []
        for i, r in enumerate(replayed):
            if not isinstance(r, (list, tuple)):
                raise TypeError(f"state['replayed'][{i}]: expected a list of class ids, got {type(r).__name__}")
            rows.append([_checks.state_int(f"state['replayed'][{i}]", c) for c in r])
        self.occurrences, self.tasks_seen, self.memory, self.replayed = occ, tasks_seen, memory, rows


def _class_id(name: str, c: Any) -> int:
    """A class id saved as a dict key (a str of an int, as state_dict writes it, or an int)."""
    if isinstance(c, str) and c.lstrip("-").isdigit():
        c = int(c)
    return _checks.state_int(f"{name}[{c!r}]", c)
