"""The public code's way, kept as baselines (and as test oracles for the masked rules).

Written from reading Dirac-Notation/A2SF (utils_lm_eval/modify_llama.py @a4360f1,
utils_real_drop/kv_cache.py @f3f5b3f), FMInference/H2O (local_heavy_hitter_mask) and
NVIDIA/kvpress (ScorerPress.compress); our own transcription, not their code.
"""

from __future__ import annotations

import torch


def official_a2s_base_mask(logits, n_sink, n_select, n_recent, alpha):
    """A2SF lm-eval rule: warm-up rows, renormalised rows, argmin eviction, +inf sentinel."""
    L = logits.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    probs = torch.softmax(logits.float().masked_fill(~causal, float("-inf")), dim=-1)
    budget = n_sink + n_select + n_recent
    score = torch.zeros(probs.shape[:2] + (L,))
    mask = torch.ones(probs.shape, dtype=torch.bool)
    for i in range(budget):
        score = alpha * score + probs[:, :, i]
    for t in range(budget, L - 1):
        row = probs[:, :, t] * mask[:, :, t]
        row = row / row.sum(-1, keepdim=True)
        if alpha != 0.0:
            score = alpha * score + row
        else:
            score[score != float("inf")] = 0
            score = score + row
        j = torch.argmin(score[:, :, n_sink:t - n_recent + 1], dim=-1, keepdim=True) + n_sink
        score.scatter_(-1, j, float("inf"))
        mask[:, :, t + 1] = mask[:, :, t].scatter(-1, j, False)
    return mask & causal


def official_local_heavy_hitter_mask(logits, heavy):
    """H2O lm-eval heavy-hitter rule: top-(h-1) of accumulated scores plus the current token."""
    L = logits.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    lg = logits.float().masked_fill(~causal, float("-inf"))
    probs = torch.softmax(lg, dim=-1)
    acc = probs[:, :, :heavy].sum(-2)
    acc[:, :, heavy:] = 0
    mask = torch.zeros(probs.shape, dtype=torch.bool)
    mask[:, :, :heavy, :heavy] = True
    for t in range(heavy, L):
        top = acc.topk(heavy - 1, dim=-1).indices
        keep = torch.zeros_like(acc, dtype=torch.bool).scatter(-1, top, True)
        keep[:, :, t] = True
        mask[:, :, t] = keep
        acc = (acc + torch.softmax(lg[:, :, t], dim=-1)) * keep
    return mask & causal


def official_decode_step(keys, values, scores, attn_row, alpha, n_select, n_recent):
    """A2SF real-drop decode step (variant B, the way kvpress's ScorerPress evicts too):
    decay-and-add the new attention row, top-k over the non-recent part, concatenate the
    recent window, re-gather K, V and the scores. Returns the new (keys, values, scores)."""
    scores = alpha * scores + attn_row                                   # (B, H, T)
    old = scores[..., :-n_recent]
    idx = old.topk(n_select, dim=-1).indices.sort(-1).values
    t = scores.shape[-1]
    recent = torch.arange(t - n_recent, t).expand(*idx.shape[:-1], n_recent)
    idx = torch.cat([idx, recent], -1)
    d = keys.shape[-1]
    g = idx[..., None].expand(*idx.shape, d)
    return keys.gather(2, g), values.gather(2, g), scores.gather(-1, idx)
