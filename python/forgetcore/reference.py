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


# ---------------------------------------------------------------------------------------------
# kvscore
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# spectral
# ---------------------------------------------------------------------------------------------

# Singular values in float64 (the spec's pitfall: a bf16/float32 SVD is unreliable for kappa),
# matrices of one shape batched into one call; >= 3-D tensors are read as (out, in*k*k).


_INF = float("inf")


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    rest = 1
    for d in w.shape[1:]:
        rest *= d
    return w.detach().reshape(w.shape[0], rest)


def singular_values(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values, descending, float64, of every matrix (on its own device)."""
    mats = [_as_matrix(w) for w in matrices]
    out: list[torch.Tensor | None] = [None] * len(mats)
    groups: dict[tuple[int, int, torch.device], list[int]] = {}
    for i, w in enumerate(mats):
        groups.setdefault((w.shape[0], w.shape[1], w.device), []).append(i)
    for (m, n, dev), idx in groups.items():
        if m == 0 or n == 0:
            for i in idx:
                out[i] = torch.zeros(0, dtype=torch.float64, device=dev)
            continue
        s = torch.linalg.svdvals(torch.stack([mats[i] for i in idx]).to(torch.float64))
        for j, i in enumerate(idx):
            out[i] = s[j]
    return [s for s in out if s is not None]


def kappa_from_singular_values(s: torch.Tensor, shape: tuple[int, int], resolution: float | None = None) -> float:
    """sigma_max / sigma_min; inf when sigma_min <= resolution * sigma_max.

    The default resolution, max(m, n) * eps(float64), is the rounding noise of a float64 SVD:
    a smaller sigma_min carries no information (the matrix is singular to working precision).
    """
    if s.numel() == 0:
        return _INF
    res = max(shape) * torch.finfo(torch.float64).eps if resolution is None else resolution
    smax, smin = float(s[0]), float(s[-1])
    return _INF if smax <= 0.0 or smin <= smax * res else smax / smin


def kappa(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Condition number of every matrix, float64 on the CPU (inf when singular, see above)."""
    svs = singular_values(matrices)
    return torch.tensor([kappa_from_singular_values(s, tuple(_as_matrix(w).shape))
                         for s, w in zip(svs, matrices)], dtype=torch.float64)


def spectral_norm(matrices: list[torch.Tensor], tol: float = 1e-6, max_iter: int = 100,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Power iteration on W^T W per matrix: (estimates, iterations, converged), float64 math.

    Same stopping rule as the Rust kernel: successive estimates ||W v|| within ``tol`` relative.
    """
    g = torch.Generator().manual_seed(int(seed))
    vals, iters, conv = [], [], []
    for w in matrices:
        a = _as_matrix(w).to(torch.float64)
        v = (torch.rand(a.shape[1], generator=g, dtype=torch.float64) - 0.5).to(a.device)
        v = v / v.norm()
        prev, est, done, it = 0.0, 0.0, False, 0
        for it in range(1, max_iter + 1):
            u = a @ v
            est = float(u.norm())
            wv = a.T @ u
            nw = float(wv.norm())
            if nw == 0.0:
                done = est == 0.0
                break
            if it > 1 and abs(est - prev) <= tol * est:
                done = True
                break
            prev = est
            v = wv / nw
        else:
            est = prev
        vals.append(est)
        iters.append(it)
        conv.append(done)
    return (torch.tensor(vals, dtype=torch.float64), torch.tensor(iters, dtype=torch.int64),
            torch.tensor(conv, dtype=torch.bool))
