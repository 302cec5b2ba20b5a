"""Fused attention scoring (kvscore.attention_scores_): exact against explicit probabilities,
the row-skipping bound, the kept set, the official A2SF variants B and C, bad input."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from forgetcore import kvscore, reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches" / "baselines"))
from official_kv import official_a2sf_head_prefill_scores, official_a2sf_sentence_scores


def _qk(b, hq, hkv, q, s, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, q, d, generator=g) * scale, torch.randn(b, hkv, s, d, generator=g) * scale


def _explicit(query, keys, scaling, pos, valid, qpos, qvalid):
    """(B, Hq, q, S) softmax probabilities with the positional visibility rule."""
    g = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(g, 1)
    vis = (valid[:, :, None, :] & (pos[:, :, None, :] <= qpos[:, None, :, None])).repeat_interleave(g, 1)
    logits = (query.double() @ k.double().transpose(-1, -2)) * scaling
    p = torch.softmax(logits.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    return (p * qvalid[:, None, :, None]).float()


@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3), q=st.integers(1, 40),
       old=st.integers(0, 30), alpha=st.sampled_from([0.0, 0.5, 0.9, 1.0]), seed=st.integers(0, 10_000),
       shuffle=st.booleans())
def test_fused_equals_explicit_probabilities(b, hkv, group, q, old, alpha, seed, shuffle):
    """Prefill, chunked prefill and decode on a cache whose slots are out of token order, with
    left padding (invalid keys and query rows): the fused pass equals accumulate_ over the
    explicit probabilities, and the Rust kernel equals the blocked torch reference."""
    s = old + q
    query, keys = _qk(b, hkv * group, hkv, q, s, 8, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pos = torch.arange(s).expand(b, hkv, s).clone()
    if shuffle:
        perm = torch.randperm(s, generator=g)
        pos, keys = pos[..., perm], keys[:, :, perm]
    pad = torch.randint(0, max(1, s // 3), (b,), generator=g)
    valid = (pos >= pad[:, None, None]) & (torch.rand(b, hkv, s, generator=g) > 0.1)
    qpos = (old + torch.arange(q)).expand(b, q).contiguous()
    qvalid = qpos >= pad[:, None]
    start = torch.rand(b, hkv, s, generator=g)
    got = kvscore.attention_scores_(start.clone(), query, keys, 0.3, alpha, positions=pos, valid=valid,
                                    query_positions=qpos, query_valid=qvalid, tol=0.0)
    want = kvscore.accumulate_(start.clone(), _explicit(query, keys, 0.3, pos, valid, qpos, qvalid), alpha, group)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    ref = reference.kv_attention_scores_(start.clone(), query, keys, 0.3, alpha, pos, valid, qpos, qvalid)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.95, 0.99])
def test_rows_needed_is_the_smallest_window_within_tol(alpha):
    for tol in (1e-3, 1e-7):
        w = kvscore.rows_needed(alpha, tol, 10**9)
        assert alpha ** w / (1 - alpha) <= tol * (1 + 1e-9)
        assert alpha ** (w - 1) / (1 - alpha) > tol
    assert kvscore.rows_needed(0.9, 1e-7, 100) == 100          # never more than the rows there are
    assert kvscore.rows_needed(1.0, 1e-7, 5000) == 5000         # H2O needs every row
    assert kvscore.rows_needed(0.9, 1e-7, 10**6) == math.ceil(math.log(1e-8) / math.log(0.9))   # 175


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_skipping_rows_keeps_the_exact_kept_set(seed):
    """A2SF(0.9) over a 1,200-token causal prefill: only the newest 175 rows are computed, yet
    the scores are within group * tol of the exact ones and the kept 20 % is the same set."""
    query, keys = _qk(1, 6, 2, 1200, 1200, 16, seed, scale=0.7)
    exact = kvscore.attention_scores_(torch.zeros(1, 2, 1200), query, keys, 0.25, 0.9, tol=0.0)
    fast = kvscore.attention_scores_(torch.zeros(1, 2, 1200), query, keys, 0.25, 0.9, tol=1e-7)
    assert float((fast - exact).abs().max()) <= 3 * 1e-7 + 1e-6
    keep = [kvscore.select_keep(x, 240, 4, 8) for x in (exact, fast)]
    assert torch.equal(keep[0], keep[1])


@pytest.mark.parametrize("alpha", [0.75, 0.9, 0.95])
def test_variant_c_matches_the_official_head_rule(alpha):
    query, keys = _qk(2, 6, 2, 50, 50, 8, 7)
    p = _explicit(query, keys, 0.4, torch.arange(50).expand(2, 2, 50), torch.ones(2, 2, 50, dtype=torch.bool),
                  torch.arange(50).expand(2, 50), torch.ones(2, 50, dtype=torch.bool))
    want = official_a2sf_head_prefill_scores(p, alpha, 3)
    got = kvscore.attention_scores_(torch.zeros(2, 2, 50), query, keys, 0.4, alpha, tol=0.0)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variant_b_sentence_forgetting_matches_the_official_rule(seed):
    """A2SF(forgetting="sentence"): prefill weights alpha^(punctuation at/after the row's
    sentence end), then per token add the row and decay only at punctuation (add, then decay)."""
    pytest.importorskip("transformers")
    from forgetcore.kvcache.presses import A2SF

    L, n_pre, punct, alpha = 40, 25, [7, 9], 0.8
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 12, (1, L), generator=g)
    ids[0, n_pre - 1] = 7                                          # prompt ending with punctuation
    query, keys = _qk(1, 4, 2, L, L, 8, seed + 50)
    allpos = torch.arange(L).expand(1, L)
    p = _explicit(query, keys, 0.5, torch.arange(L).expand(1, 2, L), torch.ones(1, 2, L, dtype=torch.bool),
                  allpos, torch.ones(1, L, dtype=torch.bool))
    want = official_a2sf_sentence_scores(p, ids, punct, alpha, 2, n_pre)
    press = A2SF(alpha, budget=1000, forgetting="sentence", punctuation_ids=punct)
    out = torch.zeros(1, 2, n_pre)
    for t0, t1 in [(0, n_pre)] + [(t, t + 1) for t in range(n_pre, L)]:
        if t0:
            out = torch.cat([out, torch.zeros(1, 2, 1)], -1)
        lay = SimpleNamespace(keys=keys[:, :, :t1], pos=torch.arange(t1).expand(1, 2, t1),
                              valid=torch.ones(1, 2, t1, dtype=torch.bool))
        cache = SimpleNamespace(input_ids=ids[:, t0:t1])
        press._colsum(cache, lay, query[:, :, t0:t1], allpos[:, t0:t1], torch.ones(1, t1 - t0, dtype=torch.bool),
                      0.5, out)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-6)


def test_bad_input_names_the_argument_and_changes_nothing():
    query, keys = _qk(1, 2, 1, 3, 5, 4, 0)
    s = torch.rand(1, 1, 5)
    before = s.clone()
    bad = query.clone()
    bad[0, 0, 0, 0] = float("nan")
    cases = [
        (dict(query=bad), ValueError, "query"),
        (dict(keys=keys[:, :, :4]), ValueError, "keys"),
        (dict(query=query[..., :3].contiguous()), ValueError, "query"),
        (dict(query=query.double()), TypeError, "query"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(tol=-1.0), ValueError, "tol"),
        (dict(valid=torch.ones(1, 1, 4, dtype=torch.bool)), ValueError, "valid"),
        (dict(query_valid=torch.ones(1, 2, dtype=torch.bool)), ValueError, "query_valid"),
    ]
    for kw, exc, name in cases:
        args = dict(query=query, keys=keys, scaling=0.5, alpha=0.9)
        args.update(kw)
        extra = {k: args.pop(k) for k in ("valid", "query_valid", "tol") if k in args}
        with pytest.raises(exc, match=f"^{name}"):
            kvscore.attention_scores_(s, args["query"], args["keys"], args["scaling"], args["alpha"], **extra)
        assert torch.equal(s, before)
    nan_scores = s.clone()
    nan_scores[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^scores"):
        kvscore.attention_scores_(nan_scores, query, keys, 0.5, 0.9)
