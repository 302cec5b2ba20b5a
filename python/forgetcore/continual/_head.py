"""The output layer of a classifier, and the features that enter it (shared by UER and WA)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def find_head(model: nn.Module, name: str | None, *, bias_free: bool, method: str) -> nn.Linear:
    """The Linear output layer ``name`` (default: the model's last ``nn.Linear``)."""
    if name is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"model: {method} needs an nn.Linear output layer, found none")
        head = linears[-1]
    else:
        head = dict(model.named_modules()).get(name)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"head: expected the name of an nn.Linear module of the model, got {name!r}")
    if bias_free and head.bias is not None:
        raise ValueError(f"model: {method} needs a bias-free output layer (nn.Linear(..., bias=False)): "
                         f"with a bias the logit is not |W_c| |h| cos(theta), got a biased head")
    return head


class FeatureTap:
    """Keeps the last input of a module (the penultimate features) through a forward pre-hook."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.features: torch.Tensor | None = None
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any) -> None:
        self.features = args[0]

    def remove(self) -> None:
        self._handle.remove()
