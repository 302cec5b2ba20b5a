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
    """Re-gather decode step (the real-drop code's eviction, and kvpress's ScorerPress's): the
    token-level decay-and-add of the new attention row (forgetcore's decode recurrence; the
    official variant B adds first and decays only at punctuation), top-k over the non-recent
    part, concatenate the recent window, re-gather K, V and the scores. Returns the new
    (keys, values, scores)."""
    scores = alpha * scores + attn_row                                   # (B, H, T)
    old = scores[..., :-n_recent]
    idx = old.topk(n_select, dim=-1).indices.sort(-1).values
    t = scores.shape[-1]
    recent = torch.arange(t - n_recent, t).expand(*idx.shape[:-1], n_recent)
    idx = torch.cat([idx, recent], -1)
    d = keys.shape[-1]
    g = idx[..., None].expand(*idx.shape, d)
    return keys.gather(2, g), values.gather(2, g), scores.gather(-1, idx)


def official_a2sf_head_prefill_scores(probs, alpha, group):
    """A2SF HEAD (variant C, ``policies/a2sf.py``): prefill row q weighs alpha^(L-1-q), the
    GQA group's query heads summed: S = sum_q alpha^(L-1-q) sum_h A_h[q, :]. probs (B, Hq, L, L)."""
    b, hq, L, _ = probs.shape
    a = probs.float().reshape(b, hq // group, group, L, L).sum(2)
    w = alpha ** torch.arange(L - 1, -1, -1, dtype=torch.float64)
    return (a * w.float()[:, None]).sum(2)


def official_a2sf_sentence_exponents(input_ids, punctuation_ids):
    """A2SF real-drop ``set_forget`` at prefill (variant B), one row: the segments end at each
    punctuation token (inclusive); segment i of num_t + 1 gets exponent num_t - i."""
    flat = input_ids.reshape(-1)
    pos = torch.isin(flat, torch.tensor(punctuation_ids)).nonzero(as_tuple=True)[0].tolist()
    n = flat.numel()
    starts, ends = [0] + [p + 1 for p in pos], pos + [n - 1]
    exps = torch.empty_like(flat)
    for i, (s, e) in enumerate(zip(starts, ends)):
        exps[s:e + 1] = len(pos) - i
    return exps


def official_a2sf_sentence_scores(probs, input_ids, punctuation_ids, alpha, group, n_prefill):
    """Variant B scores after a prefill of ``n_prefill`` tokens and one-token decode steps for the
    rest (``kv_cache.py`` ``update``, no eviction): prefill S = sum_q alpha^exp[q] A[q]; each
    later step: S_new = A[t] with S_new[:-1] += S, then S *= alpha if token t is punctuation."""
    b, hq, L, _ = probs.shape
    a = probs.float().reshape(b, hq // group, group, L, L).sum(2)       # (B, H, L, L)
    ids = input_ids[0]
    exps = official_a2sf_sentence_exponents(ids[:n_prefill], punctuation_ids)
    w = (alpha ** exps.double()).float()
    s = (a[:, :, :n_prefill, :n_prefill] * w[:, None]).sum(2)
    for t in range(n_prefill, L):
        new = a[:, :, t, :t + 1].clone()
        new[..., :-1] += s
        s = new
        if int(ids[t]) in punctuation_ids:
            s = s * alpha
    return s
