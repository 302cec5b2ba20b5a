"""GPM: Gradient Projection Memory, as a plugin of ``forgetcore.continual.Trainer``.

Saha, Garg, Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021.

What runs (Algorithm 1 of the paper, as ``main_pmnist.py`` / ``main_cifar100.py`` of the official
code do it):

- after each task (``after_task``): the representation matrix of every Linear/Conv2d layer from
  ``n_samples`` random training examples of the finished task (inputs as columns; conv inputs
  as patches, Sec. 4 "Conv layers"), and the layer's basis grows with the energy criterion of
  Eq. 8-9 (``subspace.extend_basis(criterion="energy")``): on the first task
  ``count="official"`` keeps ``sum(cumsum(sigma^2)/||A||^2 < threshold)`` directions as the code
  does (``count="reach"``: the fewest that reach the threshold); on later tasks the residual
  ``A - U U^T A`` adds directions while the captured energy is below the threshold;
- on every later step (``after_backward``): ``grad_l <- grad_l - (grad_l U_l) U_l^T`` for every
  layer weight (Eq. 10), through the Rust kernel, with two thin matmuls instead of GPM's dense
  ``U U^T``;
- like the official code, after the first task the gradients of the 1-D parameters of the
  projected part of the network are zeroed (``freeze_1d``), since their inputs are not
  represented: the official code zeroes the 1-D parameters among the first k named parameters
  (``k < 15`` in ``main_cifar100.py``: conv1..fc2 with their batch-norm parameters, never the
  head). Here that part is every parameter in model order up to and including the last
  protected layer's own bias, the output layer (the last Linear/Conv2d of the model) excluded,
  so a biased head (``nn.Linear(100, 10)``) can still learn the new classes' biases.

First-task rule: ``count`` applies to the first task only. On later tasks a layer whose basis is
still empty (its first basis came out empty) gets the later-task rule, as in the official code
(there the first-task branch runs only for ``task_id == 0``): directions are added while the
captured energy is below the threshold, i.e. the fewest that reach it.

Under ``torch.distributed`` (every rank with the whole task and the same model, e.g. through
``forgetcore.distributed.ShardBatches``) each rank computes the representations of its share of
the sampled examples and the Gram ``A A^T`` is all-reduced (``distributed.gram_root``), so every
rank grows the single process's basis; a checksum all-gather then checks that the bases agree.

Thresholds: one number, or one per layer in model order (PMNIST: ``[0.95, 0.99, 0.99]``), plus
``threshold_inc * task_id`` (CIFAR-100: 0.97 + 0.003 t). Departures: bases grow with an exact
re-orthonormalisation of the new directions (the code appends raw singular vectors), and conv
patches follow each layer's own stride and padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from .. import _checks, distributed
from ..subspace import COUNTS, GradientProjector, Subspace

log = logging.getLogger(__name__)

__all__ = ["GPM"]


class GPM:
    """Gradient Projection Memory (Saha et al., ICLR 2021) as a Trainer plugin.

    Args:
        threshold: energy threshold in (0, 1], or one per layer (model order).
        threshold_inc: added to every threshold per finished task (``th + inc * task_id``, capped at 1).
        n_samples: training examples of the finished task used for its representations.
        count: ``"official"`` or ``"reach"`` (first-task count, see module docstring).
        layers: names of the Linear/Conv2d modules to protect (default: all).
        freeze_1d: after the first task, zero the gradients of the 1-D parameters (biases, norm
            layers) of the projected part of the network, never the output layer's (see above).
        seed: which examples are sampled.
    """

    def __init__(self, threshold: float | Sequence[float] = 0.97, *, threshold_inc: float = 0.0,
                 n_samples: int = 300, count: str = "official", layers: Sequence[str] | None = None,
                 freeze_1d: bool = True, seed: int = 0):
        if isinstance(threshold, (str, bytes)) or not isinstance(threshold, (int, float, Sequence)):
            raise TypeError(f"threshold: expected a number or a list of numbers, got {type(threshold).__name__}")
        ths = [threshold] if isinstance(threshold, (int, float)) else list(threshold)
        if not ths:
            raise ValueError("threshold: expected a number or a non-empty list")
        self.thresholds = [_checks.real("threshold", t, low=0.0, high=1.0, low_open=True) for t in ths]
        self.threshold_inc = _checks.real("threshold_inc", threshold_inc, low=0.0)
        self.n_samples = _checks.positive_int("n_samples", n_samples)
        if count not in COUNTS:
            raise ValueError(f"count: expected one of {COUNTS}, got {count!r}")
        self.count = count
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise TypeError(f"layers: expected a list of module names, got {layers!r}")
        self.layers = None if layers is None else list(layers)
        if not isinstance(freeze_1d, bool):
            raise TypeError(f"freeze_1d: expected a bool, got {type(freeze_1d).__name__}")
        self.freeze_1d = freeze_1d
        self.seed = _checks.seed(seed)
        self.subspace = Subspace()
        self.tasks_done = 0
        self._projector: GradientProjector | None = None
        self._model: torch.nn.Module | None = None
        self._frozen: list[torch.nn.Parameter] = []

    def _proj(self, model: torch.nn.Module) -> GradientProjector:
        if self._projector is None or self._model is not model:
            proj = GradientProjector(model, self.subspace, layers=self.layers)
            n = len(proj.layers)
            if len(self.thresholds) not in (1, n):
                raise ValueError(f"threshold: expected 1 or {n} values (one per layer), got {len(self.thresholds)}")
            # A loaded basis is checked against the model once the model is known (here).
            for name, dim in self.subspace.dims().items():
                layer = proj.layers.get(name)
                if layer is None:
                    raise ValueError(f"state['subspace']['bases'][{name!r}]: not a protected layer of the model")
                want = layer.weight[0].numel()  # in_features, or in_channels * kh * kw
                if dim != want:
                    raise ValueError(f"state['subspace']['bases'][{name!r}]: expected {want} rows like the "
                                     f"layer's input, got {dim}")
            self._projector, self._model = proj, model
            self._frozen = _projected_1d(model, list(proj.layers))
        return self._projector

    def _layer_thresholds(self, names: list[str], task_id: int) -> dict[str, float]:
        base = self.thresholds * len(names) if len(self.thresholds) == 1 else self.thresholds
        return {n: min(1.0, t + self.threshold_inc * task_id) for n, t in zip(names, base)}

    # ---- Trainer hooks
    def before_task(self, ctx: Any, task: Any) -> None:
        self._proj(ctx.model)

    def after_backward(self, ctx: Any) -> None:
        if self.tasks_done == 0:
            return
        self._proj(ctx.model).project_()
        if self.freeze_1d:
            for p in self._frozen:
                if p.grad is not None:
                    p.grad.zero_()

    def after_task(self, ctx: Any, task: Any) -> None:
        proj = self._proj(ctx.model)
        x = task.train.tensors[0]
        g = torch.Generator().manual_seed(self.seed * 7919 + int(getattr(task, "id", self.tasks_done)))
        idx = torch.randperm(len(x), generator=g)[: self.n_samples]
        # Under torch.distributed each rank takes every W-th sampled example and the Gram is
        # all-reduced (gram_root): the basis equals the single process's on all n_samples.
        idx = idx[distributed.rank()::distributed.world_size()]
        reps = {n: distributed.gram_root(a) for n, a in proj.representations(x[idx].to(ctx.device)).items()}
        ths = self._layer_thresholds(list(proj.layers), self.tasks_done)
        # The first-task count only for the first task: a basis still empty later gets the
        # later-task rule (add while below the threshold), which is the "reach" count.
        count = self.count if self.tasks_done == 0 else "reach"
        added = self.subspace.extend({n: a.cpu() for n, a in reps.items()}, ths, criterion="energy",
                                     count=count)
        distributed.check_agree("basis", self.subspace.state_dict())
        self.tasks_done += 1
        log.info("GPM after task %d: added %s, ranks %s", self.tasks_done - 1, added, self.subspace.ranks())

    def state_dict(self) -> dict[str, Any]:
        return {"subspace": self.subspace.state_dict(), "tasks_done": self.tasks_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, validated whole first (keys, ``tasks_done`` a
        non-negative int, every basis orthonormal); a state that fails changes nothing."""
        _checks.state_mapping("state", state, ("subspace", "tasks_done"))
        tasks_done = _checks.state_int("state['tasks_done']", state["tasks_done"])
        _checks.state_mapping("state['subspace']", state["subspace"], ("bases",))
        self.subspace.load_state_dict(state["subspace"])  # checks every basis, then applies
        self.tasks_done = tasks_done


def _projected_1d(model: torch.nn.Module, layers: list[str]) -> list[torch.nn.Parameter]:
    """The 1-D parameters of the projected part of ``model``: in ``named_parameters`` order, those
    up to and including the last protected layer's own parameters, minus the output layer's (the
    last Linear/Conv2d module)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    head = convs[-1] if convs else None
    body = [n for n in layers if n != head]
    if not body:
        return []

    def owner(param_name: str) -> str:
        return param_name.rsplit(".", 1)[0] if "." in param_name else ""

    named = list(model.named_parameters())
    names = [n for n, _ in named]
    last = max(names.index(f"{n}.weight" if n else "weight") for n in body)
    last_owner = owner(names[last])
    return [p for i, (n, p) in enumerate(named)
            if p.dim() == 1 and (i < last or owner(n) == last_owner) and owner(n) != head]
