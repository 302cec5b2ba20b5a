"""Metrics of continual learning over the accuracy matrix.

``R[i][j]`` is the accuracy on task j's test set after training on tasks 0..i (0-based here;
the papers count from 1). ``R`` may hold fewer rows than columns (a run still going, or the
trainer's rows for every task, seen or not): with ``n`` rows, every metric describes the model
after task ``n - 1`` and uses only columns ``j < n`` (plus ``b``). Metrics keep ``R``'s unit
(fractions from :class:`forgetcore.continual.Trainer`; percentages if you pass percentages).

- :func:`average_accuracy`: ACC (Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual
  Learning", NeurIPS 2017, Sec. 2; "A_k" in Chaudhry et al. 2018).
- :func:`backward_transfer`: BWT (GEM, Sec. 2).
- :func:`forward_transfer`: FWT (GEM, Sec. 2).
- :func:`average_forgetting`: F_k (Chaudhry, Dokania, Ajanthan and Torr, "Riemannian Walk for
  Incremental Learning: Understanding Forgetting and Intransigence", ECCV 2018, the forgetting
  measure of its evaluation section).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def accuracy_matrix(R: Any) -> np.ndarray:
    """``R`` as a float64 array of shape (n, T) with 1 <= n <= T, checked.

    Accepts a nested list (``None`` for entries not measured), a numpy array, a torch tensor, or
    the dict :meth:`forgetcore.continual.Trainer.fit` returns (its ``"R"``). Entries that a
    metric uses (the lower triangle with the diagonal, and the first superdiagonal for forward
    transfer) must be finite; those above may be NaN/None.
    """
    if isinstance(R, Mapping):
        if "R" not in R:
            raise ValueError("R: expected a matrix or a Trainer.fit() result with key 'R', "
                             f"got a dict with keys {sorted(R)}")
        R = R["R"]
    if isinstance(R, torch.Tensor):
        R = R.detach().cpu().numpy()
    try:
        a = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"R: expected a 2-D matrix of numbers, got {type(R).__name__} ({e})") from None
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[0] > a.shape[1]:
        raise ValueError(f"R: expected a matrix of shape (n, T) with 1 <= n <= T, got shape {a.shape}")
    n = a.shape[0]
    if not np.isfinite(a[:, :n][np.tril_indices(n)]).all():
        raise ValueError("R: expected finite accuracies on and below the diagonal, got NaN/inf/None")
    return a


def average_accuracy(R: Any) -> float:
    """ACC = (1/n) sum_{j<n} R[n-1][j]: mean accuracy over the tasks trained so far.

    GEM (Lopez-Paz and Ranzato 2017): ACC = (1/T) sum_i R_{T,i}.
    """
    a = accuracy_matrix(R)
    n = a.shape[0]
    return float(a[n - 1, :n].mean())


def backward_transfer(R: Any) -> float:
    """BWT = 1/(n-1) sum_{j<n-1} (R[n-1][j] - R[j][j]): how training later tasks changed earlier ones.

    GEM (Lopez-Paz and Ranzato 2017): BWT = 1/(T-1) sum_{i=1}^{T-1} (R_{T,i} - R_{i,i}).
    Negative values are forgetting. Needs at least two trained tasks.
    """
    a = accuracy_matrix(R)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"R: backward transfer needs at least 2 trained tasks (rows), got {n}")
    j = np.arange(n - 1)
    return float((a[n - 1, j] - a[j, j]).mean())


def forward_transfer(R: Any, b: Any) -> float:
    """FWT = 1/(n-1) sum_{j=1}^{n-1} (R[j-1][j] - b[j]): accuracy on a task before training on it,
    against ``b[j]``, the accuracy of a randomly initialised model on task j.

    GEM (Lopez-Paz and Ranzato 2017): FWT = 1/(T-1) sum_{i=2}^{T} (R_{i-1,i} - b_i).
    (:meth:`Trainer.fit` returns ``b`` as ``"initial"`` when the model starts untrained.) In
    class-incremental learning R[j-1][j] is about 0 (the classes were never seen), so FWT mostly
    measures how far below chance the model falls; it is informative in domain-incremental streams.
    """
    a = accuracy_matrix(R)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"R: forward transfer needs at least 2 trained tasks (rows), got {n}")
    bb = np.array(b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if bb.ndim != 1 or len(bb) < n:
        raise ValueError(f"b: expected one accuracy per task (at least {n}), got shape {bb.shape}")
    j = np.arange(1, n)
    d = a[j - 1, j] - bb[j]
    if not np.isfinite(d).all():
        raise ValueError("R: forward transfer needs finite R[j-1][j] and b[j], got NaN/inf")
    return float(d.mean())


def average_forgetting(R: Any) -> float:
    """F = 1/(n-1) sum_{j<n-1} f_j, with f_j = max_{l<n-1} R[l][j] - R[n-1][j].

    Chaudhry et al. 2018 (RWalk): forgetting of task j after task k is the drop from
    the best accuracy it ever had at an earlier point, f_j^k = max_{l in 1..k-1} a_{l,j} - a_{k,j},
    averaged over j < k. As in the paper the max runs over every earlier row, including rows
    before task j was trained (those are rarely the max). Avalanche instead takes the accuracy
    right after task j was trained; the two differ only when an earlier task's accuracy rose
    later and fell again. Needs at least two trained tasks.
    """
    a = accuracy_matrix(R)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"R: forgetting needs at least 2 trained tasks (rows), got {n}")
    best = np.nanmax(a[: n - 1, : n - 1], axis=0)  # entries above the diagonal may be NaN
    return float((best - a[n - 1, : n - 1]).mean())


def summary(R: Any, b: Any = None) -> dict[str, float]:
    """All metrics of one run: ``acc``, ``forgetting``, ``bwt`` and, given ``b``, ``fwt``.

    With a single trained task the transfer metrics are undefined and left out.
    """
    a = accuracy_matrix(R)
    out = {"acc": average_accuracy(a)}
    if a.shape[0] >= 2:
        out["forgetting"] = average_forgetting(a)
        out["bwt"] = backward_transfer(a)
        if b is not None:
            out["fwt"] = forward_transfer(a, b)
    return out
