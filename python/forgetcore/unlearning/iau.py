"""IAU: Efficient Machine Unlearning via Influence Approximation.

Liu et al., "Efficient Machine Unlearning via Influence Approximation" (2025; official code
``Lolo1222/IAU``: ``train_model.py`` for the gradient restriction, ``IAU_unlearn.py`` for the
update). Two parts:

- Gradient restriction (GR), a property of how the *original* model is trained: the loss gets
  ``alpha * sum_l ||grad_{theta_l} CE||_2``, the sum of per-tensor gradient norms (not the
  global norm), through double backprop. :func:`gradient_restriction` returns that penalty for
  ``evaluation.unlearning.train_original(regulariser=...)`` (official alpha: 0.005).
- The unlearning update (:class:`IAU`): from the trained model, a fresh Adam (lr 1e-3) takes
  ONE step on ``grad mean_{retain} CE - grad mean_{forget} CE``, each mean over the whole set.
  A fresh Adam's first step is ``lr * g / (|g| + eps)``, about ``lr * sign(g)`` per parameter.

As the official code (checked): both gradients are accumulated in ``.grad`` before the single
``optimizer.step()``, the model is left in train mode while they are computed (its CNN has no
batch norm or dropout; the mode is restored here afterwards). Ours: ``batch_size`` bounds memory,
and the batched sums are weighted by batch size so they equal the full-set means.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import _checks
from ..training import device_of
from .data import UnlearnData

__all__ = ["IAU", "gradient_restriction"]


def gradient_restriction(alpha: float = 0.005) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """IAU's GR penalty: ``penalty(model, loss) = alpha * sum over trainable tensors of ||d loss / d theta||_2``.

    Built with ``create_graph=True`` so that its gradient (a Hessian-vector product) reaches the
    training step; use as ``train_original(..., regulariser=gradient_restriction(0.005))``.
    """
    alpha = _checks.real("alpha", alpha, low=0.0)

    def penalty(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return alpha * sum(torch.linalg.vector_norm(g) for g in grads)  # type: ignore[return-value]

    return penalty


def _mean_grad(model: nn.Module, ds: Dataset, params: list[nn.Parameter], batch_size: int | None,
               sign: float) -> list[torch.Tensor]:
    """``sign * grad mean CE`` over the whole dataset (batched sums weighted by batch size)."""
    n = len(ds)  # type: ignore[arg-type]
    dev = device_of(model)
    total = [torch.zeros_like(p) for p in params]
    for x, y in DataLoader(ds, batch_size=batch_size or n, shuffle=False):
        x, y = x.to(dev), y.to(dev)
        loss = F.cross_entropy(model(x), y, reduction="sum") / n
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t.add_(g, alpha=sign)
    return total


class IAU:
    """One influence-approximation step: fresh Adam, gradient of (retain loss - forget loss).

    Args:
        lr: Adam's learning rate (official: 1e-3); the first step moves each weight by about ``lr``.
        batch_size: None (default) computes each mean in one batch, as the official code;
            an int accumulates it in batches of that size (same value up to rounding).
    """

    name = "IAU"

    def __init__(self, lr: float = 1e-3, batch_size: int | None = None) -> None:
        self.lr = _checks.real("lr", lr, low=0.0, low_open=True)
        self.batch_size = None if batch_size is None else _checks.positive_int("batch_size", batch_size)

    def fit(self, model: nn.Module, data: UnlearnData) -> dict[str, Any]:
        UnlearnData.check(model, data)
        t0 = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: expected trainable parameters, got none")
        was = model.training
        model.train()
        try:
            g_r = _mean_grad(model, data.retain, params, self.batch_size, 1.0)
            g_f = _mean_grad(model, data.forget, params, self.batch_size, -1.0)
        finally:
            model.train(was)
        grads = [a + b for a, b in zip(g_r, g_f)]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise ValueError("data: the retain-minus-forget gradient is not finite (NaN/inf inputs or a diverged "
                             "model); the model was left unchanged")
        opt = torch.optim.Adam(params, lr=self.lr)  # fresh: the first step is about lr * sign(g)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p in params:
            p.grad = None
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        return {"method": self.name, "steps": 1, "grad_norm": norm, "seconds": time.perf_counter() - t0}
