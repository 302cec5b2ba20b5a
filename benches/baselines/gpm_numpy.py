"""GPM's own way (Saha et al., ICLR 2021, main_pmnist.py), written here as a benchmark baseline.

- Projection: a dense (in x in) projector P = U U^T built once per task, then every step
  ``grad <- grad - grad.view(out, -1) @ P``.
- Basis update: numpy, two SVDs per layer (one of the raw representation for the total energy,
  one of the residual ``A - U U^T A``), the energy loop, and ``np.hstack`` of the new columns.
"""

from __future__ import annotations

import numpy as np
import torch


def dense_projectors(bases: list[torch.Tensor]) -> list[torch.Tensor]:
    return [u @ u.T for u in bases]


def project_dense(grads: list[torch.Tensor], projectors: list[torch.Tensor]) -> None:
    for g, p in zip(grads, projectors):
        g.data = g.data - torch.mm(g.data.view(g.shape[0], -1), p).view(g.shape)


def update_bases(bases: list[np.ndarray], reps: list[np.ndarray], threshold: float) -> list[np.ndarray]:
    out = []
    for u, a in zip(bases, reps):
        _, s1, _ = np.linalg.svd(a, full_matrices=False)
        total = (s1 ** 2).sum()
        a_hat = a - np.dot(np.dot(u, u.T), a)
        uh, s, _ = np.linalg.svd(a_hat, full_matrices=False)
        ratio = s ** 2 / total
        acc = (total - (s ** 2).sum()) / total
        r = 0
        for share in ratio:
            if acc < threshold:
                acc += share
                r += 1
            else:
                break
        if r == 0:
            out.append(u)
            continue
        ui = np.hstack((u, uh[:, :r]))
        out.append(ui[:, : ui.shape[0]] if ui.shape[1] > ui.shape[0] else ui)
    return out
