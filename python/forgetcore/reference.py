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


def accumulate_(acc: list[torch.Tensor], grads: list[torch.Tensor], scale: float = 1.0,
                mode: str = "sq") -> None:
    """``acc[t] += (g[t] * g[t]) * scale`` (``"sq"``) or ``|g[t]| * scale`` (``"abs"``), in place.

    float32 accumulators; the products are rounded in this order, which the kernels copy.
    """
    for a, g in zip(acc, grads, strict=True):
        g = g.to(torch.float32)
        a.add_((g * g if mode == "sq" else g.abs()) * scale)


def ssd_dampen_(params: list[torch.Tensor], imp_full: list[torch.Tensor],
                imp_forget: list[torch.Tensor], alpha: float, lam: float) -> torch.Tensor:
    """SSD dampening (Foster et al., AAAI 2024), one vectorised pass per tensor, in place.

    Where ``imp_forget > alpha * imp_full``: ``theta *= min(lam * imp_full / imp_forget, 1)``.
    float32 throughout, ``(lam * imp_full) / imp_forget`` in that order, as the official code.
    Returns the number of selected elements per tensor (int64, on the parameters' device).
    """
    counts = []
    for p, d, f in zip(params, imp_full, imp_forget, strict=True):
        sel = f > alpha * d
        beta = (lam * d).div_(f).clamp_(max=1.0)
        # Multiplying the unselected elements by exactly 1 leaves them bit-for-bit as they were;
        # torch.where keeps it free of host synchronisation (no boolean indexing) on CUDA.
        p.mul_(torch.where(sel, beta, 1.0))
        counts.append(sel.sum())
    if not counts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack(counts)



# ---------------------------------------------------------------------------------------------
# subspace
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# kvscore
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# spectral
# ---------------------------------------------------------------------------------------------
