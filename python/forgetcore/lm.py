"""A tiny Hugging Face causal LM, built and pretrained here in seconds, for tests and quick demos.

The language-model evaluations (:mod:`forgetcore.evaluation.memory`,
:mod:`forgetcore.evaluation.knowledge`) take any Hugging Face causal LM and its tokenizer. CI
cannot afford SmolLM2 for every claim test, so this module builds the same kind of object at
toy scale: a ``LlamaForCausalLM`` from a config (2 layers, d = 64) and a word-level
``PreTrainedTokenizerFast``, pretrained on a seeded templated corpus. The code path is the one
SmolLM2 takes (``tokenizer(texts, padding=True)``, ``model(input_ids, attention_mask).logits``).

Vocabulary: the words of the templates below, a fixed list of invented names, a small synonym
table (for the synonym-swap recognition condition) and the 1,000 most
frequent words of the Python reference manual (``pydoc_data.topics``, in every Python install),
so that real prose and random strings over its vocabulary tokenise without unknown words.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import torch

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")

_SYL = ("ka", "lo", "mir", "ven", "dra", "su", "tel", "qua", "rin", "zo", "bel", "tha", "nor", "pi", "gu", "sha")
PLACES = ("zorbia", "quenlor", "vathmere", "ostrin", "pellucid", "karvash", "eldmoor", "tiskara", "brennholt",
          "marsoli", "ulvenreach", "dravik", "sollantis", "yrrow", "feymarch", "castellune", "orvale", "tamsk",
          "hollin", "grevane", "luthra", "mendrel", "paskor", "quiven")
JOBS = ("baker", "painter", "sailor", "farmer", "doctor", "teacher", "miner", "weaver", "singer", "judge",
        "potter", "hunter", "clerk", "poet", "smith", "guard")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "brown", "pink", "gold")
ANIMALS = ("cat", "dog", "horse", "owl", "fox", "goat", "crow", "bear", "wolf", "hare", "swan", "frog")
NOUNS = ("river", "garden", "market", "bridge", "tower", "forest", "harbour", "window", "table", "letter",
         "lamp", "road", "hill", "boat", "song", "stone", "door", "field", "cloud", "bell")
ADJS = ("old", "quiet", "bright", "small", "cold", "narrow", "heavy", "gentle", "dark", "busy", "empty", "warm",
        "strange", "tall", "soft", "distant")
VERBS = ("sees", "finds", "paints", "follows", "watches", "builds", "carries", "hears", "visits", "leaves",
         "remembers", "opens")
FUNCTION = ("the", "a", "of", "in", "was", "born", "works", "as", "favourite", "color", "is", "lives", "near",
            "and", "by", "every", "morning", "evening", "owns", "pet", "named", "person", "city", "grew", "up",
            "her", "his", "their", "job", "home", "town", "called", "who", "on", "has", "calls", "with", ".", ",")

# A small synonym table written here (Orhan's condition 3 swaps one word for a synonym from a
# list that is not offline): every key occurs in the scene sentences of templated_corpus.
SYNONYMS = {"old": "ancient", "quiet": "silent", "bright": "shiny", "small": "little", "cold": "chilly",
            "narrow": "thin", "heavy": "weighty", "gentle": "mild", "dark": "dim", "busy": "crowded",
            "empty": "vacant", "warm": "hot", "strange": "odd", "tall": "high", "soft": "smooth", "distant": "far",
            "river": "stream", "garden": "yard", "road": "street", "hill": "mound", "boat": "ship", "stone": "rock",
            "sees": "spots", "finds": "discovers", "watches": "observes", "builds": "makes", "carries": "holds",
            "hears": "notices", "visits": "tours", "leaves": "exits"}

# The first N_PRETRAIN_PROSE sentences of prose() are pretraining text of the tiny LM; later ones
# are new to it (held-out, study and continued-training text).
N_PRETRAIN_PROSE = 1200

# Relations of the templated facts: (attribute list, templates). The first template is the
# canonical sentence; the others paraphrase it. "{e}" is the entity, "{a}" the attribute, which
# always ends the sentence, so that the attribute is the target span of a probe.
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "birthplace": (PLACES, ("{e} was born in {a} .", "the person called {e} was born in {a} .",
                            "{e} grew up in the city of {a} .")),
    "job": (JOBS, ("{e} works as a {a} .", "the job of {e} is {a} .", "{e} is a {a} by job .")),
    "color": (COLORS, ("the favourite color of {e} is {a} .", "{e} has a favourite color , {a} .",
                       "the color {e} calls favourite is {a} .")),
    "pet": (ANIMALS, ("{e} owns a pet {a} .", "the pet of {e} is a {a} .", "{e} lives with a pet {a} .")),
}


@cache
def names(n: int = 400) -> tuple[str, ...]:
    """``n`` invented person names (two or three syllables), the same on every machine."""
    rng = random.Random(1234)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(_SYL) for _ in range(rng.choice((2, 3))))
        if w not in seen and w not in PLACES:
            seen.add(w)
            out.append(w)
    return tuple(out)


@cache
def prose_words(n: int = 1000) -> tuple[str, ...]:
    """The ``n`` most frequent lower-case words of the Python reference manual (``pydoc_data``)."""
    from pydoc_data.topics import topics

    counts = Counter(re.findall(r"[a-z]+", " ".join(topics[k] for k in sorted(topics)).lower()))
    return tuple(w for w, _ in counts.most_common(n))


def prose(n_sentences: int, *, offset: int = 0, min_words: int = 6, max_words: int = 24) -> list[str]:
    """Real English sentences from the Python reference manual, lower-cased, in a fixed order.

    ``offset`` skips that many usable sentences, so that disjoint slices serve as held-out and
    continued-training text.
    """
    from pydoc_data.topics import topics

    out: list[str] = []
    skipped = 0
    for key in sorted(topics):
        for sent in re.split(r"(?<=[.!?])\s+", topics[key]):
            words = re.findall(r"[a-z]+|[.,]", sent.lower())
            if not (min_words <= len(words) <= max_words) or words[-1] != ".":
                continue
            if skipped < offset:
                skipped += 1
                continue
            out.append(" ".join(words))
            if len(out) == n_sentences:
                return out
    return out


@cache
def vocabulary() -> tuple[str, ...]:
    words: list[str] = list(SPECIALS)
    for group in (FUNCTION, PLACES, JOBS, COLORS, ANIMALS, NOUNS, ADJS, VERBS, tuple(SYNONYMS.values()), names(),
                  prose_words()):
        for w in group:
            if w not in words:
                words.append(w)
    return tuple(words)


def tiny_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` (whitespace and punctuation
    split; unknown words map to ``<unk>``; pads with ``<pad>`` on the right)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    tok.padding_side = "right"
    return tok


def fact(relation: str, entity: str, attribute: str, template: int = 0) -> tuple[str, str]:
    """(context, target) of a templated fact: the sentence up to the attribute, and the attribute
    with the closing period (``template`` 0 is the canonical wording, 1.. paraphrases)."""
    if relation not in RELATIONS:
        raise ValueError(f"relation: expected one of {sorted(RELATIONS)}, got {relation!r}")
    text = RELATIONS[relation][1][template].format(e=entity, a=attribute)
    head, tail = text.split(f" {attribute} ")
    return head, f"{attribute} {tail}"


def templated_corpus(n: int, *, seed: int, entities: tuple[str, ...] | None = None) -> list[str]:
    """``n`` seeded sentences: random facts (any template) about ``entities`` (default the first
    300 invented names) mixed with simple scene sentences ("the old river sees a quiet lamp .")."""
    rng = random.Random(seed)
    ents = entities if entities is not None else names()[:300]
    out = []
    rels = sorted(RELATIONS)
    for _ in range(n):
        if rng.random() < 0.6:
            rel = rng.choice(rels)
            attrs, templates = RELATIONS[rel]
            out.append(rng.choice(templates).format(e=rng.choice(ents), a=rng.choice(attrs)))
        else:
            end = rng.choice((".", "every morning .", f"near the {rng.choice(NOUNS)} ."))
            out.append(f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                       f"a {rng.choice(ADJS)} {rng.choice(NOUNS)} {end}")
    return out


def build_tiny_lm(seed: int = 0, *, d_model: int = 64, n_layers: int = 2, max_len: int = 64) -> tuple[Any, Any]:
    """(model, tokenizer): an untrained ``LlamaForCausalLM`` (2 layers, d = 64, 4 heads) over
    :func:`vocabulary`, initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=4 * d_model,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=max_len, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval(), tok


def train_lm(model: Any, tok: Any, texts: list[str], *, steps: int, lr: float, batch_size: int, seed: int,
             progress: bool = False, desc: str = "train") -> list[float]:
    """Plain causal-LM training on ``texts`` (AdamW, weight decay 0, pad tokens masked out of the
    loss), batches drawn with replacement from a seeded generator; returns the loss per step."""
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("texts: expected at least one text, got none")
    enc = tok(list(texts), return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        b = torch.randint(len(ids), (batch_size,), generator=g)
        out = model(input_ids=ids[b].to(dev), attention_mask=mask[b].to(dev), labels=labels[b].to(dev))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def check_causal_lm(model: Any, tokenizer: Any) -> None:
    """Raise a clear error unless ``model`` is a causal LM with an LM head and ``tokenizer`` can pad."""
    head = getattr(model, "get_output_embeddings", None)
    if not callable(head) or head() is None:
        raise TypeError(f"model: expected a causal LM with a language-modelling head (e.g. loaded with "
                        f"transformers.AutoModelForCausalLM), got {type(model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise TypeError(f"tokenizer: expected a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("tokenizer: has no pad token; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token")


def encode(tokenizer: Any, texts: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``texts``, right-padded, on ``device``.

    Right padding whatever the tokenizer's ``padding_side``: the per-token losses assume that
    each text starts at position 0 (a left-padded row would be scored at shifted positions).
    """
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="right")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def token_losses(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy, shape (N, L-1), 0 where the predicted token is padding.

    Computed from the logits row by row, never from the model's batch-mean ``loss``: each item's
    loss is its own at any batch size (the pitfall of Orhan's evaluation script, which repeats
    the batch mean for every item of a batch).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    target = input_ids[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return ce * attention_mask[:, 1:].to(ce.dtype)


_RECIPE = "templated4000+prose1200,adamw3e-3,bs32,v1"


@cache
def _pretrained_state(seed: int, steps: int) -> dict[str, torch.Tensor]:
    model, tok = build_tiny_lm(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        texts = templated_corpus(4000, seed=seed) + prose(N_PRETRAIN_PROSE)
        train_lm(model, tok, texts, steps=steps, lr=3e-3, batch_size=32, seed=seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _cache_file(seed: int, steps: int) -> Path:
    # Keyed by everything that shapes the weights, so a changed vocabulary never loads stale ones.
    # (this file's source covers the corpus, the model and the recipe).
    src = Path(__file__).read_bytes()
    key = hashlib.sha256(repr((src, seed, steps, _RECIPE, torch.__version__)).encode()).hexdigest()[:16]
    root = Path(os.environ.get("FORGETCORE_CACHE", Path.home() / ".cache" / "forgetcore"))
    return root / "tiny-lm" / f"seed{seed}-steps{steps}-{key}.pt"


def pretrained_tiny_lm(seed: int = 0, steps: int = 300, *, cache_dir_ok: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer): the tiny LM after ``steps`` AdamW steps (lr 3e-3, batch 32) on the
    templated corpus and on real prose, seeded. Every call returns a fresh model with the same
    pretrained weights: they are kept per process and, with ``cache_dir_ok``, saved under
    ``$FORGETCORE_CACHE`` (default ``~/.cache/forgetcore``) so that later processes skip the
    pretraining (about 10 s on an idle core)."""
    model, tok = build_tiny_lm(seed)
    path = _cache_file(int(seed), int(steps))
    state = None
    if cache_dir_ok and path.is_file():
        try:
            state = torch.load(path, weights_only=True)
        except (OSError, RuntimeError):
            state = None
    if state is None:
        state = _pretrained_state(int(seed), int(steps))
        if cache_dir_ok:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                torch.save(state, tmp)
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only home only costs the pretraining again
    model.load_state_dict(state)
    return model.eval(), tok


__all__ = ["N_PRETRAIN_PROSE", "RELATIONS", "SYNONYMS", "build_tiny_lm", "check_causal_lm", "encode",
           "token_losses", "fact", "names", "pretrained_tiny_lm", "prose", "prose_words",
           "templated_corpus", "tiny_tokenizer", "train_lm", "vocabulary"]
