"""Factual-knowledge acquisition during (continued) pretraining: effectivity, retainability and
power-law forgetting.

Chang, Park, Ye, Yang, Seo, Chang and Seo, "How Do Large Language Models Acquire Factual
Knowledge During Pretraining?" (NeurIPS 2024, arXiv 2406.11813); official code
``kaistAI/factual-knowledge-acquisition`` (``olmo/train.py`` injection and probe logging,
``analysis/ppl_analysis.py`` metrics, ``analysis/forgetting_plot.py`` decay fits).

- Probes are (context, target) pairs; :func:`span_losses` logs the mean token cross-entropy over
  the target span only (the code's "target" measurement), batched so that probing every step
  stays cheap. Padding is excluded by the attention mask; the official code instead averages the
  non-zero token losses (``row.nonzero()``), which also drops a genuine zero loss (never seen
  in float32 practice).
- :func:`run_injection` continues training on background text and injects knowledge by
  *replacing* sequences of the step's batch (the batch size never changes), logging every probe
  before training (``v[0]``) and after every step (``v[k]``, k = 1..steps). Injecting at step
  ``s`` puts the text in the batch of update ``s + 1``, so ``v[s]`` is the value just before it.
- :func:`effectivity`: ``LAM_i = argmin_{k in (s_i, s_i + window]} v[k]``,
  ``E_i = v[s_i] - v[LAM_i]`` (per-injection baseline; window 50 steps).
- :func:`retainability`: from the LAM after the final injection,
  ``R(t) = 100 (v[LAM + t] - v[0]) / (v[LAM] - v[0])`` (baseline ``v[0]``, t counted from the LAM;
  NaN where ``v[LAM] == v[0]``, which the code skips).
- :func:`iqr_filter`: keep values in ``[Q1 - k IQR, Q3 + k IQR]`` (``np.percentile``, linear
  interpolation). ``k = 2``: ``remove_outliers_iqr``'s default in ``ppl_analysis.py`` at commit
  c5273a3, where the window, E and R above were also checked (an older version used 1.5).
- :func:`decay_fit`: ``y = a log10 t + b`` by least squares (``np.polyfit``), with the slope's
  standard error ``sqrt(SSR / (n - 2)) / sqrt(sum (log10 t - mean)^2)``, R^2 and the x-intercept
  ``t* = 10 ** (-b / a)`` (the code prints ``-b / a``, in log10 steps); and, as the code's
  ``fit_models`` compares them, an exponential ``y = A exp(K t)`` fitted log-linearly on the
  positive ``y`` and ``a' ln t + b'``, each with its RMSE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _checks, lm

MODES = ("once", "duplicate", "paraphrase")


def _pairs(probes: Any) -> list[tuple[str, str]]:
    if isinstance(probes, (str, bytes)) or not isinstance(probes, Sequence):
        raise TypeError(f"probes: expected a sequence of (context, target) pairs, got {type(probes).__name__}")
    out = list(probes)
    if not out:
        raise ValueError("probes: expected at least one (context, target) pair, got an empty list")
    for p in out:
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(s, str) for s in p)
                and p[1].strip()):
            raise ValueError(f"probes: expected (context, target) string pairs with a non-empty target, got {p!r}")
    return [(c, t) for c, t in out]


def encode_probes(tokenizer: Any, probes: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, target_mask) of ``context + " " + target`` for each probe,
    right-padded; ``target_mask[i, j]`` marks the tokens of the target span."""
    probes = _pairs(probes)
    rows, spans = [], []
    for c, t in probes:
        full = tokenizer(f"{c} {t}" if c else t)["input_ids"]
        ctx = tokenizer(c)["input_ids"] if c else []
        k = 0  # the context's tokens are a prefix of the full text's, up to merges at the seam
        while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
            k += 1
        if k >= len(full):
            raise ValueError(f"probes: the target {t!r} adds no tokens after the context {c!r}")
        rows.append(full)
        spans.append((max(k, 1), len(full)))  # the first token has no prediction
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tmask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, (a, b)) in enumerate(zip(rows, spans)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        tmask[i, a:b] = True
    return ids, mask, tmask


@torch.no_grad()
def span_losses(model: Any, tokenizer: Any, probes: Sequence[tuple[str, str]] | None = None, *,
                encoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                batch_size: int = 64) -> torch.Tensor:
    """Mean cross-entropy over each probe's target span, shape (P,), float32 on the CPU.

    Pass ``encoded`` (from :func:`encode_probes`) to skip tokenising again when probing every step.
    """
    lm.check_causal_lm(model, tokenizer)
    ids, mask, tmask = encoded if encoded is not None else encode_probes(tokenizer, probes)  # type: ignore[arg-type]
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(ids), batch_size):
        sl = slice(i, i + batch_size)
        ce = lm.token_losses(model, ids[sl].to(dev), mask[sl].to(dev))  # (B, L-1): token j+1 given ..j
        tm = tmask[sl, 1:].to(dev).to(ce.dtype)
        out.append(((ce * tm).sum(1) / tm.sum(1)).float().cpu())
    model.train(was)
    return torch.cat(out)


def injection_schedule(items: Sequence[dict[str, Any]], steps_at: Sequence[int]) -> dict[int, list[str]]:
    """Which texts replace batch sequences at which step.

    Each item is a dict with ``"mode"`` (``"once"``: its ``"text"`` at ``steps_at[0]``;
    ``"duplicate"``: the same ``"text"`` at every step of ``steps_at``; ``"paraphrase"``: the
    k-th of its ``"paraphrases"`` at ``steps_at[k]``, cycling if there are fewer).
    """
    sched: dict[int, list[str]] = {}
    if not steps_at:
        raise ValueError("steps_at: expected at least one injection step, got none")
    for i, it in enumerate(items):
        mode = it.get("mode")
        if mode not in MODES:
            raise ValueError(f"items: item {i} has mode {mode!r}; expected one of {MODES}")
        if mode == "once":
            sched.setdefault(int(steps_at[0]), []).append(it["text"])
        elif mode == "duplicate":
            for s in steps_at:
                sched.setdefault(int(s), []).append(it["text"])
        else:
            paras = list(it.get("paraphrases") or [])
            if not paras:
                raise ValueError(f"items: item {i} (paraphrase mode) has no 'paraphrases'")
            for k, s in enumerate(steps_at):
                sched.setdefault(int(s), []).append(paras[k % len(paras)])
    return sched


def replace_in_batch(batch: list[str], texts: Sequence[str], *, seed: int) -> list[str]:
    """``batch`` with ``len(texts)`` of its sequences, at seeded distinct positions, replaced by
    ``texts`` (the paper's injection: the batch keeps its size)."""
    if len(texts) > len(batch):
        raise ValueError(f"texts: {len(texts)} injections do not fit in a batch of {len(batch)}; "
                         f"raise batch_size or spread the injections over more steps")
    g = torch.Generator().manual_seed(_checks.seed(seed))
    pos = torch.randperm(len(batch), generator=g)[: len(texts)].tolist()
    out = list(batch)
    for p, t in zip(pos, texts):
        out[p] = t
    return out


def run_injection(model: Any, tokenizer: Any, background: Sequence[str], schedule: dict[int, list[str]],
                  probes: Sequence[tuple[str, str]], *, steps: int, batch_size: int = 16, lr: float = 1e-3,
                  seed: int = 0, probe_batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """Continue training on ``background`` with injections; returns ``v`` of shape
    (steps + 1, P): the probes' target-span losses before training and after every step.

    Batches are drawn from ``background`` with replacement by a seeded generator; the texts of
    ``schedule[s]`` replace sequences of the batch of update ``s + 1``. AdamW, weight decay 0,
    padding masked out of the loss.
    """
    lm.check_causal_lm(model, tokenizer)
    background = list(background)
    if not background:
        raise ValueError("background: expected at least one text, got an empty list")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    bad = [s for s in schedule if not 0 <= s < steps]
    if bad:
        raise ValueError(f"schedule: injection steps must lie in [0, {steps}), got {sorted(bad)}")
    enc = encode_probes(tokenizer, probes)
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(_checks.seed(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    v = [span_losses(model, tokenizer, encoded=enc, batch_size=probe_batch_size)]
    for s in tqdm(range(steps), desc="inject", disable=not progress, leave=False):
        batch = [background[i] for i in torch.randint(len(background), (batch_size,), generator=g).tolist()]
        if s in schedule:
            batch = replace_in_batch(batch, schedule[s], seed=seed * 100_003 + s)
        ids, mask = lm.encode(tokenizer, batch, dev)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        v.append(span_losses(model, tokenizer, encoded=enc, batch_size=probe_batch_size))
    model.eval()
    return torch.stack(v)


def _v(v: Any) -> np.ndarray:
    a = np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"v: expected losses of shape (steps + 1, probes) with steps >= 1, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("v: expected finite losses, got NaN or inf")
    return a


def _lam(a: np.ndarray, s: int, window: int) -> np.ndarray:
    if s + 1 >= a.shape[0]:
        raise ValueError(f"steps_at: step {s} leaves no step after it in v (length {a.shape[0]})")
    seg = a[s + 1 : s + window + 1]
    return s + 1 + seg.argmin(0)


def effectivity(v: Any, steps_at: Sequence[int], *, window: int = 50) -> np.ndarray:
    """``E[i, p] = v[s_i, p] - v[LAM_i, p]`` for each injection step ``s_i`` and probe ``p``, with
    ``LAM_i`` the step of minimum loss in ``(s_i, s_i + window]`` (the paper's 50-step window)."""
    a = _v(v)
    return np.stack([a[s, np.arange(a.shape[1])] - a[_lam(a, int(s), window), np.arange(a.shape[1])]
                     for s in steps_at])


def retainability(v: Any, last_step: int, *, window: int = 50, max_t: int | None = None) -> np.ndarray:
    """``R[t-1, p] = 100 (v[LAM + t] - v[0]) / (v[LAM] - v[0])`` for ``t = 1..max_t`` (default as
    far as ``v`` reaches for every probe), ``LAM`` the minimum in ``(last_step, last_step + window]``.
    NaN for a probe whose ``v[LAM] == v[0]``; positions past the end of ``v`` are NaN."""
    a = _v(v)
    lam = _lam(a, int(last_step), window)
    t_max = a.shape[0] - 1 - int(lam.min()) if max_t is None else int(max_t)
    cols = np.arange(a.shape[1])
    gain = a[lam, cols] - a[0, cols]
    out = np.full((t_max, a.shape[1]), np.nan)
    for t in range(1, t_max + 1):
        idx = lam + t
        ok = (idx < a.shape[0]) & (gain != 0)
        out[t - 1, ok] = 100.0 * (a[idx[ok], cols[ok]] - a[0, cols[ok]]) / gain[ok]
    return out


def iqr_filter(values: Any, k: float = 2.0) -> np.ndarray:
    """The finite values within ``[Q1 - k IQR, Q3 + k IQR]``."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return x
    q1, q3 = np.percentile(x, [25, 75])
    iqr = q3 - q1
    return x[(x >= q1 - k * iqr) & (x <= q3 + k * iqr)]


def filtered_mean(values: Any, k: float = 2.0) -> float:
    """Mean after :func:`iqr_filter` (NaN when nothing is left): the paper's aggregation."""
    x = iqr_filter(values, k)
    return float(x.mean()) if x.size else math.nan


def decay_fit(t: Any, y: Any) -> dict[str, float]:
    """Fit ``y = a log10 t + b`` (power-law forgetting is a straight line in log t) and compare an
    exponential ``y = A exp(K t)`` and ``a' ln t + b'`` by RMSE, as the official analysis does.

    Returns ``slope``, ``intercept``, ``slope_se``, ``r2``, ``x_intercept_log10`` (``-b/a``),
    ``t_forgotten`` (``10 ** (-b/a)``, steps until the gain is gone), ``rmse_log`` and ``rmse_exp``.
    """
    t = np.asarray(t, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if t.shape != y.shape or t.size < 3:
        raise ValueError(f"t, y: expected two 1-D arrays of the same length >= 3, got {t.shape} and {y.shape}")
    if (t <= 0).any() or not (np.isfinite(t).all() and np.isfinite(y).all()):
        raise ValueError("t, y: expected finite values and t > 0")
    lx = np.log10(t)
    a, b = np.polyfit(lx, y, 1)
    pred = a * lx + b
    ssr = float(((y - pred) ** 2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    se = math.sqrt(ssr / (t.size - 2)) / math.sqrt(float(((lx - lx.mean()) ** 2).sum()))
    xi = -b / a if a != 0 else math.inf
    out = {"slope": float(a), "intercept": float(b), "slope_se": se, "r2": 1 - ssr / sst if sst > 0 else math.nan,
           "x_intercept_log10": float(xi), "t_forgotten": float(10 ** xi) if xi < 300 else math.inf}
    al, bl = np.polyfit(np.log(t), y, 1)  # least squares a ln t + b, what curve_fit converges to
    out["rmse_log"] = float(np.sqrt(((y - (al * np.log(t) + bl)) ** 2).mean()))
    pos = y > 0
    if pos.sum() >= 2:
        k, log_a = np.polyfit(t[pos], np.log(y[pos]), 1)
        out["rmse_exp"] = float(np.sqrt(((y - math.exp(log_a) * np.exp(k * t)) ** 2).mean()))
    else:
        out["rmse_exp"] = math.nan
    return out


def fact_items(n: int, *, seed: int = 0, n_paraphrases: int = 3) -> list[dict[str, Any]]:
    """``n`` fictional facts about entities the tiny LM never saw, each a dict with ``text`` (the
    canonical sentence), ``paraphrases`` (its other templates), ``mem_probe`` (canonical context,
    target = the attribute) and ``gen_probe`` (a paraphrase's context, same target)."""
    import random

    rng = random.Random(f"facts:{seed}")
    ents = list(lm.names()[300:])
    rng.shuffle(ents)
    if n > len(ents):
        raise ValueError(f"n: at most {len(ents)} fictional entities are available, asked for {n}")
    rels = sorted(lm.RELATIONS)
    items = []
    for i in range(n):
        rel = rels[i % len(rels)]
        attrs, templates = lm.RELATIONS[rel]
        e, a = ents[i], rng.choice(attrs)
        k = min(n_paraphrases, len(templates))
        texts = [templates[j].format(e=e, a=a) for j in range(k)]
        items.append({"text": texts[0], "paraphrases": texts, "mem_probe": lm.fact(rel, e, a, 0),
                      "gen_probe": lm.fact(rel, e, a, len(templates) - 1)})
    return items


__all__ = ["MODES", "decay_fit", "effectivity", "encode_probes", "fact_items", "filtered_mean", "injection_schedule",
           "iqr_filter", "replace_in_batch", "retainability", "run_injection", "span_losses"]
