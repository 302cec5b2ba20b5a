"""Replay selection and scheduling primitives: herding exemplar selection and the View-Batch
recall-interval sampler (re-exported from :mod:`forgetcore.replay`, where users import them).

- :func:`herding` / :func:`herding_per_class`: iCaRL's herding (Rebuffi, Kolesnikov, Sperl and
  Lampert, "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017, Alg. 4), the
  exemplar memory of WA (Zhao et al., CVPR 2020). Vectorised: one matrix-vector product per
  selected exemplar over the candidates, selected rows masked out. PyCIL's
  ``_construct_exemplar`` builds an (N, d) temporary and ``np.delete`` s the selected row of the
  feature and data arrays per exemplar (two copies of everything left); the selection is the
  same (``benches/bench_herding.py`` checks it and times both).
- :func:`view_batch_indices`: the recall-interval sampler of "Do Your Best and Get Enough Rest
  for Continual Learning" (CVPR 2025, arXiv 2503.18371), as ``ViewBatchReplay`` of the official
  ``hankyul2/ViewBatchModel`` builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import _checks

__all__ = ["herding", "herding_per_class", "view_batch_indices"]


def _features(name: str, features: Any) -> torch.Tensor:
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    _checks.tensor(name, features, dtype=(torch.float32, torch.float64, torch.float16, torch.bfloat16), ndim=2)
    _checks.finite(name, features)
    return features


def herding(features: Any, m: int, *, normalize: bool = True) -> torch.Tensor:
    """Indices of ``m`` exemplars of one class, in selection order, chosen by herding.

    With ``f_i`` the (L2-normalised, ``normalize=True`` as iCaRL and PyCIL) feature rows and
    ``mu`` their mean, step ``k = 1..m`` picks the unselected ``i`` minimising
    ``||mu - (f_i + sum of the selected) / k||`` (ties: the lowest index, as ``np.argmin`` over
    PyCIL's shrinking array). Every prefix of the result is the herding selection of that size,
    so iCaRL's memory reduction keeps a prefix. ``m`` is capped at the number of rows.
    Accumulates in float64; works on any device.
    """
    f = _features("features", features).to(torch.float64)
    m = _checks.positive_int("m", m, allow_zero=True)
    n = f.shape[0]
    m = min(m, n)
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=f.device)
    if normalize:
        f = f / (f.norm(dim=1, keepdim=True) + 1e-8)  # PyCIL's EPSILON
    mu = f.mean(0)
    sq = (f * f).sum(1)
    s = torch.zeros_like(mu)
    taken = torch.zeros(n, dtype=torch.bool, device=f.device)
    out = torch.empty(m, dtype=torch.long, device=f.device)
    for k in range(1, m + 1):
        # ||mu - (s + f_i)/k||^2 = ||mu - s/k||^2 - (2/k) (mu - s/k).f_i + ||f_i||^2 / k^2; the first
        # term is the same for every i, so only the last two decide.
        r = mu - s / k
        score = sq / (k * k) - (2.0 / k) * (f @ r)
        score[taken] = float("inf")
        i = int(torch.argmin(score))
        out[k - 1] = i
        taken[i] = True
        s += f[i]
    return out


def herding_per_class(features: Any, labels: Any, per_class: int, *, normalize: bool = True) -> dict[int, torch.Tensor]:
    """Herding within each class: ``{class: indices into features (selection order)}``, classes sorted."""
    f = _features("features", features)
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    _checks.tensor("labels", labels, dtype=(torch.int64, torch.int32), shape=(f.shape[0],))
    labels = labels.to(f.device)
    out = {}
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        out[int(c)] = idx[herding(f[idx], per_class, normalize=normalize)]
    return out


def view_batch_indices(n: int, epoch: int, repeat: int, seed: int | Sequence[int] = 0) -> torch.Tensor:
    """The examples epoch ``epoch`` serves under View-Batch's recall interval ``R = repeat``.

    One permutation of ``range(n)`` per block of ``R`` epochs (drawn from ``(seed, epoch // R)``),
    each example repeated ``R`` times in a row (``repeat_interleave``), and epoch ``e`` serves the
    ``(e % R)``-th of ``R`` equal slices: so every epoch has about the same number of items as
    without repeats (equal compute), an example is seen as ``R`` consecutive copies (cut a
    mini-batch size that is a multiple of ``R`` and they share a mini-batch) and then rests for
    ``R - 1`` epochs. ``R = 1`` is a plain per-epoch shuffle. ``seed`` may be several ints
    (e.g. the run's seed and the task id).

    Departure from the official code: slices hold ``(n // R) * R`` items, so groups of copies are
    never cut between epochs, and up to ``R - 1`` examples of each block's permutation are left
    out; the official code truncates every epoch to a multiple of 256 (``selected_round``), which
    on small data drops up to 255 examples per epoch.
    """
    n = _checks.positive_int("n", n)
    epoch = _checks.positive_int("epoch", epoch, allow_zero=True)
    r = _checks.positive_int("repeat", repeat)
    if r > n:
        raise ValueError(f"repeat: expected at most n = {n} (one whole group per epoch), got {r}")
    key = [int(v) for v in (np.atleast_1d(seed).tolist() + [epoch // r])]
    s = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(s))
    idx = perm.repeat_interleave(r)
    size = (n // r) * r
    part = epoch % r
    return idx[part * size:(part + 1) * size]
