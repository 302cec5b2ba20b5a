"""WA: Weight Aligning with knowledge distillation, as a plugin of ``forgetcore.continual.Trainer``."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from .. import _checks
from ..replay import herding_per_class
from ._head import FeatureTap, find_head
from .scenarios import Task
from .trainer import Batch, Context, Plugin

ALIGN = ("official", "pycil")


class WA(Plugin):
    """Weight Aligning: Zhao, Xiao, Gan, Zhang and Xia, "Maintaining Discrimination and Fairness in
    Class Incremental Learning", CVPR 2020 (official code ``bwbwzhao/Weight-Aligning``; PyCIL's
    ``models/wa.py``).

    What runs, per task ``s`` (0-based):

    - training data: the task's data together with the exemplar memory (``train_data``);
    - loss on seen classes only (the official code widens the classifier to the seen classes):
      ``(1 - r) CE + r KD`` with ``r = s / (s + 1)`` (the official code's weighting; PyCIL's
      ``n_old / n_seen`` is the same for equal-size tasks), ``KD = -(1/B) sum softmax(z_old / T)
      . log_softmax(z[:, old] / T)`` with ``T = 2`` and no ``T^2`` factor, where ``z_old`` are the
      logits of the previous model, already aligned (the teacher), on the old classes;
    - weight clipping after every optimiser step: ``W <- max(W, 0)`` on the output layer
      (``clip=True``; it presumes non-negative, post-ReLU features);
    - after the task's training (``after_task``), Weight Aligning: ``n_j = ||W_j||_p``,
      ``gamma = mean_old n_j / mean_new n_j`` and ``W_new <- gamma W_new``. ``align="official"``
      (default): ``p = 1`` and ``gamma <= 1``, as the official code (``--norm 1``; its NCS module
      scales the new logits, the same thing with a bias-free classifier); ``align="pycil"``:
      ``p = 2`` and no cap, as PyCIL. ``align=None`` skips aligning (the ablation);
    - then the memory: a fixed total ``memory`` split evenly over the seen classes
      (``memory // n_seen`` each); old classes keep the first exemplars of their herding order,
      new classes are chosen by herding on the L2-normalised penultimate features
      (:func:`forgetcore.replay.herding_per_class`, iCaRL's selection);
    - the aligned model is copied as the next task's teacher.

    Requires a bias-free output layer (scaling the weights alone does not align classes with a
    bias; PyCIL keeps an unaligned bias). Choices of ours: the output layer has every class from
    the start (the trainer's fixed head) and the rows of classes not seen yet are kept at zero
    (no gradient reaches them: the loss uses seen classes only), so a new class starts from a
    zero row; old rows are kept (PyCIL's choice; the official code re-creates the layer each
    stage). Aligning scales ``W_new`` in place (as PyCIL's ``weight_align``), so the next task
    trains on from the aligned weights; the official code keeps the factor outside the weights
    (its NCS module), applies it at inference and to the teacher's logits, and resets the
    earlier stages' factors to 1 at each alignment. The optimiser, schedule and epochs are the
    trainer's (the official recipe: SGD, momentum 0.9).

    Args:
        memory: total exemplars (official: 20 per class of the whole stream, 2000 on CIFAR-100).
        temperature: the KD temperature (2).
        clip: clamp the output weights at 0 after every step.
        align: ``"official"``, ``"pycil"`` or None.
        head: name of the bias-free nn.Linear output layer (default: the model's last Linear).
    """

    def __init__(self, memory: int = 200, *, temperature: float = 2.0, clip: bool = True,
                 align: str | None = "official", head: str | None = None) -> None:
        self.memory = _checks.positive_int("memory", memory)
        self.temperature = _checks.real("temperature", temperature, low=0.0, low_open=True)
        if not isinstance(clip, bool):
            raise TypeError(f"clip: expected a bool, got {type(clip).__name__}")
        self.clip = clip
        if align is not None and align not in ALIGN:
            raise ValueError(f"align: expected one of {ALIGN} or None, got {align!r}")
        self.align = align
        if head is not None and not isinstance(head, str):
            raise TypeError(f"head: expected a module name (str) or None, got {type(head).__name__}")
        self.head_name = head
        self.seen: list[int] = []     # classes of finished tasks (the "old" classes), in order
        self.mem_x: torch.Tensor | None = None
        self.mem_y = torch.zeros(0, dtype=torch.long)
        self.gammas: list[float] = []
        self._teacher_state: dict[str, torch.Tensor] | None = None
        self._teacher: torch.nn.Module | None = None
        self._head: torch.nn.Linear | None = None

    # ---- helpers
    def _attach(self, ctx: Context) -> torch.nn.Linear:
        if self._head is None:
            self._head = find_head(ctx.model, self.head_name, bias_free=True, method="WA")
        return self._head

    def _teacher_model(self, ctx: Context) -> torch.nn.Module | None:
        if self._teacher_state is None:
            return None
        if self._teacher is None:
            own = ctx.model.state_dict()
            if set(self._teacher_state) != set(own):
                raise ValueError(f"state['teacher']: expected the model's keys, got "
                                 f"{sorted(set(self._teacher_state) ^ set(own))} differing")
            for k, v in self._teacher_state.items():
                _checks.tensor(f"state['teacher'][{k!r}]", v, dtype=own[k].dtype, shape=tuple(own[k].shape))
            self._teacher = copy.deepcopy(ctx.model)
            self._teacher.load_state_dict(self._teacher_state)
            self._teacher.eval()
            for p in self._teacher.parameters():
                p.requires_grad_(False)
        return self._teacher

    def _zero_unseen_(self, ctx: Context, task: Task) -> None:
        head = self._attach(ctx)
        keep = torch.zeros(head.out_features, dtype=torch.bool)
        keep[self.seen + list(task.classes)] = True
        with torch.no_grad():
            head.weight[~keep.to(head.weight.device)] = 0.0

    @staticmethod
    def norm_ratio(weight: torch.Tensor, old: list[int], new: list[int], p: float) -> float:
        """``mean_old ||W_j||_p / mean_new ||W_j||_p``."""
        n = weight.detach().norm(p=p, dim=1)
        return float(n[old].mean() / n[new].mean())

    # ---- Trainer hooks
    def before_task(self, ctx: Context, task: Task) -> None:
        self._attach(ctx)
        self._zero_unseen_(ctx, task)

    def resume_task(self, ctx: Context, task: Task) -> None:
        self._attach(ctx)

    def train_data(self, ctx: Context, task: Task) -> dict[str, torch.Tensor]:
        x, y = task.train.tensors
        if self.mem_x is None or len(self.mem_y) == 0:
            return {"x": x, "y": y, "task": torch.full((len(y),), task.id, dtype=torch.long)}
        mx, my = self.mem_x.to(x.device), self.mem_y.to(y.device)
        # the memory's task ids are not needed (class-incremental); they are marked with the current id
        return {"x": torch.cat([x, mx]), "y": torch.cat([y, my]),
                "task": torch.full((len(y) + len(my),), task.id, dtype=torch.long)}

    def loss(self, ctx: Context, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        classes = self.seen + list(ctx.task.classes)
        cls = torch.tensor(classes, device=output.device)
        # targets as positions among the seen classes
        pos = torch.full((output.shape[1],), -1, dtype=torch.long, device=output.device)
        pos[cls] = torch.arange(len(classes), device=output.device)
        ce = F.cross_entropy(output[:, cls], pos[batch["y"]])
        teacher = self._teacher_model(ctx)
        if teacher is None or not self.seen:
            return ce
        s = ctx.task_id
        r = s / (s + 1)
        old = torch.tensor(self.seen, device=output.device)
        with torch.no_grad():
            z_t = teacher(batch["x"])[:, old]
        t = self.temperature
        kd = -(F.softmax(z_t / t, dim=1) * F.log_softmax(output[:, old] / t, dim=1)).sum(1).mean()
        return (1 - r) * ce + r * kd

    def after_step(self, ctx: Context, batch: Batch) -> None:
        if self.clip:
            with torch.no_grad():
                self._attach(ctx).weight.clamp_(min=0.0)

    def after_task(self, ctx: Context, task: Task) -> None:
        head = self._attach(ctx)
        new = [c for c in task.classes if c not in self.seen]
        if self.align is not None and self.seen and new:
            p = 1.0 if self.align == "official" else 2.0
            gamma = self.norm_ratio(head.weight, self.seen, new, p)
            if self.align == "official":
                gamma = min(gamma, 1.0)
            with torch.no_grad():
                head.weight[new] *= gamma
            self.gammas.append(gamma)
        self.seen = self.seen + new
        self._update_memory(ctx, task)
        self._teacher_state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        self._teacher = None

    @torch.no_grad()
    def _update_memory(self, ctx: Context, task: Task) -> None:
        per = self.memory // max(1, len(self.seen))
        keep_x, keep_y = [], []
        if self.mem_x is not None:
            for c in torch.unique(self.mem_y).tolist():  # iCaRL's reduction: a prefix of the herding order
                idx = torch.nonzero(self.mem_y == c).flatten()[:per]
                keep_x.append(self.mem_x[idx])
                keep_y.append(self.mem_y[idx])
        x, y = task.train.tensors
        tap = FeatureTap(self._attach(ctx))
        was = ctx.model.training
        ctx.model.eval()
        try:
            feats = []
            for part in torch.arange(len(y)).split(1024):
                ctx.model(x[part].to(ctx.device))
                feats.append(tap.features.detach().flatten(1).cpu())
        finally:
            tap.remove()
            ctx.model.train(was)
        chosen = herding_per_class(torch.cat(feats), y, per)
        for idx in chosen.values():
            keep_x.append(x[idx])
            keep_y.append(y[idx])
        self.mem_x, self.mem_y = torch.cat(keep_x), torch.cat(keep_y)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen), "mem_x": self.mem_x if self.mem_x is not None else torch.zeros(0),
                "mem_y": self.mem_y, "gammas": list(self.gammas),
                "teacher": self._teacher_state if self._teacher_state is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, validated whole first (classes, a memory of at most
        ``memory`` labelled rows, finite gammas and teacher tensors); the teacher is checked
        against the model when first used. A state that fails changes nothing."""
        _checks.state_mapping("state", state, ("seen", "mem_x", "mem_y", "gammas", "teacher"))
        seen = state["seen"]
        if not isinstance(seen, (list, tuple)):
            raise TypeError(f"state['seen']: expected a list of class ids, got {type(seen).__name__}")
        seen = [_checks.state_int(f"state['seen'][{i}]", c) for i, c in enumerate(seen)]
        mem_y = _checks.tensor("state['mem_y']", state["mem_y"], dtype=torch.int64, ndim=1)
        if len(mem_y) > self.memory:
            raise ValueError(f"state['mem_y']: {len(mem_y)} exemplars, more than memory = {self.memory}")
        mem_x = _checks.tensor("state['mem_x']", state["mem_x"])
        if mem_x.dim() == 0 or mem_x.shape[0] != len(mem_y):
            raise ValueError(f"state['mem_x']: expected {len(mem_y)} rows like state['mem_y'], got "
                             f"{_checks.describe(mem_x)}")
        _checks.finite("state['mem_x']", mem_x)
        gammas = state["gammas"]
        if not isinstance(gammas, (list, tuple)):
            raise TypeError(f"state['gammas']: expected a list of numbers, got {type(gammas).__name__}")
        gammas = [_checks.real(f"state['gammas'][{i}]", g) for i, g in enumerate(gammas)]
        teacher = _checks.state_mapping("state['teacher']", state["teacher"])
        for k, v in teacher.items():  # finite values are not required: buffers may hold inf by design
            _checks.tensor(f"state['teacher'][{k!r}]", v)
        self.seen, self.gammas = seen, gammas
        self.mem_y = mem_y.clone()
        self.mem_x = mem_x.clone() if len(mem_y) else None
        self._teacher_state = {k: v.clone() for k, v in teacher.items()} or None
        self._teacher = None
