"""One shape for the selective and regularised fine-tuning methods, and the two loops that drive it.

A method is an object with

- ``prepare(model)``: once, before training: freeze weights, record references;
- ``penalty(model, batch, outputs) -> Tensor``: a term added to the task loss at every step
  (a zero tensor where the method has none);
- ``after_stage(model)``: at the end of each stage (a task in continual learning, an epoch in
  multi-epoch fine-tuning): redraw masks, merge adapters, accumulate positions;
- ``state_dict()`` / ``load_state_dict(state)`` (``torch.load(..., weights_only=True)``-safe).

:class:`FinetunePlugin` runs such a method in :class:`forgetcore.continual.Trainer` (a stage is a
task), :class:`FinetuneCallback` in a Hugging Face ``transformers.Trainer`` run (a stage is an
epoch), so the same object trains a small MLP on digits and SmolLM2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import _checks

__all__ = ["FinetuneCallback", "FinetuneMethod", "FinetunePlugin", "check_state", "trainable_parameters"]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that require grad: build the optimiser from these only, so that frozen
    tensors get no optimiser state and weight decay cannot move them."""
    return [p for p in model.parameters() if p.requires_grad]


def check_state(state: Any, need: set[str], ints: dict[str, int] = {}) -> None:  # noqa: B006 (read only)
    """Raise unless ``state`` is a dict with the keys ``need`` and, for each ``ints`` key, an int at
    least its value (the shared first checks of every ``load_state_dict`` of this family)."""
    if not isinstance(state, dict) or not need <= state.keys():
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state: expected keys {sorted(need)}, got {got}")
    for key, low in ints.items():  # seeds reach 2**64 - 1, as `_checks.seed` allows
        _checks.state_int(f"state[{key!r}]", state[key], low=low, high=2**64 - 1)


class FinetuneMethod:
    """Base class: every step is a no-op until a method overrides it."""

    def prepare(self, model: torch.nn.Module) -> None:
        pass

    def penalty(self, model: torch.nn.Module, batch: Any, outputs: Any) -> torch.Tensor:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")

    def after_stage(self, model: torch.nn.Module) -> None:
        pass

    def reapply(self, model: torch.nn.Module) -> None:
        """Re-apply what ``prepare``/``after_stage`` did to the model but ``state_dict`` does not
        hold (``requires_grad``), after ``load_state_dict`` on a fresh model."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FinetunePlugin:
    """Drive a :class:`FinetuneMethod` from :class:`forgetcore.continual.Trainer`.

    ``prepare`` runs before the first task, ``after_stage`` after every task but the last (so
    that the next task's optimiser, built after ``before_task``, sees the new mask), and the
    loss is cross-entropy plus ``penalty`` (this plugin owns the trainer's ``loss`` hook).
    Build the optimiser from :func:`trainable_parameters`.
    """

    def __init__(self, method: FinetuneMethod) -> None:
        if not callable(getattr(method, "penalty", None)) or not callable(getattr(method, "prepare", None)):
            raise TypeError(f"method: expected an object with prepare/penalty/after_stage, got {type(method).__name__}")
        self.method = method
        self.prepared = False

    def before_task(self, ctx: Any, task: Any) -> None:
        if not self.prepared:
            self.method.prepare(ctx.model)
            self.prepared = True

    def resume_task(self, ctx: Any, task: Any) -> None:
        self.method.reapply(ctx.model)

    def loss(self, ctx: Any, batch: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, batch["y"]) + self.method.penalty(ctx.model, batch, output)

    def after_task(self, ctx: Any, task: Any) -> None:
        if task.id < len(ctx.scenario) - 1:
            self.method.after_stage(ctx.model)

    def state_dict(self) -> dict[str, Any]:
        return {"prepared": self.prepared, "method": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, {"prepared", "method"})
        if not isinstance(state["prepared"], bool):
            raise TypeError(f"state: prepared must be a bool, got {type(state['prepared']).__name__}")
        self.method.load_state_dict(state["method"])  # checks its own state before it applies any
        self.prepared = state["prepared"]


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # transformers is optional: the class still exists, unusable without it
        return object
    return TrainerCallback


class FinetuneCallback(_callback_base()):  # type: ignore[misc]
    """Drive a :class:`FinetuneMethod` from a Hugging Face ``transformers.Trainer`` run.

    ``prepare`` runs at ``on_train_begin``, ``after_stage`` at the end of every epoch but the
    last. transformers builds its optimiser before ``on_train_begin`` from the parameters
    that require grad then, so every tensor the method may ever train must require grad when
    ``Trainer`` is created (a fresh model does); tensors the method freezes later keep
    ``grad=None``, which torch's optimisers skip entirely (no update, no weight decay) because
    transformers zeroes gradients with ``set_to_none``.

    A method that ADDS parameters in ``prepare`` (RegLoRA's adapters) must be prepared before
    ``transformers.Trainer`` builds its optimiser: pass ``model=`` here (it calls ``prepare``
    at once, and ``on_train_begin`` then does nothing).

    The penalty is added once per optimiser step, at ``on_step_begin``, as the gradient of
    ``penalty(model, None, None)`` (before gradient clipping); a method whose penalty needs the
    batch (GeRe) cannot be driven this way and raises there: use
    :class:`~forgetcore.finetune.GeReCallback`, which sets GeRe's objective in a forward hook.
    """

    def __init__(self, method: FinetuneMethod, model: torch.nn.Module | None = None) -> None:
        if not callable(getattr(method, "penalty", None)) or not callable(getattr(method, "prepare", None)):
            raise TypeError(f"method: expected an object with prepare/penalty/after_stage, got {type(method).__name__}")
        self.method = method
        self.penalties: list[float] = []
        self.prepared = False
        if model is not None:
            method.prepare(model)
            self.prepared = True

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not self.prepared:
            self.method.prepare(model)
            self.prepared = True

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        pen = self.method.penalty(model, None, None)
        if pen.requires_grad:
            pen.backward()
        self.penalties.append(float(pen.detach()))

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.epoch is not None and round(state.epoch) < args.num_train_epochs:
            self.method.after_stage(model)
