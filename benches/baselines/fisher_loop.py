"""The exact empirical Fisher diagonal the slow way: one backward per sample.

This is how per-sample Fisher estimates are computed in the public continual-learning and
unlearning code (SSD repository's FisherForgetting, Mammoth's EWC-online, open-unlearning's
GradNorm MIA loop): ``batch_size=1``, ``loss.backward()``, accumulate ``p.grad ** 2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_fisher(model, x, y):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    acc = {n: torch.zeros_like(p) for n, p in named}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in named:
            acc[n] += p.grad ** 2
    for n in acc:
        acc[n] /= len(x)
    model.zero_grad()
    return acc
