"""ASD (SEFE's Answer Style Diversification) as deterministic, rule-based data transforms.

Chen et al., "SEFE: Superficial and Essential Forgetting Eliminator for Multimodal Continual
Instruction Tuning" (ICML 2025). The paper converts X % of every task's training samples into the
other answer styles so that every task holds a similar mix of formats and a later task cannot
shift the model's output format ("superficial forgetting"). The official conversions use an LLM
(prompts in ``CoIN-ASD/prompts``; the converted data is on the Hugging Face hub); these are the
LLM-free rules (ours): multiple choice with distractors from the task's
own answers, yes/no with a 50 % chance of a distractor, short answer, and brief / detailed
template explanations capped at 20 / 50 words.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from .. import _checks

__all__ = ["STYLES", "diversify", "target_is_correct"]

STYLES = ("short", "mcq", "yes_no", "brief", "detailed")  # "short" is the native VQA style
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
YES_NO_INSTRUCTION = "Answer yes or no."
BRIEF_INSTRUCTION = "Answer the question and explain briefly."
DETAILED_INSTRUCTION = "Answer the question and explain in detail."
_LETTERS = "ABCD"


def _cap(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def _convert(rec: dict[str, Any], style: str, vocab: list[str], rng: random.Random) -> dict[str, Any]:
    q, a = rec["question"], rec["answer"]
    others = [v for v in vocab if v != a]
    out = {**rec, "style": style}
    if style == "short":
        out.update(prompt=f"{q}\n{SHORT_INSTRUCTION}", target=a)
    elif style == "mcq":
        if len(others) < 3:
            raise ValueError(f"records: multiple choice needs 3 distractors, the task has {len(others)} other answers")
        options = rng.sample(others, 3) + [a]
        rng.shuffle(options)
        lines = "\n".join(f"{_LETTERS[i]}. {o}" for i, o in enumerate(options))
        out.update(prompt=f"{q}\n{lines}\n{MCQ_INSTRUCTION}", target=_LETTERS[options.index(a)], options=options)
    elif style == "yes_no":
        asked = a if rng.random() < 0.5 or not others else rng.choice(others)
        out.update(prompt=f"{q} Is the answer '{asked}'?\n{YES_NO_INSTRUCTION}",
                   target="Yes" if asked == a else "No", asked=asked)
    elif style == "brief":
        text = _cap(f"The question asks: {q} Looking at the evidence, the answer is {a}.", 20)
        if not text.endswith(f"{a}."):  # the cap never cuts the answer: keep it last
            text = _cap(f"So the answer is {a}.", 20)
        out.update(prompt=f"{q}\n{BRIEF_INSTRUCTION}", target=text)
    else:  # detailed
        text = (f"The question asks: {q} To answer it, consider what is shown and what the question "
                f"refers to. Weighing the possible answers against the evidence, the one that fits is {a}. "
                f"Therefore, the answer is {a}.")
        words = text.split()
        if len(words) > 50:
            tail = f"Therefore, the answer is {a}.".split()
            text = " ".join(words[: 50 - len(tail)] + tail)
        out.update(prompt=f"{q}\n{DETAILED_INSTRUCTION}", target=text)
    return out


def diversify(records: Sequence[dict[str, Any]], percent: float, *, seed: int = 0) -> list[dict[str, Any]]:
    """Convert ``percent`` % of ``records`` into the four non-native answer styles, evenly.

    ``records``: dicts with ``question`` and ``answer`` (str; other keys are kept). Exactly
    ``round(percent / 100 * N)`` records, chosen at random with ``seed``, are converted; the
    converted ones are spread over ``mcq``, ``yes_no``, ``brief``, ``detailed`` as evenly as
    possible (the first ``remainder`` styles get one more); the others get the native ``short``
    style. Every output record keeps ``answer`` and adds ``style``, ``prompt`` and ``target``
    (MCQ adds ``options``; yes/no ``asked``); :func:`target_is_correct` checks a target
    against the answer. Distractors come from the task's own answer set. Deterministic in ``seed``.
    """
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TypeError(f"records: expected a list of dicts with question and answer, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(f"records[{i}]: expected a dict with str 'question' and 'answer', got {r!r:.80}")
    pct = _checks.real("percent", percent, low=0.0, high=100.0)
    seed = _checks.positive_int("seed", seed, allow_zero=True)
    rng = random.Random(seed)
    n = len(records)
    n_conv = round(pct / 100.0 * n)
    chosen = rng.sample(range(n), n_conv)
    styles = ["short"] * n
    for j, i in enumerate(chosen):
        styles[i] = STYLES[1 + j % 4]
    vocab = sorted({r["answer"] for r in records})
    return [_convert(r, s, vocab, rng) for r, s in zip(records, styles)]


def target_is_correct(record: dict[str, Any]) -> bool:
    """Whether a converted record's target is right for its original ``answer`` (label preservation)."""
    style, t, a = record["style"], record["target"], record["answer"]
    if style == "mcq":
        return record["options"][_LETTERS.index(t)] == a
    if style == "yes_no":
        return (t == "Yes") == (record["asked"] == a)
    if style == "short":
        return t == a
    cap = 20 if style == "brief" else 50
    return t.endswith(f"answer is {a}.") and len(t.split()) <= cap
