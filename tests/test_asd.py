"""SEFE's answer-style diversification converters: labels preserved, style proportions exact, seeded."""

from collections import Counter

import pytest

from forgetcore.finetune.asd import STYLES, diversify, target_is_correct

ANSWERS = ["red", "blue", "green", "two", "cat", "dog", "yes", "table"]


def records(n=103):
    return [{"question": f"What is shown in image {i}?", "answer": ANSWERS[i % len(ANSWERS)], "id": i}
            for i in range(n)]


@pytest.mark.parametrize("percent", [0, 20, 50, 100])
def test_proportions_and_labels(percent):
    recs = records()
    out = diversify(recs, percent, seed=1)
    assert [r["id"] for r in out] == [r["id"] for r in recs]  # order and other keys kept
    assert all(o["answer"] == r["answer"] for o, r in zip(out, recs))
    counts = Counter(r["style"] for r in out)
    n_conv = round(percent / 100 * len(recs))
    assert counts["short"] == len(recs) - n_conv
    per = [counts[s] for s in STYLES[1:]]
    assert sum(per) == n_conv and max(per) - min(per) <= 1  # evenly over the four non-native styles
    assert all(target_is_correct(r) for r in out)


def test_style_formats():
    out = diversify(records(40), 100, seed=3)
    for r in out:
        if r["style"] == "mcq":
            assert r["target"] in "ABCD" and len(set(r["options"])) == 4 and r["answer"] in r["options"]
            assert set(r["options"]) <= set(ANSWERS) and "letter" in r["prompt"]
        elif r["style"] == "yes_no":
            assert r["target"] in ("Yes", "No") and f"'{r['asked']}'" in r["prompt"]
        elif r["style"] == "brief":
            assert len(r["target"].split()) <= 20
        elif r["style"] == "detailed":
            assert 20 < len(r["target"].split()) <= 50
    yes = [r["target"] == "Yes" for r in diversify(records(400), 100, seed=0) if r["style"] == "yes_no"]
    assert 0.35 < sum(yes) / len(yes) < 0.65  # p = 0.5 of asking the true answer


def test_seeded():
    assert diversify(records(), 30, seed=5) == diversify(records(), 30, seed=5)
    assert diversify(records(), 30, seed=5) != diversify(records(), 30, seed=6)


def test_bad_input():
    with pytest.raises(ValueError, match="^percent"):
        diversify(records(), 120)
    with pytest.raises(TypeError, match="^records"):
        diversify("question", 10)
    with pytest.raises(ValueError, match=r"^records\[1\]"):
        diversify([{"question": "q", "answer": "a"}, {"question": "q"}], 10)
    with pytest.raises(ValueError, match="^records: multiple choice needs 3 distractors"):
        diversify([{"question": "q", "answer": a} for a in ("x", "y")], 100)
    assert diversify([], 50) == []
