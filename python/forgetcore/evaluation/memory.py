"""Recognition, recall and retention of few-shot memories in a causal language model.

Orhan, "Recognition, recall, and retention of few-shot memories in large language models"
(arXiv 2303.17557, 2023); official code ``eminorhan/llm-memory`` (``test.py`` recognition,
``generate.py`` recall, ``train.py`` study and retention). Works on any Hugging Face causal LM
and its tokenizer (SmolLM2 through :func:`forgetcore.models.load_smollm2`, or the tiny LM of
:mod:`forgetcore.lm`).

- Study (:func:`study`): fine-tune on the "seen" sentences for 1-3 epochs ("exposures"), AdamW
  with weight decay 0, padding masked out of the loss (the paper's setup).
- Recognition (:func:`recognition`): two-alternative forced choice. Item ``i`` is correct when
  the mean token loss of ``seen[i]`` is below that of ``foils[i]``; accuracy is the mean (chance
  50 %). Per-item losses come from the logits row by row (:func:`item_losses`), so they are right
  at any batch size: the official ``test.py`` repeats the batch-mean loss for every item, which
  is only correct at batch size 1 (``loss.repeat(batch_size)`` in ``test.py`` at commit 48b4c40;
  a test here shows the difference).
- Recall (:func:`recall`): prompt with the first ``floor(n/2)`` tokens of a studied sentence
  (``n`` its token length), decode greedily to ``n`` tokens, and score ROUGE-L (F-measure of the
  longest common subsequence over lower-cased alphanumeric words, as ``rouge_score`` tokenises)
  of the whole output, prompt included, against the whole sentence. The prompt inflates the
  score, so report it beside the pre-study model's score (``baseline``). ``generate.py`` (read at
  commit 39f4ba4) cuts every item of a batch at the first item's length, so it too is only
  right at batch size 1; here each item has its own prompt and length.
- Retention (:func:`retention`): keep training on other text and re-measure at log-spaced steps
  (:func:`log_schedule`: 1..10, 20..100, 200..1000, ...).

The paper's six stimulus conditions are seeded generators (:func:`stimuli`). Three need material
that is not offline, so they use stated substitutes (departures): condition 2's foils are
templated paraphrases instead of an LLM's; condition 3 swaps one word through a small synonym
table written here (:data:`forgetcore.lm.SYNONYMS`) instead of a thesaurus, on templated scene
sentences; conditions 4 and 5 draw random strings over the Python reference manual's vocabulary
(``pydoc_data.topics``) instead of Moby-Dick's. Natural sentences are real prose from the same
manual instead of Substack posts. Condition 6 scrambles characters within each word, which a
word-level tokenizer (the tiny LM's) maps to unknown tokens; it is meaningful with sub-word
tokenizers such as SmolLM2's.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import _checks, lm

CONDITIONS = ("natural", "paraphrase", "synonym", "random", "random_vs_natural", "gibberish")


# ----------------------------------------------------------------------------- losses and scores

def _texts(name: str, texts: Any, *, allow_empty: bool = False) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name}: expected a sequence of strings, got {type(texts).__name__}")
    out = list(texts)
    if not out and not allow_empty:
        raise ValueError(f"{name}: expected at least one text, got an empty list")
    for t in out:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{name}: expected non-empty strings, got {t!r}")
    return out


def _device(model: Any) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def item_losses(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Mean next-token cross-entropy of each text, shape (N,), float32 on the CPU.

    Padding is excluded per row (:func:`forgetcore.lm.token_losses`), so the result does not
    depend on ``batch_size``.
    """
    lm.check_causal_lm(model, tokenizer)
    texts = _texts("texts", texts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = lm.encode(tokenizer, texts[i : i + batch_size], _device(model))
        ce = lm.token_losses(model, ids, mask)
        n = mask[:, 1:].sum(1).clamp_min(1)
        out.append((ce.sum(1) / n).float().cpu())
    model.train(was)
    return torch.cat(out)


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words, as ``rouge_score``'s default tokenizer splits them."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) between two strings over :func:`words`."""
    a, b = words(prediction), words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def recognition(model: Any, tokenizer: Any, seen: Sequence[str], foils: Sequence[str], *, batch_size: int = 16,
                max_word_gap: int | None = 0) -> dict[str, Any]:
    """Two-alternative forced choice between ``seen[i]`` and ``foils[i]`` (paired by index).

    Returns ``accuracy`` (fraction of items whose seen sentence has the lower mean token loss),
    ``correct`` (bool tensor), ``seen_loss`` and ``foil_loss``. ``max_word_gap``: foils must be
    length-matched, so a pair whose word counts differ by more than this raises ValueError
    (None: no check).
    """
    seen, foils = _texts("seen", seen), _texts("foils", foils)
    if len(seen) != len(foils):
        raise ValueError(f"foils: expected one foil per seen item ({len(seen)}), got {len(foils)}")
    if max_word_gap is not None:
        for i, (s, f) in enumerate(zip(seen, foils)):
            if abs(len(s.split()) - len(f.split())) > max_word_gap:
                raise ValueError(f"foils: item {i} is not length-matched ({len(s.split())} words seen, "
                                 f"{len(f.split())} in the foil; max_word_gap={max_word_gap})")
    ls = item_losses(model, tokenizer, seen, batch_size)
    lf = item_losses(model, tokenizer, foils, batch_size)
    correct = ls < lf
    return {"accuracy": float(correct.float().mean()), "correct": correct, "seen_loss": ls, "foil_loss": lf}


@torch.no_grad()
def greedy_complete(model: Any, tokenizer: Any, prompts: list[torch.Tensor], lengths: list[int],
                    batch_size: int = 16) -> list[torch.Tensor]:
    """Greedy continuations: ``prompts[i]`` (1-D token ids) extended to exactly ``lengths[i]``
    tokens (no early stop, as ``min_length = max_length = n`` in the official code). Prompts are
    left-padded in a batch with position ids that skip the padding."""
    dev = _device(model)
    pad = tokenizer.pad_token_id
    out: list[torch.Tensor] = []
    for i in range(0, len(prompts), batch_size):
        ps, ns = prompts[i : i + batch_size], lengths[i : i + batch_size]
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ps), width), dtype=torch.long)
        for r, p in enumerate(ps):
            ids[r, width - len(p):] = p
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        for _ in range(max(n - len(p) for p, n in zip(ps, ns))):
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        for r, (p, n) in enumerate(zip(ps, ns)):
            row = ids[r, width - len(p):]
            out.append(row[:n].cpu())
    return out


def recall(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16) -> dict[str, Any]:
    """Cued recall: first half of each text's tokens as the prompt, greedy completion to the
    text's token length, ROUGE-L of the whole output against the whole text.

    Returns ``rouge_l`` (mean), ``scores`` (per item) and ``outputs`` (decoded texts).
    """
    lm.check_causal_lm(model, tokenizer)
    texts = _texts("texts", texts)
    ids = [torch.tensor(tokenizer(t)["input_ids"], dtype=torch.long) for t in texts]
    short = [i for i, x in enumerate(ids) if len(x) < 2]
    if short:
        raise ValueError(f"texts: item {short[0]} has fewer than 2 tokens; recall needs a prompt and a continuation")
    was = model.training
    model.eval()
    full = greedy_complete(model, tokenizer, [x[: len(x) // 2] for x in ids], [len(x) for x in ids], batch_size)
    model.train(was)
    outputs = [tokenizer.decode(f, skip_special_tokens=True) for f in full]
    scores = [rouge_l(o, t) for o, t in zip(outputs, texts)]
    return {"rouge_l": sum(scores) / len(scores), "scores": scores, "outputs": outputs}


# ----------------------------------------------------------------------------- study and retention

def study(model: Any, tokenizer: Any, texts: Sequence[str], *, epochs: int = 1, lr: float = 1e-4,
          batch_size: int = 4, seed: int = 0, progress: bool = False) -> int:
    """Fine-tune on ``texts`` for ``epochs`` passes ("exposures"), each a seeded shuffle, with
    AdamW (weight decay 0) and the padding masked out of the loss. Returns the number of steps."""
    lm.check_causal_lm(model, tokenizer)
    texts = _texts("texts", texts)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs: expected an int >= 0, got {epochs!r}")
    dev = _device(model)
    ids, mask = lm.encode(tokenizer, texts)
    labels = ids.masked_fill(mask == 0, -100)
    g = torch.Generator().manual_seed(_checks.seed(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    steps = 0
    for _ in tqdm(range(epochs), desc="study", disable=not progress, leave=False):
        for b in torch.randperm(len(texts), generator=g).split(batch_size):
            loss = model(input_ids=ids[b].to(dev), attention_mask=mask[b].to(dev), labels=labels[b].to(dev)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    model.eval()
    return steps


def log_schedule(max_step: int) -> list[int]:
    """Log-spaced evaluation steps up to ``max_step``: 1..10, 20..100, 200..1000, ... (the
    official retention scripts' schedule)."""
    if isinstance(max_step, bool) or not isinstance(max_step, int) or max_step < 1:
        raise ValueError(f"max_step: expected an int >= 1, got {max_step!r}")
    out, unit = [], 1
    while unit <= max_step:
        out += [k * unit for k in range(1, 10) if k * unit <= max_step]
        unit *= 10
    return out


def retention(model: Any, tokenizer: Any, seen: Sequence[str], foils: Sequence[str], other_text: Sequence[str], *,
              steps: int, lr: float = 1e-4, batch_size: int = 4, seed: int = 0,
              schedule: Sequence[int] | None = None, recall_items: int | None = None, eval_batch_size: int = 16,
              progress: bool = False) -> dict[str, list[float]]:
    """Keep training on ``other_text`` (batches drawn with replacement from a seeded generator)
    and re-measure recognition and recall of the studied items at step 0 and at each step of
    ``schedule`` (default :func:`log_schedule`). ``recall_items`` limits recall to the first so
    many items (generation is the slow part). Returns lists ``step``, ``recognition``, ``recall``
    and ``loss`` (mean seen-item loss)."""
    lm.check_causal_lm(model, tokenizer)
    seen, foils = _texts("seen", seen), _texts("foils", foils)
    other = _texts("other_text", other_text)
    sched = sorted(set(log_schedule(steps) if schedule is None else (int(s) for s in schedule)))
    if any(s < 1 or s > steps for s in sched):
        raise ValueError(f"schedule: expected steps in [1, {steps}], got {sched}")
    cued = seen[: recall_items] if recall_items else seen
    dev = _device(model)
    ids, mask = lm.encode(tokenizer, other)
    labels = ids.masked_fill(mask == 0, -100)
    g = torch.Generator().manual_seed(_checks.seed(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    res: dict[str, list[float]] = {"step": [], "recognition": [], "recall": [], "loss": []}

    def measure(step: int) -> None:
        rec = recognition(model, tokenizer, seen, foils, batch_size=eval_batch_size, max_word_gap=None)
        res["step"].append(step)
        res["recognition"].append(rec["accuracy"])
        res["loss"].append(float(rec["seen_loss"].mean()))
        res["recall"].append(recall(model, tokenizer, cued, batch_size=eval_batch_size)["rouge_l"])

    measure(0)
    todo = set(sched)
    for step in tqdm(range(1, steps + 1), desc="retention", disable=not progress, leave=False):
        b = torch.randint(len(other), (batch_size,), generator=g)
        model.train()
        loss = model(input_ids=ids[b].to(dev), attention_mask=mask[b].to(dev), labels=labels[b].to(dev)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in todo:
            measure(step)
    model.eval()
    return res


# ----------------------------------------------------------------------------- stimuli

def _scramble(word: str, rng: random.Random) -> str:
    chars = list(word)
    for _ in range(5):  # a few tries to make it differ
        rng.shuffle(chars)
        if "".join(chars) != word:
            break
    return "".join(chars)


def _random_string(rng: random.Random, vocab: Sequence[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def stimuli(condition: str, n: int, *, seed: int = 0, n_words: int = 25) -> tuple[list[str], list[str]]:
    """(seen, foils): ``n`` study sentences and their paired, length-matched foils.

    Conditions (Orhan 2023, section 2; substitutes marked as departures in the module doc):
    ``"natural"`` real prose vs other real prose with the same word count; ``"paraphrase"``
    templated facts vs templated paraphrases of the same facts (same word count);
    ``"synonym"`` templated scene sentences vs the same with one word swapped for a synonym;
    ``"random"`` ``n_words``-word random strings vs other random strings; ``"random_vs_natural"``
    random strings vs real prose of the same length; ``"gibberish"`` character-scrambled prose
    vs the original prose. Prose comes from past the tiny LM's pretraining slice.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition: expected one of {CONDITIONS}, got {condition!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    rng = random.Random(f"{condition}:{seed}")
    pool = lm.prose(100_000, offset=lm.N_PRETRAIN_PROSE)
    by_len: dict[int, list[str]] = {}
    for s in pool:
        by_len.setdefault(len(s.split()), []).append(s)

    def prose_pairs() -> tuple[list[str], list[str]]:
        lengths = [k for k, v in by_len.items() if len(v) >= 2]
        seen, foils, used = [], [], set()
        for _ in range(50 * n):
            k = rng.choice(lengths)
            a, b = rng.sample(by_len[k], 2)
            if a in used or b in used:
                continue
            used |= {a, b}
            seen.append(a)
            foils.append(b)
            if len(seen) == n:
                return seen, foils
        raise ValueError(f"n: only {len(seen)} length-matched prose pairs are available, asked for {n}")

    if condition == "natural":
        return prose_pairs()
    if condition == "gibberish":
        originals = rng.sample(pool, n) if n <= len(pool) else None
        if originals is None:
            raise ValueError(f"n: at most {len(pool)} prose sentences are available, asked for {n}")
        return [" ".join(_scramble(w, rng) if w.isalpha() else w for w in s.split()) for s in originals], originals
    if condition in ("random", "random_vs_natural"):
        vocab = lm.prose_words()
        if condition == "random":
            return ([_random_string(rng, vocab, n_words) for _ in range(n)],
                    [_random_string(rng, vocab, n_words) for _ in range(n)])
        naturals = rng.sample(pool, n) if n <= len(pool) else None
        if naturals is None:
            raise ValueError(f"n: at most {len(pool)} prose sentences are available, asked for {n}")
        return [_random_string(rng, vocab, len(s.split())) for s in naturals], naturals
    if condition == "synonym":
        seen, foils = [], []
        while len(seen) < n:
            s = lm.templated_corpus(1, seed=rng.randrange(2**31))[0]
            ws = s.split()
            swappable = [i for i, w in enumerate(ws) if w in lm.SYNONYMS]
            if not swappable or s in seen:
                continue
            i = rng.choice(swappable)
            seen.append(s)
            foils.append(" ".join(lm.SYNONYMS[w] if j == i else w for j, w in enumerate(ws)))
        return seen, foils
    # paraphrase: a fact in one wording vs the same fact in another wording of the same length
    seen, foils = [], []
    ents = list(lm.names()[300:])  # entities the tiny LM never saw in pretraining
    rels = sorted(lm.RELATIONS)
    while len(seen) < n:
        rel = rng.choice(rels)
        attrs, templates = lm.RELATIONS[rel]
        e, a = rng.choice(ents), rng.choice(attrs)
        texts = [t.format(e=e, a=a) for t in templates]
        pairs = [(x, y) for x in texts for y in texts if x != y and len(x.split()) == len(y.split())]
        if not pairs:
            continue
        x, y = rng.choice(pairs)
        if x in seen:
            continue
        seen.append(x)
        foils.append(y)
    return seen, foils


def summary_drop(values: Sequence[float], chance: float) -> float:
    """Fraction of the above-chance part lost from the first to the last value (0: none lost,
    1: back to chance); NaN when the first value is at or below chance."""
    first, last = float(values[0]), float(values[-1])
    return (first - last) / (first - chance) if first > chance else math.nan


__all__ = ["CONDITIONS", "greedy_complete", "item_losses", "log_schedule", "recall", "recognition", "retention",
           "rouge_l", "stimuli", "study", "summary_drop", "words"]
