"""The public scorer-press API on SmolLM2: every press with batch > 1 and left padding on the
real shrinking cache, a user-written press, and a press that fails leaving the model as it was."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from forgetcore.kvcache import A2SF, H2O, RecentWindow
from forgetcore.kvcache.presses import TOVA, ExpectedAttention, Knorm, Press, SnapKV, cache_kwarg

PROMPTS = ["The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is",
           "Count: one, two, three,"]


@pytest.fixture(scope="module")
def lm(smollm2_left):
    return smollm2_left


@pytest.fixture(scope="module")
def enc(lm):
    return lm[1](PROMPTS, padding=True, return_tensors="pt")


def _presses(budget, mode="prefill"):
    return [A2SF(0.9, budget=budget, n_sink=2, n_recent=2, mode=mode),
            H2O(budget=budget, n_sink=2, n_recent=2, mode=mode),
            RecentWindow(budget=budget, n_sink=2, mode=mode), SnapKV(budget=budget, window=3, kernel_size=3, mode=mode),
            TOVA(budget=budget, mode=mode), Knorm(budget=budget, n_sink=0, n_recent=2, mode=mode),
            ExpectedAttention(budget=budget, n_sink=2, n_recent=2, n_queries=4, mode=mode)]


def _prefill(model, ids, mask, press):
    with torch.no_grad(), press(model):
        cache = press.make_cache()
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache})
    return cache


def _kept(cache, row, offset):
    """Per layer, per head: the set of kept token indices (relative to the row's first real token)."""
    return [[sorted((lay.pos[row, h][lay.valid[row, h]] - offset).tolist()) for h in range(lay.pos.shape[1])]
            for lay in cache.kv]


@pytest.mark.parametrize("i", range(7))
def test_batched_left_padded_prefill_keeps_what_each_prompt_keeps_alone(lm, enc, i):
    """Batch 2 with left padding keeps, in every layer and head of each row, the tokens that
    the same press keeps for that prompt alone (batch 1, no padding): padding and batching are
    handled by the framework for every press, on a cache that really shrinks."""
    model, _ = lm
    ids, mask = enc["input_ids"], enc["attention_mask"]
    L = ids.shape[1]
    budget = 12
    batched = _prefill(model, ids, mask, _presses(budget)[i])
    assert batched.physical_length() == budget
    agree = total = 0
    for r in range(2):
        n = int(mask[r].sum())
        alone = _prefill(model, ids[r:r + 1, L - n:], mask[r:r + 1, L - n:], _presses(budget)[i])
        a, b = _kept(batched, r, L - n), _kept(alone, 0, 0)
        for la, lb in zip(a, b):
            for ha, hb in zip(la, lb):
                agree += ha == hb
                total += 1
                assert len(ha) == min(n, budget) and all(0 <= p < n for p in ha)   # no pad kept, budget met
    # float rounding differs between the padded and unpadded attention (a masked softmax over
    # more columns): a near-tie may flip in a few heads, never more than 5 %
    assert agree >= 0.95 * total, (agree, total)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_every_press_with_room_for_everything_generates_like_the_full_cache(lm, enc, mode):
    model, _ = lm
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=5, do_sample=False)
        for press in _presses(1000, mode):
            with press(model):
                out = model.generate(**enc, max_new_tokens=5, do_sample=False)
            assert torch.equal(out, ref), press


class Oldest(Press):
    """A user-written press: keep the oldest tokens (score = minus the position)."""

    def score(self, ctx):
        return -ctx.positions.float()


def test_a_user_press_needs_only_score(lm, enc):
    model, _ = lm
    ids, mask = enc["input_ids"], enc["attention_mask"]
    L = ids.shape[1]
    cache = _prefill(model, ids, mask, Oldest(budget=5, n_sink=0, n_recent=0))
    for r in range(2):
        first = L - int(mask[r].sum())
        for lay in cache.kv:
            for h in range(lay.pos.shape[1]):
                assert sorted(lay.pos[r, h][lay.valid[r, h]].tolist()) == list(range(first, first + 5))
    # step-wise: the cache stays at the budget and keeps the oldest tokens
    press = Oldest(budget=5, n_sink=0, n_recent=1, mode="decode")
    with torch.no_grad(), press(model):
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == L + 4


class Broken(Press):
    def score(self, ctx):
        return ctx.positions[..., :-1].float()      # wrong shape


def test_a_press_that_fails_names_itself_and_restores_the_model(lm, enc):
    model, _ = lm
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"^Broken.score: expected a float tensor of shape"):
        _prefill(model, enc["input_ids"], enc["attention_mask"], Broken(budget=5, n_sink=0, n_recent=0))
    assert model.config._attn_implementation == impl
    assert not any(hasattr(layer.self_attn, "_forgetcore_press") for layer in model.model.layers)
    with pytest.raises(ValueError, match="^punctuation_ids"):
        A2SF(0.9, budget=20, forgetting="sentence")
    with pytest.raises(ValueError, match="^kernel_size"):
        SnapKV(budget=80, kernel_size=4)
