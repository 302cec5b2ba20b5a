"""The best pure-torch formulation of every primitive.

This module is two things at once: the oracle the Rust and CUDA kernels are tested against,
and the fallback that runs on devices without a kernel (see ``_backend.py``). It is written
for clarity and for speed within torch (vectorised, no per-element Python), never the slow
way the public code does it: those baselines live in ``benches/``.

Sections follow the five families of DESIGN.md; each function has the same signature and
semantics as the public primitive of the same name.
"""

from __future__ import annotations

import torch  # noqa: F401  (used by every section)

# ---------------------------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# importance
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# subspace
# ---------------------------------------------------------------------------------------------


def project_out_(grads: list[torch.Tensor], bases: list[torch.Tensor]) -> None:
    """``G <- G - (G U) U^T`` per layer: two thin matmuls, never the dense ``U U^T``."""
    for g, u in zip(grads, bases):
        if u.shape[1] and g.numel():
            g.sub_((g @ u) @ u.T)


def project_out_flat_(g: torch.Tensor, vectors: torch.Tensor) -> None:
    """``g <- g - V^T (V g)`` for orthonormal rows ``V`` (rank, n)."""
    if vectors.shape[0] and g.numel():
        g.sub_(vectors.T @ (vectors @ g))


def orthonormalize(vectors: torch.Tensor, tol: float) -> tuple[torch.Tensor, list[int]]:
    """Gram-Schmidt twice over the rows (float64 dots); drops rows whose residual <= tol * norm."""
    v64 = vectors.to(torch.float64)
    kept: list[int] = []
    out: list[torch.Tensor] = []
    for i in range(v64.shape[0]):
        v = v64[i].clone()
        n0 = torch.linalg.vector_norm(v)
        for _ in range(2):
            for q in out:
                v -= (v @ q) * q
        n = torch.linalg.vector_norm(v)
        if n == 0 or n <= tol * n0:
            continue
        out.append(v / n)
        kept.append(i)
    res = torch.stack(out) if out else v64.new_zeros((0, v64.shape[1]))
    return res.to(vectors.dtype), kept


def subspace_count(lam: torch.Tensor, total: float, res: float, old_rank: int, threshold: float,
                   criterion: str, count: str, ratio: float | None) -> int:
    """How many of the descending energies ``lam`` a criterion adds (see ``extend_basis``)."""
    lam = lam.to(torch.float64)
    avail = int((lam > 0).sum())
    if criterion == "energy":
        if old_rank == 0 and count == "official":
            # GPM's first task: sum(cumsum(sigma^2)/total < threshold).
            k = int((torch.cumsum(lam, 0) / total < threshold).sum())
        else:
            acc = (total - res) / total + torch.cat([lam.new_zeros(1), torch.cumsum(lam, 0)[:-1]]) / total
            # add direction j while the energy captured before it is still below threshold
            below = (acc < threshold).to(torch.int64)
            k = int(torch.cumprod(below, 0).sum())
    else:
        r_bar = ratio if ratio is not None else (res / total) ** 0.5
        eps_p = (r_bar - (1.0 - threshold)) / r_bar if r_bar > 0 else -1.0
        over = torch.cumsum(lam, 0) / res > eps_p
        k = int(torch.nonzero(over)[0, 0]) + 1 if bool(over.any()) else len(lam)
        k = max(k, 1)
    return min(k, avail)


def extend_basis(basis: torch.Tensor, reps: torch.Tensor, threshold: float, *, criterion: str = "energy",
                 count: str = "official", ratio: float | None = None) -> torch.Tensor:
    """Grow ``basis`` (dim, rank) from ``reps`` (dim, n): residual, SVD, criterion, re-orthonormalise.

    Computed in float64 with one SVD of the residual (GPM's code takes two, the second only for
    the total energy, which is ``||A||_F^2``). New columns are made orthonormal to the old ones
    by projecting twice and a QR; the old columns come back unchanged.
    """
    d, r0 = basis.shape
    if r0 >= d or reps.shape[1] == 0:
        return basis.clone()
    u = basis.to(torch.float64)
    a = reps.to(torch.float64)
    res = a - u @ (u.T @ a) if r0 else a
    total = float((a * a).sum())
    res_e = float((res * res).sum())
    if total == 0 or res_e <= total * 1e-12:
        return basis.clone()
    left, sig, _ = torch.linalg.svd(res, full_matrices=False)
    lam = sig * sig
    m = min(res.shape)
    lam = torch.where(lam > lam.max() * m * torch.finfo(torch.float32).eps, lam, torch.zeros_like(lam))
    k = min(subspace_count(lam, total, res_e, r0, threshold, criterion, count, ratio), d - r0)
    if k == 0:
        return basis.clone()
    w = left[:, :k]
    for _ in range(2):
        if r0:
            w = w - u @ (u.T @ w)
    q, _ = torch.linalg.qr(w)
    return torch.cat([basis, q.to(basis.dtype)], dim=1)


# ---------------------------------------------------------------------------------------------
# kvscore
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# spectral
# ---------------------------------------------------------------------------------------------
