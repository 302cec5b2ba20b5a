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


def kv_accumulate_(scores: torch.Tensor, attn: torch.Tensor, alpha: float, group: int = 1, *,
                   renorm: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
    """S <- alpha^q S + sum_i alpha^(q-1-i) A_i in place (float32), GQA groups summed.

    ``scores`` (B, H, T) float32; ``attn`` (B, H*group, q, T). ``renorm`` divides each query
    head's row by its sum over the ``valid`` slots (A2SF's lm-eval rule); invalid slots get
    nothing. ``alpha == 0`` keeps +inf entries (the "evicted" sentinel) and zeroes the rest.
    """
    b, h, t = scores.shape
    q = attn.shape[2]
    a = attn.to(torch.float32).reshape(b, h, group, q, t)
    if valid is not None:
        a = a * valid[:, :, None, None, :]
    if renorm:
        total = a.sum(-1, keepdim=True)
        a = torch.where(total > 0, a / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(a))
    rows = a.sum(2)  # (B, H, q, T)
    if q == 0:
        return scores
    if alpha == 0.0:
        scores.masked_fill_(torch.isfinite(scores), 0.0)
        scores.add_(rows[:, :, -1])
        return scores
    w = alpha ** torch.arange(q - 1, -1, -1, dtype=torch.float64, device=scores.device)
    scores.mul_(alpha ** q).add_((rows * w.to(torch.float32)[:, None]).sum(2))
    return scores


def _kv_tiers(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
              n_sink: int, n_recent: int) -> torch.Tensor:
    """0 = invalid, 1 = candidate, 2 = protected (first n_sink / last n_recent valid positions)."""
    big = torch.iinfo(torch.int64).max
    asc = torch.where(valid, positions, torch.full_like(positions, big)).argsort(dim=-1, stable=True)
    rank_asc = torch.empty_like(asc).scatter_(-1, asc, torch.arange(asc.shape[-1], device=asc.device).expand_as(asc))
    n_valid = valid.sum(-1, keepdim=True)
    ns = torch.clamp(n_valid, max=n_sink)
    nr = torch.minimum(n_valid - ns, torch.full_like(n_valid, n_recent))
    sink = valid & (rank_asc < ns)
    recent = valid & (rank_asc >= n_valid - nr)
    return valid.long() + (sink | recent).long()


def kv_select_keep(scores: torch.Tensor, budget: int, n_sink: int = 0, n_recent: int = 0,
                   positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Slots to keep per (batch, kv-head), ascending: int64 (B, H, budget).

    Sinks (first ``n_sink`` valid positions) and recent tokens (``n_recent`` highest valid
    positions) first, then the highest scores (ties: the later position), then, where a row
    has fewer valid slots than ``budget``, its lowest invalid slots.
    """
    b, h, t = scores.shape
    if positions is None:
        positions = torch.arange(t, device=scores.device).expand(b, h, t)
    if valid is None:
        valid = torch.ones(b, h, t, dtype=torch.bool, device=scores.device)
    tier = _kv_tiers(scores, positions, valid, n_sink, n_recent)
    slot = torch.arange(t, device=scores.device).expand(b, h, t)
    k3 = torch.where(tier == 0, -slot, positions)          # invalid: lowest slot first
    order = k3.argsort(dim=-1, descending=True, stable=True)
    k2 = torch.where(tier == 1, scores, torch.zeros_like(scores)).gather(-1, order)
    order = order.gather(-1, k2.argsort(dim=-1, descending=True, stable=True))
    order = order.gather(-1, tier.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    return order[..., :budget].sort(-1).values


def kv_evict_one(scores: torch.Tensor, n_sink: int = 0, n_recent: int = 0,
                 positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per (batch, kv-head) the lowest-scoring evictable slot (ties: the older token), or -1."""
    b, h, t = scores.shape
    if positions is None:
        positions = torch.arange(t, device=scores.device).expand(b, h, t)
    if valid is None:
        valid = torch.ones(b, h, t, dtype=torch.bool, device=scores.device)
    if t == 0:
        return torch.full((b, h), -1, dtype=torch.int64, device=scores.device)
    cand = _kv_tiers(scores, positions, valid, n_sink, n_recent) == 1
    order = positions.argsort(dim=-1, stable=True)
    s = torch.where(cand, scores, torch.full_like(scores, float("inf"))).gather(-1, order)
    order = order.gather(-1, s.argsort(dim=-1, stable=True))
    order = order.gather(-1, (~cand.gather(-1, order)).long().argsort(dim=-1, stable=True))
    first = order[..., 0]
    return torch.where(cand.any(-1), first, torch.full_like(first, -1))



# ---------------------------------------------------------------------------------------------
# spectral
# ---------------------------------------------------------------------------------------------
