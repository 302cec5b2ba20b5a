"""kvscore primitives: exactness, official masked rules, Rust vs reference, bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from forgetcore import kvscore, reference
from forgetcore.kvcache.simulate import a2sf_mask, h2o_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches" / "baselines"))
from official_kv import official_a2s_base_mask, official_local_heavy_hitter_mask


def _rows(b, hq, q, t, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, hq, q, t, generator=g) * 2, -1).to(dtype)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_recurrence_equals_closed_form(alpha):
    a = _rows(2, 6, 7, 11, 0)                      # GQA: 3 kv heads x group 2, 7 rows
    step = torch.zeros(2, 3, 11)
    for i in range(7):                             # one row at a time
        kvscore.accumulate_(step, a[:, :, i:i + 1].contiguous(), alpha, 2)
    once = kvscore.accumulate_(torch.zeros(2, 3, 11), a, alpha, 2)   # all rows in one call
    w = torch.tensor([alpha ** (6 - i) for i in range(7)], dtype=torch.float64)
    closed = (a.double().reshape(2, 3, 2, 7, 11).sum(2) * w[:, None]).sum(2).float()
    torch.testing.assert_close(step, closed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(once, closed, rtol=1e-5, atol=1e-6)


def test_alpha_one_is_h2o_sum_and_low_precision_accumulates_in_float32():
    a = _rows(1, 4, 5, 9, 1)
    s = kvscore.accumulate_(torch.zeros(1, 4, 9), a, 1.0)
    torch.testing.assert_close(s, a.sum(2))
    for dt in (torch.float16, torch.bfloat16):
        s16 = kvscore.accumulate_(torch.zeros(1, 4, 9), a.to(dt), 1.0)
        assert s16.dtype == torch.float32
        torch.testing.assert_close(s16, a.to(dt).float().sum(2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_simulation_reproduces_official_a2s_base_mask(seed, alpha):
    lg = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(seed)) * 2
    assert torch.equal(a2sf_mask(lg, 2, 5, 3, alpha), official_a2s_base_mask(lg, 2, 5, 3, alpha))
    assert torch.equal(a2sf_mask(lg, 0, 6, 0, alpha), official_a2s_base_mask(lg, 0, 6, 0, alpha))


@pytest.mark.parametrize("seed", range(3))
def test_simulation_reproduces_official_local_heavy_hitter_mask(seed):
    lg = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(seed)) * 2
    assert torch.equal(h2o_mask(lg, 7), official_local_heavy_hitter_mask(lg, 7))


def test_age_bias_forgetting_factor_bounds_the_vote_advantage_of_old_tokens():
    # Uniform causal attention A[i, j] = 1/(i+1): under H2O the oldest key collects L - j votes,
    # so its score exceeds the newest key's by a factor ~ L ln L; a forgetting factor caps the
    # advantage near 1/(1 - alpha). (Under uniform attention the *ranking* stays oldest-first
    # for every alpha > 0, in one-shot and in the step-wise masked rule alike: scores of old
    # keys stay larger, just no longer unboundedly; we measured this, so we assert the ratio.)
    L = 256
    a = torch.tril(torch.ones(L, L)) / torch.arange(1, L + 1)[:, None]
    ratio = {}
    for alpha in (1.0, 0.9):
        s = kvscore.accumulate_(torch.zeros(1, 1, L), a[None, None], alpha)[0, 0]
        ratio[alpha] = (s[0] / s[-1]).item()
    assert ratio[1.0] > 0.5 * L * torch.log(torch.tensor(float(L))).item()
    assert ratio[0.9] < 1 / (1 - 0.9) + 1


# --- Rust vs reference ----------------------------------------------------------------------------

@given(b=st.integers(0, 2), h=st.integers(1, 3), group=st.integers(1, 3), q=st.integers(0, 4),
       t=st.integers(0, 20), alpha=st.sampled_from([0.0, 0.3, 0.9, 1.0]), renorm=st.booleans(),
       use_valid=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16), inf=st.booleans())
def test_accumulate_matches_reference(b, h, group, q, t, alpha, renorm, use_valid, dtype, seed, inf):
    g = torch.Generator().manual_seed(seed)
    s0 = torch.rand(b, h, t, generator=g) * 3
    if inf and s0.numel():
        s0.view(-1)[0] = float("inf")
    a = torch.softmax(torch.randn(b, h * group, q, t, generator=g), -1).to(dtype) if t else \
        torch.zeros(b, h * group, q, t, dtype=dtype)
    v = (torch.rand(b, h, t, generator=g) > 0.3) if use_valid else None
    got = kvscore.accumulate_(s0.clone(), a, alpha, group, renorm=renorm, valid=v)
    want = reference.kv_accumulate_(s0.clone(), a, alpha, group, renorm=renorm, valid=v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _slots(b, h, t, seed, ties):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 3, (b, h, t), generator=g).float() if ties else torch.rand(b, h, t, generator=g)
    pos = torch.stack([torch.randperm(t, generator=g) for _ in range(b * h)]).reshape(b, h, t) if t else \
        torch.zeros(b, h, 0, dtype=torch.int64)
    v = torch.rand(b, h, t, generator=g) > 0.25
    return s, pos, v


@given(b=st.integers(1, 2), h=st.integers(1, 3), t=st.integers(0, 30), ns=st.integers(0, 3),
       nr=st.integers(0, 4), extra=st.integers(0, 30), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_select_keep_and_evict_one_match_reference(b, h, t, ns, nr, extra, ties, seed):
    s, pos, v = _slots(b, h, t, seed, ties)
    budget = ns + nr + extra
    got = kvscore.select_keep(s, budget, ns, nr, pos, v)
    if budget < t:
        want = reference.kv_select_keep(s, budget, ns, nr, pos, v)
        assert torch.equal(got, want)
        kept_valid = v.gather(-1, got).sum(-1)
        assert torch.equal(kept_valid, v.sum(-1).clamp(max=budget))   # pads never kept ahead of tokens
    else:
        assert torch.equal(got, torch.arange(t).expand(b, h, t))       # documented no-op
    assert torch.equal(kvscore.evict_one(s, ns, nr, pos, v), reference.kv_evict_one(s, ns, nr, pos, v))


def test_huge_and_infinite_scores_are_ranked():
    s = torch.tensor([[[3e38, float("inf"), 1.0, -3e38, 0.5]]])
    assert kvscore.select_keep(s, 2).tolist() == [[[0, 1]]]
    assert kvscore.evict_one(s).tolist() == [[3]]


# --- bad input ------------------------------------------------------------------------------------

S = torch.zeros(1, 2, 5)
A = torch.full((1, 2, 1, 5), 0.2)

BAD = [
    (lambda: kvscore.accumulate_(S.double(), A, 0.5), TypeError, "scores"),
    (lambda: kvscore.accumulate_(S.clone(), A, 1.5), ValueError, "alpha"),
    (lambda: kvscore.accumulate_(S.clone(), A, float("nan")), ValueError, "alpha"),
    (lambda: kvscore.accumulate_(S.clone(), A[:, :, :, :4], 0.5), ValueError, "attn"),
    (lambda: kvscore.accumulate_(S.clone(), A, 0.5, group=2), ValueError, "attn"),
    (lambda: kvscore.accumulate_(S.clone(), A.long(), 0.5), TypeError, "attn"),
    (lambda: kvscore.accumulate_(S.clone(), A * float("nan"), 0.5), ValueError, "attn"),
    (lambda: kvscore.accumulate_(S.clone(), A, 0.5, group=0), ValueError, "group"),
    (lambda: kvscore.accumulate_(S.clone(), A, 0.5, valid=torch.ones(1, 2, 4, dtype=torch.bool)), ValueError, "valid"),
    (lambda: kvscore.accumulate_(torch.full((1, 2, 5), float("nan")), A, 0.5), ValueError, "scores"),
    (lambda: kvscore.select_keep(S, 3, n_sink=2, n_recent=2), ValueError, "budget"),
    (lambda: kvscore.select_keep(S, -1), ValueError, "budget"),
    (lambda: kvscore.select_keep(S, 2, positions=torch.zeros(1, 2, 5)), TypeError, "positions"),
    (lambda: kvscore.select_keep(S, 2, valid=torch.ones(1, 2, 4, dtype=torch.bool)), ValueError, "valid"),
    (lambda: kvscore.evict_one(S, n_sink=-1), ValueError, "n_sink"),
    (lambda: kvscore.evict_one(S[0]), ValueError, "scores"),
]


@pytest.mark.parametrize("call,exc,name", BAD)
def test_bad_input_names_the_argument_and_changes_nothing(call, exc, name):
    before = S.clone()
    with pytest.raises(exc, match=f"^{name}"):
        call()
    assert torch.equal(S, before)
