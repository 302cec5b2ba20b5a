"""Offline, seeded evaluation of KV presses on a real LM (SmolLM2-135M-Instruct by default).

Two tasks, both built here from nothing but a seed:

- **Associative recall** (kvpress's protocol: the question is not compressed). A context of
  ``n_facts`` lines "The code for <word> is <4 digits>." is prefilled under the press and
  compressed; then "Question: ... Answer: The code for <word> is" plus the answer are appended
  after compression, and a prompt counts as correct when greedy decoding would produce the
  whole answer (every answer token is the argmax given the ones before it). The asked fact's
  depth (its index among the facts) cycles through the context.
- **Passkey retrieval in real prose** (:func:`needle_items`): "The pass key is NNNNN." placed at
  a seeded depth inside ``tokens`` tokens of ``pydoc_data.topics`` text, the question appended
  after compression; scored like the recall task (the whole 5-digit answer must be greedy).
- **Perplexity** of held-out prose from the standard library's ``pydoc_data.topics``: a
  ``context`` of tokens is compressed, then the next ``continuation`` tokens are scored.

Batches are left-padded, so rows of different lengths share one budget (a ratio applies to the
longest prompt); the appended question chunk is left-padded too and its pads are masked.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .presses import ScoreAll, cache_kwarg

_WORDS = ("apple river stone cloud maple tiger candle violin harbor pepper falcon copper meadow lantern "
          "orchid walnut silver garden pillow rocket saddle thunder velvet window zebra anchor basket "
          "cactus dragon ember feather glacier hammer island jungle kettle lemon marble needle olive "
          "parrot quartz ribbon salmon tulip umbrella valley wizard yogurt bridge castle desert forest "
          "helmet jacket ladder mirror number ocean pencil rabbit shadow tunnel wagon").split()


_PROGRESS = [False]   # inner (per-press) bars follow the outer call's progress flag


@dataclass
class RecallItem:
    context: str
    question: str
    answer: str
    depth: float   # 0 = first fact, 1 = last fact


def recall_items(n: int, n_facts: int = 24, seed: int = 0) -> list[RecallItem]:
    """``n`` seeded recall prompts; depths spread evenly over [0, 1]."""
    rng = random.Random(seed)
    items = []
    for k in range(n):
        keys = rng.sample(_WORDS, n_facts)
        vals = [str(rng.randrange(1000, 10000)) for _ in keys]
        lines = [f"The code for {w} is {v}." for w, v in zip(keys, vals)]
        idx = min(n_facts - 1, round((k + 0.5) / n * n_facts - 0.5)) if n > 1 else rng.randrange(n_facts)
        ctx = "Here is a list of secret codes. Remember them.\n" + "\n".join(lines) + "\n"
        q = f"Question: What is the code for {keys[idx]}?\nAnswer: The code for {keys[idx]} is"
        items.append(RecallItem(ctx, q, " " + vals[idx], idx / max(1, n_facts - 1)))
    return items


def _prose_ids(tok) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]


def needle_items(tok, n: int, tokens: int, seed: int = 0) -> list[RecallItem]:
    """``n`` seeded passkey prompts: about ``tokens`` tokens of real prose with the needle at
    depths spread evenly over (0, 1) (item k at (k + 0.5) / n), disjoint windows of the text."""
    ids = _prose_ids(tok)
    rng = random.Random(seed)
    starts = rng.sample(range(0, len(ids) - tokens, tokens), n)
    items = []
    for k, s0 in enumerate(starts):
        key = str(rng.randrange(10000, 100000))
        depth = (k + 0.5) / n
        cut = int(depth * tokens)
        before, after = tok.decode(ids[s0:s0 + cut]), tok.decode(ids[s0 + cut:s0 + tokens])
        ctx = before + f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n" + after
        q = "\nWhat is the pass key? The pass key is"
        items.append(RecallItem(ctx, q, " " + key, depth))
    return items


def prose_chunks(tok, n: int, context: int, continuation: int, seed: int = 0) -> torch.Tensor:
    """``n`` token windows (n, context + continuation) of ``pydoc_data.topics`` prose, seeded."""
    ids = _prose_ids(tok)
    need = context + continuation
    rng = random.Random(seed)
    starts = rng.sample(range(0, len(ids) - need, need), n)
    return torch.stack([ids[s:s + need] for s in starts])


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
    return ids, mask


def _forward(model, ids, mask, full_mask, cache):
    pos = (full_mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
    return model(input_ids=ids, attention_mask=full_mask, position_ids=pos, use_cache=True,
                 **{cache_kwarg(model): cache}).logits


def _run_many(model, presses, ctx_ids, ctx_mask, tail_ids, tail_mask) -> list[torch.Tensor]:
    """Tail logits for each press (None = full cache) after one shared prefill of the context.

    The prefill is scored for every press at once (:class:`~.presses.ScoreAll`)
    and each press's compressed cache is forked from it, which equals prefilling under that
    press (prefill outputs do not depend on the press; ``tests/test_kvcache.py`` checks it).
    """
    full = torch.cat([ctx_mask, tail_mask], 1)
    root = ScoreAll(presses)
    with root(model):
        cache = root.make_cache()
        _forward(model, ctx_ids, ctx_mask, ctx_mask, cache)
    outs = []
    for press in tqdm(presses, disable=not _PROGRESS[0], desc="presses", leave=False):
        use = root if press is None else press
        c = cache if press is None else cache.fork(press)
        with use(model):
            outs.append(_forward(model, tail_ids, tail_mask, full, c))
            if press is None:
                cache.forwards, cache.seen = 1, ctx_ids.shape[1]   # the tail does not stick
                for lay in cache.kv:
                    n = lay.keys.shape[2] - tail_ids.shape[1]
                    lay.keys, lay.values = lay.keys[:, :, :n], lay.values[:, :, :n]
                    lay.pos, lay.valid, lay.scores = lay.pos[..., :n], lay.valid[..., :n], lay.scores[..., :n]
    return outs


@torch.no_grad()
def recall_correct(model, tok, items: list[RecallItem], presses: list, batch_size: int = 8,
                   progress: bool = False) -> list[list[bool]]:
    """Per press (None = full cache), per item: would greedy decoding reproduce the answer
    after the compressed context?"""
    out: list[list[bool]] = [[] for _ in presses]
    _PROGRESS[0] = progress
    pad = tok.pad_token_id
    for s in tqdm(range(0, len(items), batch_size), disable=not progress, desc="recall", leave=False):
        batch = items[s:s + batch_size]
        ctx = [tok(it.context, add_special_tokens=False)["input_ids"] for it in batch]
        qs = [tok(it.question, add_special_tokens=False)["input_ids"] for it in batch]
        ans = [tok(it.answer, add_special_tokens=False)["input_ids"] for it in batch]
        ci, cm = _left_pad(ctx, pad)
        ti, tm = _left_pad([q + a for q, a in zip(qs, ans)], pad)
        for k, logits in enumerate(_run_many(model, presses, ci, cm, ti, tm)):
            pred = logits.argmax(-1)
            for r, a in enumerate(ans):
                n = len(a)
                out[k].append(bool((pred[r, -n - 1:-1] == torch.tensor(a)).all()))
    return out


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, context: int, presses: list, batch_size: int = 8,
               progress: bool = False) -> list[float]:
    """Per press (None = full cache): exp(mean NLL) of the continuation tokens after a
    (compressed) ``context``."""
    nll, count = [0.0] * len(presses), 0
    _PROGRESS[0] = progress
    for s in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="ppl", leave=False):
        w = windows[s:s + batch_size]
        ci, ti = w[:, :context], w[:, context:]
        tgt = ti[:, 1:]
        for k, logits in enumerate(_run_many(model, presses, ci, torch.ones_like(ci), ti, torch.ones_like(ti))):
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            nll[k] -= lp.gather(-1, tgt[..., None]).sum().item()
        count += tgt.numel()
    return [math.exp(v / max(1, count)) for v in nll]
