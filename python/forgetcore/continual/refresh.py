"""DER++ (logit replay) and refresh learning (an unlearn-then-relearn step around it).

- Buzzega, Boschini, Porrello, Abati and Calderara, "Dark Experience for General Continual
  Learning: a Strong, Simple Baseline" (NeurIPS 2020): :class:`DERpp`.
- Wang et al., "A Unified and General Framework for Continual Learning" (ICLR 2024), refresh
  learning; official code ``joey-wang123/CL-refresh-learning`` (``models/derpp.py``, the only
  model with ``unlearn``), as we read it: :class:`Refresh`, the
  ``refresh_code_v1`` version (the code, not the paper's Langevin form).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .. import _checks
from ..importance import fisher_diagonal
from ..replay import ReservoirBuffer
from .kfpf import _check_generator_state
from .scenarios import Task
from .trainer import Batch, Context, Plugin

__all__ = ["DERpp", "Refresh", "derpp_plugins", "refresh_plugins"]


class DERpp(Plugin):
    """DER++: cross-entropy on the stream, plus ``alpha * MSE(f(x1), z1)`` on buffered inputs and
    the logits stored when they were seen, plus ``beta * CE(f(x2), y2)`` on an independent second
    draw (the paper's Eq. 6; Mammoth's ``derpp.py``). The stream batch and its logits (from the
    training forward, before the step) go into a reservoir buffer after every step.

    Owns the trainer's ``loss`` hook. Class- and domain-incremental scenarios (the buffer's
    forward passes are not masked to a task's classes).

    Args: ``capacity`` (buffer size), ``alpha`` (0.1), ``beta`` (0.5), the Mammoth best-args
    values for seq-CIFAR-100 with 500 examples; ``batch_size`` per buffer draw (default: the
    stream batch's size); ``seed`` (the buffer's stream).
    """

    def __init__(self, capacity: int, alpha: float = 0.1, beta: float = 0.5, batch_size: int | None = None,
                 seed: int = 0) -> None:
        self.alpha = _checks.real("alpha", alpha, low=0.0)
        self.beta = _checks.real("beta", beta, low=0.0)
        self.batch_size = None if batch_size is None else _checks.positive_int("batch_size", batch_size)
        self.buffer = ReservoirBuffer(capacity, seed=seed)
        self._logits: torch.Tensor | None = None

    def before_task(self, ctx: Context, task: Task) -> None:
        if ctx.scenario is not None and ctx.scenario.mode == "task":
            raise ValueError("scenario: DERpp replays unmasked logits; task-incremental scenarios are not supported")

    def loss(self, ctx: Context, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        self._logits = output.detach()
        loss = F.cross_entropy(output, batch["y"])
        if len(self.buffer) > 0:
            n = min(self.batch_size or batch["n_stream"], len(self.buffer))
            dev = output.device
            m1 = self.buffer.sample(n)
            loss = loss + self.alpha * F.mse_loss(ctx.model(m1["x"].to(dev)), m1["logits"].to(dev))
            m2 = self.buffer.sample(n)
            loss = loss + self.beta * F.cross_entropy(ctx.model(m2["x"].to(dev)), m2["y"].to(dev))
        return loss

    def after_step(self, ctx: Context, batch: Batch) -> None:
        n = batch["n_stream"]
        self.buffer.add(x=batch["x"][:n].detach().cpu(), y=batch["y"][:n].cpu(), logits=self._logits[:n].cpu())

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "buffer" not in state:
            raise ValueError(f"state: expected keys ['buffer'], got {_checks.describe(state)}")
        self.buffer.load_state_dict(state["buffer"])


class Refresh(Plugin):
    """Refresh learning as coded (``refresh_code_v1``): before every learning step, on the same
    stream batch, a Fisher-damped, norm-rescaled, noisy step of gradient ASCENT.

    Per step, before the forward pass of the learning step:

    - ``Delta = lr_unlearn * grad CE(f_theta(x), y)`` (the official code takes one SGD step of
      lr 0.01 on ``-CE`` in a copy of the model; the copy is in train mode, its batch-norm
      statistics are thrown away, so here the gradient is taken without touching the model);
    - per parameter tensor: ``u = (||theta|| / (||Delta|| + 1e-20)) * Delta`` (Frobenius norms:
      ``u`` has the norm of the tensor itself), then
      ``theta += delta * (1 / (1 + 0.001 * F)) * (u + 0.001 * N(0, I))`` (the noise INSIDE the
      Fisher-scaled bracket);
    - after each task: ``F <- tau * F + F_new``, with ``F_new`` the ``p(y|x)``-weighted
      empirical Fisher over the task's training data (``forgetcore.importance.fisher_diagonal``,
      mode "empirical", with per-example loss ``sqrt(p(y|x)) * CE``, so each squared gradient is
      weighted by ``p(y|x)``), normalised by ``num_batches * batch_size`` as the official code
      does (slightly more than the example count when the last batch is partial).

    Order: the unlearn step runs BEFORE the learning step, on the same stream batch, as the official
    code's last version does: ``Derpp.observe`` in ``models/derpp.py`` calls ``self.unlearn(inputs,
    labels)`` first and then takes the DER++ step (commit 575e441, "revision", moved the call from
    after ``self.opt.step()`` to the top of ``observe``; 7c90da5, the last commit, only removes blank
    lines there). So the DER++ logits stored in the buffer are those of the refreshed model, before its
    learning step, as in the official code. Departures: the
    noise comes from the plugin's own seeded generator (the official ``randn_like`` draws from
    the global one), and the official optimiser's weight decay 1e-4 is the trainer's
    ``make_optimizer``'s business (pass ``SGD(..., weight_decay=1e-4)`` to match it).

    ``delta = 1e-5`` and ``tau = 1e-5`` are the official constants; with them the step changes
    each tensor by about 1e-5 of its norm. Use it beside :class:`DERpp` (the official base):
    ``plugins=[Refresh(...), DERpp(...)]``; the noise comes from the plugin's own generator
    (saved in its state).
    """

    def __init__(self, delta: float = 1e-5, tau: float = 1e-5, lr_unlearn: float = 0.01, seed: int = 0) -> None:
        self.delta = _checks.real("delta", delta, low=0.0)
        self.tau = _checks.real("tau", tau, low=0.0)
        self.lr_unlearn = _checks.real("lr_unlearn", lr_unlearn, low=0.0, low_open=True)
        self.seed = _checks.positive_int("seed", seed, allow_zero=True)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.fisher: dict[str, torch.Tensor] = {}

    def transform_batch(self, ctx: Context, batch: Batch) -> Batch:
        if self.delta == 0:
            return batch
        model = ctx.model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        n = batch["n_stream"]
        loss = F.cross_entropy(model(batch["x"][:n]), batch["y"][:n])
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        with torch.no_grad():
            for (name, p), g in zip(named, grads):
                step = torch.zeros_like(p) if g is None else self.lr_unlearn * g
                u = (p.norm() / (step.norm() + 1e-20)) * step
                noise = torch.randn(p.shape, generator=self.gen, dtype=p.dtype).to(p.device)
                damp = 1.0 / (1.0 + 0.001 * self.fisher[name].to(p.device)) if name in self.fisher else 1.0
                p.add_(self.delta * damp * (u + 0.001 * noise))
        return batch

    def after_task(self, ctx: Context, task: Task) -> None:
        x, y = task.train.tensors
        bs = ctx.trainer.batch_size

        def weighted_ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            ce = F.cross_entropy(out, target, reduction="none")
            return torch.exp(-ce.detach()).sqrt() * ce  # squared gradient weighted by p(y|x)

        was = ctx.model.training
        ctx.model.train()  # the official end_task leaves the model in train mode
        f_new = fisher_diagonal(ctx.model, task.train, loss_fn=weighted_ce, mode="empirical", batch_size=bs)
        ctx.model.train(was)
        scale = len(y) / (math.ceil(len(y) / bs) * bs)  # mean over examples -> over num_batches * batch_size
        for name, f in f_new.items():
            old = self.fisher.get(name)
            self.fisher[name] = f.cpu() * scale + (self.tau * old if old is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "fisher": {n: f.clone() for n, f in self.fisher.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"gen", "fisher"} <= state.keys():
            raise ValueError(f"state: expected keys ['fisher', 'gen'], got {_checks.describe(state)}")
        _check_generator_state(state["gen"], self.gen)
        fisher = state["fisher"]
        if not isinstance(fisher, dict) or not all(isinstance(n, str) and isinstance(f, torch.Tensor)
                                                   and torch.is_floating_point(f) for n, f in fisher.items()):
            raise TypeError(f"state: fisher must map parameter names to float tensors, got {_checks.describe(fisher)}")
        if not all(bool(torch.isfinite(f).all()) and bool((f >= 0).all()) for f in fisher.values()):
            raise ValueError("state: fisher must be finite and >= 0")
        self.gen.set_state(state["gen"])
        self.fisher = {n: f.clone() for n, f in fisher.items()}


def derpp_plugins(seed: int, capacity: int = 200) -> list[Plugin]:
    """DER++ for the continual demo's table (Mammoth's alpha 0.1, beta 0.5)."""
    return [DERpp(capacity, seed=seed)]


def refresh_plugins(seed: int, capacity: int = 200, delta: float = 1e-5) -> list[Plugin]:
    """DER++ with refresh learning for the continual demo's table (the official constants)."""
    return [Refresh(delta=delta, seed=seed), DERpp(capacity, seed=seed)]
