"""Bad-input matrix of the kvscore family: every public function of ``forgetcore.kvscore`` and
every press constructor of ``forgetcore.kvcache``, through ``badinput.expect_clean_error``
(exception type, argument named first in the message, every state bit-identical after the
raise). Hypothesis varies shapes, dtypes and where the NaN/inf sits; the rest is parametrized.
Plus the regressions of the reliability issue's kvscore items (each failed before its fix)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from badinput import expect_clean_error
from forgetcore import kvscore, reference
from forgetcore.kvcache import A2SF, H2O, TOVA, ExpectedAttention, Knorm, RecentWindow, SnapKV

NONFINITE = [float("nan"), float("inf"), float("-inf")]


def clean(fn, arg, state=()):
    """expect_clean_error, and the message opens with the argument's name (README's rule)."""
    e = expect_clean_error(fn, arg=arg, state=state)
    assert str(e).startswith(arg), str(e)


def _case(b=2, h=2, g=1, q=3, t=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, h, t, generator=gen)
    attn = torch.softmax(torch.randn(b, h * g, q, t, generator=gen), -1)
    return scores, attn


# --- accumulate_ ---------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), g=st.integers(1, 3), q=st.integers(1, 4), t=st.integers(1, 9),
       where=st.integers(0, 10_000), bad=st.sampled_from(NONFINITE),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), renorm=st.booleans())
def test_accumulate_nonfinite_attention_anywhere(b, h, g, q, t, where, bad, dtype, renorm):
    scores, attn = _case(b, h, g, q, t)
    attn = attn.to(dtype)
    attn.view(-1)[where % attn.numel()] = bad
    clean(lambda: kvscore.accumulate_(scores, attn, 0.9, g, renorm=renorm), "attn", [scores, attn])


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(1, 9), where=st.integers(0, 10_000),
       fn=st.sampled_from(["accumulate_", "select_keep", "evict_one", "attention_scores_"]))
def test_nan_scores_refused_by_every_function(b, h, t, where, fn):
    scores, attn = _case(b, h, 1, 2, t)
    scores.view(-1)[where % scores.numel()] = float("nan")
    call = {"accumulate_": lambda: kvscore.accumulate_(scores, attn, 0.5),
            "select_keep": lambda: kvscore.select_keep(scores, max(t - 1, 0)),
            "evict_one": lambda: kvscore.evict_one(scores),
            "attention_scores_": lambda: kvscore.attention_scores_(scores, torch.randn(b, h, 2, 4),
                                                                   torch.randn(b, h, t, 4), 0.5, 0.9)}[fn]
    clean(call, "scores", [scores])


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), g=st.integers(1, 3), q=st.integers(1, 4), t=st.integers(1, 9),
       axis=st.integers(0, 3), delta=st.sampled_from([-1, 1, 2]))
def test_accumulate_wrong_attention_shape(b, h, g, q, t, axis, delta):
    scores, attn = _case(b, h, g, q, t)
    shape = list(attn.shape)
    shape[axis] = max(shape[axis] + delta, 0)
    if axis == 2:            # any q is fine: wrong rank instead
        bad = attn.reshape(-1)
    else:
        bad = torch.rand(shape)
    clean(lambda: kvscore.accumulate_(scores, bad, 0.5, g), "attn", [scores])


@pytest.mark.parametrize("kw, arg", [
    (dict(alpha=float("nan")), "alpha"), (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"),
    (dict(alpha="0.5"), "alpha"), (dict(group=0), "group"), (dict(group=1.0), "group"),
    (dict(valid=torch.ones(2, 2, 5, dtype=torch.bool)), "valid"),
    (dict(valid=torch.ones(2, 2, 6)), "valid"),
    (dict(valid=torch.ones(2, 2, 6, dtype=torch.bool, device="meta")), "valid"),
])
def test_accumulate_bad_arguments(kw, arg):
    scores, attn = _case()
    kw = {"alpha": 0.5, **kw}
    clean(lambda: kvscore.accumulate_(scores, attn, **kw), arg, [scores])


@pytest.mark.parametrize("bad, arg", [
    (lambda s, a: (s.double(), a), "scores"), (lambda s, a: (s[0], a), "scores"),
    (lambda s, a: (s.to("meta"), a.to("meta")), "scores"),
    (lambda s, a: (s, a.double()), "attn"), (lambda s, a: (s, a.to(torch.int32)), "attn"),
    (lambda s, a: (s, a.to("meta")), "attn"), (lambda s, a: (s, a.numpy()), "attn"),
    (lambda s, a: (None, a), "scores"),
])
def test_accumulate_wrong_types_and_devices(bad, arg):
    scores, attn = _case()
    s2, a2 = bad(scores, attn)
    clean(lambda: kvscore.accumulate_(s2, a2, 0.5), arg, [scores, attn])


def test_accumulate_refuses_attention_aliasing_scores():
    # regression: attn viewing the scores' own memory was read while written (silently wrong)
    scores = torch.rand(1, 1, 4)
    clean(lambda: kvscore.accumulate_(scores, scores.view(1, 1, 1, 4), 0.5), "attn", [scores])
    big = torch.rand(8)
    s = big[:4].view(1, 1, 4)
    clean(lambda: kvscore.accumulate_(s, big[2:6].view(1, 1, 1, 4), 0.5), "attn", [big])
    kvscore.accumulate_(s, big[4:].view(1, 1, 1, 4), 0.5)       # same storage, disjoint bytes: fine


# --- select_keep / evict_one ---------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(t=st.integers(2, 12), i=st.integers(0, 100), j=st.integers(0, 100), seed=st.integers(0, 1000),
       fn=st.sampled_from(["select_keep", "evict_one"]), rust=st.booleans())
def test_duplicate_valid_positions_refused(t, i, j, seed, fn, rust):
    # regression: duplicates made the Rust kernel and the reference disagree; now refused on both
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, 2, t, generator=gen)
    pos = torch.randperm(t, generator=gen).expand(1, 2, t).clone()
    i, j = i % t, j % t
    if i == j:
        j = (i + 1) % t
    pos[0, 1, j] = pos[0, 1, i]
    call = (lambda: kvscore.select_keep(scores, t - 1, 0, 0, pos)) if fn == "select_keep" else \
        (lambda: kvscore.evict_one(scores, 0, 0, pos))
    with pytest.MonkeyPatch.context() as mp:
        if not rust:          # the torch path (CUDA and reference) checks the same rule
            mp.setenv("FORGETCORE_BACKEND", "reference")
        clean(call, "positions", [scores, pos])


def test_duplicates_on_invalid_slots_are_fine_and_agree_with_reference():
    scores = torch.tensor([[[1.0, 0.0, 0.0, 2.0, 5.0]]])
    pos = torch.tensor([[[0, 3, 3, 1, 3]]])
    valid = torch.tensor([[[True, True, False, True, False]]])
    for fn, ref in [(lambda: kvscore.evict_one(scores, 0, 0, pos, valid),
                     lambda: reference.kv_evict_one(scores, 0, 0, pos, valid)),
                    (lambda: kvscore.select_keep(scores, 2, 0, 0, pos, valid),
                     lambda: reference.kv_select_keep(scores, 2, 0, 0, pos, valid))]:
        assert torch.equal(fn(), ref())


@pytest.mark.parametrize("call, arg", [
    (lambda s: kvscore.select_keep(s, -1), "budget"), (lambda s: kvscore.select_keep(s, 2.0), "budget"),
    (lambda s: kvscore.select_keep(s, 3, 2, 2), "budget"), (lambda s: kvscore.select_keep(s, 3, -1), "n_sink"),
    (lambda s: kvscore.select_keep(s, 3, 0, "1"), "n_recent"),
    (lambda s: kvscore.select_keep(s, 3, 2**64, 0), "budget"),
    (lambda s: kvscore.select_keep(s, 3, positions=torch.zeros(2, 2, 6)), "positions"),
    (lambda s: kvscore.select_keep(s, 3, positions=torch.zeros(2, 2, 5, dtype=torch.int64)), "positions"),
    (lambda s: kvscore.select_keep(s, 3, valid=torch.ones(2, 2, 6, dtype=torch.int64)), "valid"),
    (lambda s: kvscore.evict_one(s, -1), "n_sink"), (lambda s: kvscore.evict_one(s, 0, 1.5), "n_recent"),
    (lambda s: kvscore.evict_one(s, valid=torch.ones(2, 6, dtype=torch.bool)), "valid"),
    (lambda s: kvscore.evict_one(s.double()), "scores"), (lambda s: kvscore.evict_one(s[..., None]), "scores"),
])
def test_selection_bad_arguments(call, arg):
    scores, _ = _case()
    clean(lambda: call(scores), arg, [scores])


def test_huge_protected_counts_protect_everything():
    # regression: n_sink beyond a machine word reached the binding as an OverflowError
    scores, _ = _case()
    assert (kvscore.evict_one(scores, 2**70, 0) == -1).all()


# --- attention_scores_ / rows_needed --------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 2), g=st.integers(1, 2), q=st.integers(1, 5), t=st.integers(1, 8),
       d=st.integers(1, 4), where=st.integers(0, 10_000), bad=st.sampled_from(NONFINITE),
       which=st.sampled_from(["query", "keys"]))
def test_attention_scores_nonfinite_inputs(b, h, g, q, t, d, where, bad, which):
    gen = torch.Generator().manual_seed(where)
    scores = torch.rand(b, h, t, generator=gen)
    x = {"query": torch.randn(b, h * g, q, d, generator=gen), "keys": torch.randn(b, h, t, d, generator=gen)}
    x[which].view(-1)[where % x[which].numel()] = bad
    clean(lambda: kvscore.attention_scores_(scores, x["query"], x["keys"], 0.5, 0.9), which,
          [scores, x["query"], x["keys"]])


@pytest.mark.parametrize("kw, arg", [
    (dict(alpha=2.0), "alpha"), (dict(scaling=float("inf")), "scaling"), (dict(scaling=None), "scaling"),
    (dict(tol=-1e-3), "tol"), (dict(tol=float("nan")), "tol"),
    (dict(query=torch.randn(2, 3, 4, 8)), "query"), (dict(query=torch.randn(2, 2, 4, 7)), "query"),
    (dict(keys=torch.randn(2, 2, 5, 8)), "keys"), (dict(keys=torch.randn(2, 2, 6, 8).double()), "keys"),
    (dict(positions=torch.zeros(2, 2, 6)), "positions"), (dict(valid=torch.ones(2, 2, 6)), "valid"),
    (dict(query_positions=torch.zeros(2, 5, dtype=torch.int64)), "query_positions"),
    (dict(query_valid=torch.ones(2, 4, dtype=torch.int64)), "query_valid"),
])
def test_attention_scores_bad_arguments(kw, arg):
    scores = torch.rand(2, 2, 6)
    args = {"query": torch.randn(2, 4, 4, 8), "keys": torch.randn(2, 2, 6, 8), "scaling": 0.3, "alpha": 0.9, **kw}
    q, k, sc, al = args.pop("query"), args.pop("keys"), args.pop("scaling"), args.pop("alpha")
    clean(lambda: kvscore.attention_scores_(scores, q, k, sc, al, **args), arg, [scores])


def test_attention_scores_refuses_logits_that_overflow():
    # regression: finite queries and keys whose logits overflow float32 gave NaN scores silently
    scores = torch.rand(1, 1, 3)
    q, k = torch.full((1, 1, 1, 2), 1e30), torch.full((1, 1, 3, 2), 1e30)
    clean(lambda: kvscore.attention_scores_(scores, q, k, 1.0, 0.5), "keys", [scores])


def test_attention_scores_refuses_keys_aliasing_scores():
    buf = torch.rand(1 * 1 * 4 * 2)
    scores = buf[:4].view(1, 1, 4)
    clean(lambda: kvscore.attention_scores_(scores, torch.randn(1, 1, 2, 2), buf.view(1, 1, 4, 2), 1.0, 0.5),
          "keys", [buf])


@pytest.mark.parametrize("args, arg", [((float("nan"), 1e-7, 10), "alpha"), ((1.5, 1e-7, 10), "alpha"),
                                       ((0.9, -1.0, 10), "tol"), ((0.9, 1e-7, -1), "q_len"),
                                       ((0.9, 1e-7, 2.5), "q_len")])
def test_rows_needed_bad_arguments(args, arg):
    clean(lambda: kvscore.rows_needed(*args), arg)


# --- the numerics and requires-grad regressions --------------------------------------------------

@pytest.mark.parametrize("tiny", [1e-40, 1e-44, 3e-39])
def test_renorm_of_subnormal_rows_stays_finite(tiny):
    # regression: 1 / sum overflowed, so every slot got +inf (the "evicted" marker)
    scores = torch.zeros(1, 1, 4)
    attn = torch.full((1, 1, 1, 4), tiny)
    kvscore.accumulate_(scores, attn, 0.5, renorm=True)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, torch.full((1, 1, 4), 0.25))
    want = reference.kv_accumulate_(torch.zeros(1, 1, 4), attn, 0.5, renorm=True)
    torch.testing.assert_close(scores, want)


def test_inputs_that_require_grad_are_detached():
    # regression: "Can't call numpy() on Tensor that requires grad"
    scores, attn = _case()
    want = kvscore.accumulate_(scores.clone(), attn, 0.7)
    s = scores.clone().requires_grad_()
    got = kvscore.accumulate_(s, attn.clone().requires_grad_(), 0.7)
    assert got is s and torch.equal(got.detach(), want)
    q, k = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 6, 4)
    want = kvscore.attention_scores_(scores.clone(), q, k, 0.5, 0.9)
    got = kvscore.attention_scores_(scores.clone(), q.requires_grad_(), k.requires_grad_(), 0.5, 0.9)
    assert torch.equal(got, want)
    assert torch.equal(kvscore.select_keep(scores.requires_grad_(), 3), kvscore.select_keep(scores.detach(), 3))


# --- press constructors ---------------------------------------------------------------------------

PRESSES = {"A2SF": lambda **kw: A2SF(kw.pop("forgetting_factor", 0.9), **kw), "H2O": H2O,
           "RecentWindow": RecentWindow, "Knorm": Knorm, "SnapKV": SnapKV, "TOVA": TOVA,
           "ExpectedAttention": ExpectedAttention}
COMMON = [(dict(), "budget"), (dict(budget=10, compression_ratio=0.5), "budget"), (dict(budget=0), "budget"),
          (dict(budget=-3), "budget"), (dict(budget=2.5), "budget"), (dict(budget="8"), "budget"),
          (dict(compression_ratio=1.0), "compression_ratio"), (dict(compression_ratio=-0.1), "compression_ratio"),
          (dict(compression_ratio=float("nan")), "compression_ratio"),
          (dict(compression_ratio=0.5, n_sink=-1), "n_sink"),
          (dict(compression_ratio=0.5, mode="both"), "mode")]


@pytest.mark.parametrize("name", sorted(PRESSES))
@pytest.mark.parametrize("kw, arg", COMMON)
def test_press_constructor_common_arguments(name, kw, arg):
    clean(lambda: PRESSES[name](**kw), arg)


@pytest.mark.parametrize("make, arg", [
    (lambda: A2SF(float("nan"), compression_ratio=0.5), "forgetting_factor"),
    (lambda: A2SF(1.01, compression_ratio=0.5), "forgetting_factor"),
    (lambda: A2SF(0.9, compression_ratio=0.5, tol=-1.0), "tol"),
    (lambda: A2SF(0.9, compression_ratio=0.5, forgetting="word"), "forgetting"),
    (lambda: A2SF(0.9, compression_ratio=0.5, forgetting="sentence"), "punctuation_ids"),
    (lambda: SnapKV(compression_ratio=0.5, window=0), "window"),
    (lambda: SnapKV(compression_ratio=0.5, kernel_size=4), "kernel_size"),
    (lambda: ExpectedAttention(compression_ratio=0.5, n_queries=0), "n_queries"),
    (lambda: ExpectedAttention(compression_ratio=0.5, epsilon=float("inf")), "epsilon"),
    (lambda: Knorm(budget=4, n_sink=4, n_recent=8), "budget"),
])
def test_press_constructor_own_arguments(make, arg):
    clean(make, arg)
