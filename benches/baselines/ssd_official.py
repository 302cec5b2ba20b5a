"""SSD dampening and importance the way the official code does it (if-loops/selective-synaptic-dampening,
``src/ssd.py``, ``ParameterPerturber.modify_weight`` / ``calc_importance``), rewritten here as a baseline:
a Python loop over parameters, boolean-mask indexing, several temporaries per tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def modify_weight(params, imp_full, imp_forget, alpha: float, lam: float, exponent: float = 1.0,
                  lower_bound: float = 1.0) -> None:
    for p, oimp, fimp in zip(params, imp_full, imp_forget):
        locations = torch.where(fimp > oimp.mul(alpha))
        weight = ((oimp.mul(lam)).div(fimp)).pow(exponent)
        update = weight[locations]
        update[torch.where(update > lower_bound)] = lower_bound
        p[locations] = p[locations].mul(update)


def calc_importance(model, loader):
    """Square of each batch-mean gradient, averaged over batches (the "batch" Fisher)."""
    imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in loader:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                imp[n].data += p.grad.data.clone().pow(2)
    for n in imp:
        imp[n].data /= float(len(loader))
    return imp
