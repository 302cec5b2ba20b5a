"""Masked ("simulated eviction") rules over a full attention matrix, built on the kvscore kernels.

The papers' lm-eval experiments do not drop KV entries: they compute every attention row and
mask out the keys an eviction policy would have dropped. These functions reproduce those
rules with :mod:`forgetcore.kvscore` so the kernels can be checked against the official code
(``tests/test_kvscore.py`` compares them with transcriptions kept in ``benches/baselines``):

- :func:`a2sf_mask` — A2SF's ``a2s_base_mask`` (variant A of the spec): warm-up over the
  first ``n_sink + n_select + n_recent`` rows, then per row: renormalise over the kept keys,
  ``S <- alpha S + p``, evict the lowest score outside sinks and the recent window (+inf marks
  evicted keys; ``alpha = 0`` keeps only the +inf entries before adding).
- :func:`h2o_mask` — H2O's ``local_heavy_hitter_mask`` (heavy part): keep the top ``h - 1``
  accumulated scores plus the current token; scores grow by the full (not renormalised)
  softmax row and evicted keys' scores are zeroed.
"""

from __future__ import annotations

import torch

from .. import _checks, kvscore


def _probs(logits: torch.Tensor) -> torch.Tensor:
    _checks.tensor("logits", logits, ndim=4)
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits: expected square (batch, heads, L, L), got {_checks.describe(logits)}")
    L = logits.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=logits.device).tril()
    return torch.softmax(logits.float().masked_fill(~causal, float("-inf")), dim=-1)


def a2sf_mask(logits: torch.Tensor, n_sink: int, n_select: int, n_recent: int, alpha: float) -> torch.Tensor:
    """bool (B, H, L, L): keys visible to each query under A2SF's step-wise masked rule."""
    p = _probs(logits)
    b, h, L, _ = p.shape
    budget = n_sink + n_select + n_recent
    s = torch.zeros(b, h, L)
    pos = torch.arange(L).expand(b, h, L).contiguous()
    kept = torch.ones(b, h, L, dtype=torch.bool)
    for i in range(min(budget, L)):
        kvscore.accumulate_(s, p[:, :, i:i + 1].contiguous(), alpha)
    mask = torch.ones(b, h, L, L, dtype=torch.bool)
    for t in range(budget, L - 1):
        valid = kept & (pos <= t)
        kvscore.accumulate_(s, p[:, :, t:t + 1].contiguous(), alpha, renorm=True, valid=valid)
        ev = kvscore.evict_one(s, n_sink, n_recent, pos, valid)[..., None]
        s.scatter_(-1, ev, float("inf"))
        kept.scatter_(-1, ev, False)
        mask[:, :, t + 1] = kept
    return mask & torch.ones(L, L, dtype=torch.bool).tril()


def h2o_mask(logits: torch.Tensor, heavy_budget: int) -> torch.Tensor:
    """bool (B, H, L, L): H2O's heavy-hitter mask (``local_heavy_hitter_mask``), causal part."""
    p = _probs(logits)
    b, h, L, _ = p.shape
    hb = heavy_budget
    s = torch.zeros(b, h, L)
    pos = torch.arange(L).expand(b, h, L).contiguous()
    for i in range(min(hb, L)):
        kvscore.accumulate_(s, p[:, :, i:i + 1].contiguous(), 1.0)
    mask = torch.zeros(b, h, L, L, dtype=torch.bool)
    mask[:, :, :hb, :hb] = True
    kept = pos < hb
    for t in range(hb, L):
        ev = kvscore.evict_one(s, 0, 0, pos, kept)[..., None]
        kept.scatter_(-1, ev, False)
        kept[:, :, t] = True
        mask[:, :, t] = kept
        kvscore.accumulate_(s, p[:, :, t:t + 1].contiguous(), 1.0)
        s.mul_(kept)
    return mask & torch.ones(L, L, dtype=torch.bool).tril()
