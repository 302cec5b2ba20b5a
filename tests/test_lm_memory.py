"""Orhan (2023) recognition/recall/retention and factual-knowledge acquisition on the tiny LM.

Seeds (0, 1, 2) were fixed before any result was seen. The tiny LM is pretrained once per
process (and cached on disk, see forgetcore.lm.pretrained_tiny_lm).
"""


import numpy as np
import pytest
import torch

from forgetcore import lm
from forgetcore.evaluation import knowledge as K
from forgetcore.evaluation import memory as M

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def tiny():
    return lm.pretrained_tiny_lm()


def fresh():
    return lm.pretrained_tiny_lm()


def test_item_losses_do_not_depend_on_batch_size_unlike_the_batch_mean(tiny):
    model, tok = tiny
    seen, _ = M.stimuli("natural", 6, seed=0)
    one = M.item_losses(model, tok, seen, batch_size=1)
    six = M.item_losses(model, tok, seen, batch_size=6)
    assert torch.allclose(one, six, atol=1e-5)
    # The official test.py pitfall: the model's batch-mean loss repeated for every item.
    ids, mask = lm.encode(tok, seen)
    with torch.no_grad():
        batch_mean = float(model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss)
    assert (one - batch_mean).abs().max() > 0.1  # it would erase the per-item differences 2AFC needs


def test_rouge_l_and_log_schedule():
    assert M.rouge_l("the cat sat", "the cat sat") == 1.0
    assert M.rouge_l("a b c d", "a x c y") == pytest.approx(0.5)  # LCS a c: P = R = 2/4
    assert M.rouge_l("", "a") == 0.0
    assert M.log_schedule(300) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300]


@pytest.mark.parametrize("condition", M.CONDITIONS)
def test_stimuli_are_seeded_and_length_matched(condition):
    seen, foils = M.stimuli(condition, 8, seed=3)
    assert (seen, foils) == M.stimuli(condition, 8, seed=3)
    assert len(seen) == len(foils) == 8 and all(s != f for s, f in zip(seen, foils))
    assert all(len(s.split()) == len(f.split()) for s, f in zip(seen, foils))


def test_claim_recognition_near_perfect_after_three_exposures_and_above_recall():
    """Orhan: recognition is near-perfect after 1-3 exposures and clearly above recall.

    At this scale recall (ROUGE-L of the greedy completion) barely moves above the pre-study
    model's score after 3 exposures, while 2AFC recognition reaches >= 0.85. Both are put on
    one scale: the fraction of the way from the pre-study level (chance 0.5 for recognition,
    the pre-study ROUGE-L for recall) to perfect.
    """
    for seed in SEEDS:
        model, tok = fresh()
        seen, foils = M.stimuli("natural", 24, seed=seed)
        rec0 = M.recognition(model, tok, seen, foils)["accuracy"]
        base = M.recall(model, tok, seen)["rouge_l"]
        M.study(model, tok, seen, epochs=3, lr=3e-3, batch_size=4, seed=seed)
        rec = M.recognition(model, tok, seen, foils)["accuracy"]
        rcl = M.recall(model, tok, seen)["rouge_l"]
        assert rec >= 0.85 and rec > rec0 + 0.2, (seed, rec0, rec)
        rec_gain = (rec - 0.5) / 0.5
        rcl_gain = (rcl - base) / (1 - base)
        assert rec_gain > rcl_gain + 0.5, (seed, rec, rcl, base)


def test_claim_recall_decays_faster_than_recognition():
    """Orhan: under continued training on other text, recall decays faster than recognition.

    Departure for scale: the tiny LM needs 8 exposures (not 3) before recall rises measurably
    above the pre-study score; then 30 steps of continued training on other prose erase most of
    the recall gain and little of recognition's.
    """
    other = lm.prose(300, offset=lm.N_PRETRAIN_PROSE + 500)
    for seed in SEEDS:
        model, tok = fresh()
        seen, foils = M.stimuli("natural", 16, seed=seed)
        base = M.recall(model, tok, seen)["rouge_l"]
        M.study(model, tok, seen, epochs=8, lr=3e-3, batch_size=4, seed=seed)
        res = M.retention(model, tok, seen, foils, other, steps=30, lr=3e-3, seed=seed, schedule=[30])
        rec_lost = M.summary_drop(res["recognition"], 0.5)
        rcl_lost = M.summary_drop(res["recall"], base)
        assert res["recall"][0] > base + 0.03, (seed, base, res)
        assert rcl_lost > rec_lost + 0.3, (seed, res, base)


def test_bad_input_is_refused_clearly(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="^texts"):
        M.item_losses(model, tok, [])
    with pytest.raises(ValueError, match="^foils"):
        M.recognition(model, tok, ["a b c ."], ["a b c d e ."])
    with pytest.raises(ValueError, match="^foils"):
        M.recognition(model, tok, ["a b c .", "d e f ."], ["a b c ."])
    with pytest.raises(TypeError, match="^model"):
        M.item_losses(model.model, tok, ["a b c ."])  # the bare LlamaModel has no LM head
    no_pad = lm.tiny_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="^tokenizer.*pad_token = tokenizer.eos_token"):
        M.recall(model, no_pad, ["a b c ."])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="^epochs"):
        M.study(model, tok, ["a b c ."], epochs=-1)
    with pytest.raises(ValueError, match="^condition"):
        M.stimuli("moby", 3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ----------------------------------------------------------------------------- knowledge


def test_span_losses_cover_only_the_target(tiny):
    model, tok = tiny
    ids, mask, tmask = K.encode_probes(tok, [("zorbia was born in", "quenlor ."), ("the job of x is", "baker .")])
    assert tmask.sum(1).tolist() == [2, 2]
    a = K.span_losses(model, tok, [("zorbia was born in", "quenlor .")])
    b = K.span_losses(model, tok, [("zorbia was born in", "quenlor ."), ("the job of x is", "baker .")], batch_size=1)
    assert torch.allclose(a, b[:1], atol=1e-5)


def test_metrics_on_a_handmade_curve():
    v = np.array([5.0, 4.0, 3.0, 3.5, 4.0, 4.5, 5.0])
    assert K.effectivity(v, [0], window=3)[0, 0] == 2.0  # v[0] - min(v[1..3])
    r = K.retainability(v, 0, window=3)[:, 0]  # LAM = 2; gain 2
    assert r[:4].tolist() == [75.0, 50.0, 25.0, 0.0]
    t = np.array([1, 10, 100, 1000])
    fit = K.decay_fit(t, 0.9 - 0.2 * np.log10(t))
    assert fit["slope"] == pytest.approx(-0.2) and fit["r2"] == pytest.approx(1.0)
    assert fit["x_intercept_log10"] == pytest.approx(4.5) and fit["t_forgotten"] == pytest.approx(10 ** 4.5)
    assert fit["rmse_log"] == pytest.approx(0.0, abs=1e-9) and fit["rmse_exp"] > 0.01
    x = np.r_[np.arange(20.0), 1000.0]
    assert 1000.0 not in K.iqr_filter(x) and len(K.iqr_filter(x)) == 20
    with pytest.raises(ValueError, match="^v"):
        K.effectivity(np.array([1.0, np.nan]), [0])
    with pytest.raises(ValueError, match="^texts"):
        K.replace_in_batch(["a"], ["b", "c"], seed=0)


def test_claim_knowledge_acquisition_effectivity_and_power_law_forgetting():
    """Chang et al. 2024 in miniature: 15 fictional facts injected into continued training on
    background text by replacing batch sequences (5 once at step 0, 5 duplicated and 5
    paraphrased at steps 0, 20, 40), target-span losses of all probes logged every step.

    Asserted: effectivity > 0, and larger for memorisation probes (the injected wording) than
    for generalisation probes (an unseen paraphrase); retainability after the last injection
    falls with log t (negative slope; R^2 > 0.4, a bound set after seeing 0.63-0.72); duplicated
    injection keeps more of its gain than a single one, measured the same number of steps
    after the last injection. Window 10 steps instead of 50 for the scale.
    """
    for seed in SEEDS:
        model, tok = fresh()
        items = K.fact_items(15, seed=seed)
        for i, it in enumerate(items):
            it["mode"] = K.MODES[i % 3]
        steps_at = [0, 20, 40]
        probes = [it["mem_probe"] for it in items] + [it["gen_probe"] for it in items]
        bg = lm.templated_corpus(2000, seed=100 + seed) + lm.prose(600, offset=lm.N_PRETRAIN_PROSE + 100)
        v = K.run_injection(model, tok, bg, K.injection_schedule(items, steps_at), probes, steps=100,
                            batch_size=16, lr=1e-3, seed=seed).numpy()
        n = len(items)
        e = K.effectivity(v, [0], window=10)[0]
        inj = [i for i, it in enumerate(items)]
        e_mem, e_gen = e[inj].mean(), e[[n + i for i in inj]].mean()
        assert e_mem > 0.05 and e_mem > e_gen, (seed, e_mem, e_gen)
        once = [i for i, it in enumerate(items) if it["mode"] == "once"]
        dup = [i for i, it in enumerate(items) if it["mode"] == "duplicate"]
        r = K.retainability(v[:, once], 0, window=10)
        curve = np.array([K.filtered_mean(row) for row in r[:50]])
        ts = np.arange(1, 51)
        fit = K.decay_fit(ts, curve / 100)
        assert fit["slope"] < 0 and fit["r2"] > 0.4, (seed, fit)
        t = 55  # retained gain, t steps after each mode's last injection
        kept_once = (v[0, once] - v[0 + t, once]).mean()
        kept_dup = (v[0, dup] - v[40 + t, dup]).mean()
        print(f"seed {seed}: E mem {e_mem:.3f} gen {e_gen:.3f}; decay slope {fit['slope']:.3f} "
              f"R2 {fit['r2']:.2f}; kept dup {kept_dup:.3f} once {kept_once:.3f}")
        assert kept_dup > kept_once, (seed, kept_dup, kept_once, fit["r2"])


def test_tiny_lm_is_a_fresh_copy_each_call_and_facts_split_at_the_attribute(tiny):
    model, tok = tiny
    other, _ = lm.pretrained_tiny_lm()
    assert other is not model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert lm.fact("pet", "kalo", "owl") == ("kalo owns a pet", "owl .")
    assert lm.fact("job", "kalo", "baker", 1) == ("the job of kalo is", "baker .")
    assert 1 not in tok("kalo owns a pet owl .")["input_ids"]  # no unknown words in templated facts
    with pytest.raises(ValueError, match="^relation"):
        lm.fact("height", "kalo", "tall")


def test_smollm2_takes_the_same_code_path(smollm2):
    """The real model through the same functions (evaluation only: the fixture is shared)."""
    model, tok = smollm2
    seen, foils = ["the value is determined when the interpreter starts .", "assignments to debug are illegal ."], \
        ["the module is imported when the statement runs first .", "comparisons of types are allowed ."]
    one = M.item_losses(model, tok, seen, batch_size=1)
    two = M.item_losses(model, tok, seen, batch_size=2)
    assert torch.allclose(one, two, atol=1e-4) and torch.isfinite(one).all()
    side, tok.padding_side = tok.padding_side, "left"  # a user's left-padding tokenizer: same losses
    try:
        left = M.item_losses(model, tok, seen, batch_size=2)
    finally:
        tok.padding_side = side
    assert torch.allclose(one, left, atol=1e-4)
    assert 0.0 <= M.recognition(model, tok, seen, foils, max_word_gap=1)["accuracy"] <= 1.0
    out = M.recall(model, tok, seen[1:])
    assert out["outputs"][0].lower().startswith("assignments") and 0 < out["rouge_l"] <= 1
    span = K.span_losses(model, tok, [("kalo owns a pet", "owl ."), ("the job of kalo is", "baker .")])
    assert span.shape == (2,) and torch.isfinite(span).all()
