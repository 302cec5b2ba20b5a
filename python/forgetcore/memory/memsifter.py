"""MemSifter, small: a learnable proxy re-ranker trained from the working model's outcome.

Tan, Dou et al., "MemSifter: Offloading LLM Memory Retrieval via Outcome-Driven Proxy
Reasoning" (arXiv 2603.03379, 2026); official code ``plageon/MemSifter@92f0eae``
(``genrank_verl/task_reward_score.py``, ``genrank_reward_score.py``,
``working_agent_client.py``). The paper prefilters a memory of past sessions by embedding
similarity, lets an RL-trained proxy LLM rank the candidates, and rewards the proxy by how much
the ranked sessions help a working LLM answer. Here, at library scale (no LLM training): a
BM25 prefilter (:class:`forgetcore.memory.store.Prefilter`), a small MLP over per-candidate
features as the proxy, a Plackett-Luce policy over its scores, and REINFORCE with a group-mean
baseline (a GRPO-lite) against a deterministic working model.

Rewards (pure functions of a ranking):

- :func:`dcg_reward`: ``sum_{gold g} 1[g at rank p] / log2(p + 2) / |gold|`` (p from 0); a ranking
  with an index out of range is a format error and gets 0, never a negative reward; duplicate
  indices are dropped (first occurrence kept) before scoring.
- :func:`tiered_reward` ("net memory segment contribution"): tiers ``F = (1, 2, 3, 5, 8)``
  (Fibonacci numbers up to 10), ``s_k`` the working model's task score with the top-k sessions,
  ``s_0`` with none (same working model and prompt), ``C(k) = 1 / log2(k + 1)``,
  ``w_n = C(F_n) - C(F_{n+1})`` and ``w_N = C(F_N)``. As intended:
  ``R = sum_n w_n (s_{F_n} - s_0)`` (the weights telescope to ``C(1) = 1``). With
  ``legacy=True`` (the spec's ``legacy_memsifter``), as the official loop codes it, starting at
  index 1: ``R = -s_0 + sum_{n=2}^{N-1} w_n s_{F_n} + C(F_N) s_{F_N}``, which skips tier 1.
  The default is the intended form (ours: a deliberate fix).

Checked against ``plageon/MemSifter@62a5489``: ``genrank_reward_score.py`` (``calculate_dcg``,
``dedup_indexes``, format errors scored 0) and ``genrank_reward_score_paper.py``
(``compute_paper_reward_from_scores``, whose loop is the ``legacy`` form above;
``generate_fibonacci_tiers(10)`` = 1, 2, 3, 5, 8).

Departures: the proxy is an MLP over lexical features, not a reasoning LLM; the prefilter is BM25,
not bge-m3 embeddings; no curriculum and no checkpoint merging; the working model is a rule-based
reader (:class:`ExtractiveReader`), not an LLM.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _checks, lm
from .store import MemoryStore, Prefilter, tokens

TIERS = (1, 2, 3, 5, 8)


def _dedupe(ranking: Sequence[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for i in ranking:
        if int(i) not in seen:
            seen.add(int(i))
            out.append(int(i))
    return out


def dcg_reward(ranking: Sequence[int], gold: Sequence[int], n_candidates: int, length: int | None = None) -> float:
    """The DCG reward of the official ``dcg`` mode (see the module doc). ``length``: as the
    official parser demands (``min(10, n_sessions)``), a ranking whose deduplicated length differs
    is a format error (reward 0); None skips that check."""
    if not gold:
        raise ValueError("gold: expected at least one gold candidate, got none")
    if any(not 0 <= int(i) < n_candidates for i in ranking):
        return 0.0  # format error
    r = _dedupe(ranking)
    if length is not None and len(r) != length:
        return 0.0  # format error
    gs = set(int(g) for g in gold)
    return sum(1.0 / math.log2(p + 2) for p, i in enumerate(r) if i in gs) / len(gs)


def ndcg(ranking: Sequence[int], gold: Sequence[int], k: int = 10) -> float:
    """nDCG@k with binary relevance."""
    r = _dedupe(ranking)[:k]
    gs = set(int(g) for g in gold)
    dcg = sum(1.0 / math.log2(p + 2) for p, i in enumerate(r) if i in gs)
    ideal = sum(1.0 / math.log2(p + 2) for p in range(min(len(gs), k)))
    return dcg / ideal if ideal else 0.0


def tiered_reward(scores: dict[int, float], *, tiers: Sequence[int] = TIERS, legacy: bool = False) -> float:
    """The tiered marginal reward from the working model's scores ``{k: s_k}`` (``0`` and every
    tier must be present); ``legacy=True`` reproduces the coded variant (tier 1 skipped)."""
    ts = list(tiers)
    if not ts or ts != sorted(set(ts)) or ts[0] < 1:
        raise ValueError(f"tiers: expected increasing positive ints, got {tiers}")
    missing = [k for k in [0, *ts] if k not in scores]
    if missing:
        raise ValueError(f"scores: missing the working model's score for k = {missing}")

    def c(k: int) -> float:
        return 1.0 / math.log2(k + 1)

    w = [c(ts[n]) - c(ts[n + 1]) for n in range(len(ts) - 1)] + [c(ts[-1])]
    s0 = float(scores[0])
    if not legacy:
        return sum(wn * (float(scores[t]) - s0) for wn, t in zip(w, ts))
    return -s0 + sum(w[n] * float(scores[ts[n]]) for n in range(1, len(ts) - 1)) + c(ts[-1]) * float(scores[ts[-1]])


class ExtractiveReader:
    """A deterministic working model: reads the context sessions in the order given and answers
    with the attribute of the first one that states the asked relation of the asked entity in
    the canonical template of :data:`forgetcore.lm.RELATIONS`; no such session, no answer. Its
    task score is 1 for the gold attribute, else 0 (token F1 of one-word answers)."""

    def __init__(self) -> None:
        self._patterns = {rel: re.compile(re.escape(t[0]).replace(r"\{e\}", r"(?P<e>[a-z]+)")
                                          .replace(r"\{a\}", r"(?P<a>[a-z]+)"))
                          for rel, (_, t) in lm.RELATIONS.items()}
        self._facts: dict[tuple[str, str], list[tuple[str, str]]] = {}  # parsed once per (relation, text)

    def _parse(self, relation: str, text: str) -> list[tuple[str, str]]:
        key = (relation, text)
        if key not in self._facts:
            self._facts[key] = [(m.group("e"), m.group("a")) for m in self._patterns[relation].finditer(text)]
        return self._facts[key]

    def answer(self, entity: str, relation: str, context: Sequence[str]) -> str | None:
        for text in context:
            for e, a in self._parse(relation, text):
                if e == entity:
                    return a
        return None

    def score(self, question: Question, context: Sequence[str]) -> float:
        return float(self.answer(question.entity, question.relation, context) == question.answer)


@dataclass
class Question:
    """A question about ``entity``'s ``relation``; ``answer`` is the gold attribute, ``store``
    the user's memory and ``gold`` the ids of the sessions that hold the answer."""

    text: str
    entity: str
    relation: str
    answer: str
    store: MemoryStore
    gold: list[int]
    now: float
    meta: dict[str, Any] = field(default_factory=dict)


def synthetic_memories(n_questions: int, *, distractors: bool = True, n_filler: int = 20,
                       seed: int = 0) -> list[Question]:
    """"LongMemEval-lite": per question, one user's memory of dated sessions.

    The gold session states the entity's current attribute (the latest update). With
    ``distractors``: 2-4 older sessions state outdated attributes in the same words, and 2-4
    chatty sessions repeat the entity's name and the relation's keywords without stating a fact
    (they attract BM25). Fillers state facts about other entities. Without ``distractors`` only
    the gold session mentions the entity.
    """
    n_questions = _checks.positive_int("n_questions", n_questions)
    rng = random.Random(f"memories:{seed}")
    ents = list(lm.names())
    rels = sorted(lm.RELATIONS)
    out = []
    for _ in range(n_questions):
        e = rng.choice(ents)
        rel = rng.choice(rels)
        attrs, templates = lm.RELATIONS[rel]
        a = rng.choice(attrs)
        keyword = [w for w in templates[0].split() if w not in ("{e}", "{a}", ".", "a", "the", "of", "is", "in", "as")]
        store = MemoryStore()
        sessions: list[tuple[str, float, str]] = []
        now = 100.0
        t_gold = rng.uniform(60.0, 95.0)
        sessions.append((f"day {int(t_gold)} . " + templates[0].format(e=e, a=a), t_gold, "gold"))
        if distractors:
            for _ in range(rng.randint(2, 4)):
                old = rng.choice([x for x in attrs if x != a])
                t = rng.uniform(0.0, t_gold - 5.0)
                sessions.append((f"day {int(t)} . " + templates[0].format(e=e, a=old), t, "outdated"))
            for _ in range(rng.randint(2, 4)):
                kw = " ".join(rng.choice(keyword) for _ in range(3))
                t = rng.uniform(0.0, now)
                sessions.append((f"day {int(t)} . {e} and i talked about {kw} , {e} {kw} and more {kw} .", t,
                                 "chatter"))
        for _ in range(n_filler):
            other = rng.choice([x for x in ents if x != e])
            r2 = rng.choice(rels)
            at2, tp2 = lm.RELATIONS[r2]
            t = rng.uniform(0.0, now)
            sessions.append((f"day {int(t)} . " + tp2[0].format(e=other, a=rng.choice(at2)), t, "filler"))
        rng.shuffle(sessions)
        gold = []
        for text, t, kind in sessions:
            sid = store.add(text, t)
            if kind == "gold":
                gold.append(sid)
        q = lm.fact(rel, e, a, 0)[0].replace(e, e)  # the canonical wording up to the attribute
        out.append(Question(text=f"what is this : {q} ?", entity=e, relation=rel, answer=a, store=store,
                            gold=gold, now=now))
    return out


N_FEATURES = 5


def candidate_features(question: Question, candidates: Sequence[int], bm25: np.ndarray) -> np.ndarray:
    """Per-candidate features (M, 5): prefilter score over the best candidate's, rank in the prefilter
    (0 best .. 1 worst), the power-law recency prior ``(age + 1) ** -0.5``, the fraction of the
    session's words that are question words, and 1 / (1 + repeated question words)."""
    store = question.store
    qset = set(tokens(question.text))
    prior = store.prior(question.now, c=1.0, d=0.5)[list(candidates)]
    feats = np.zeros((len(candidates), N_FEATURES))
    top = max(float(bm25[candidates].max()), 1e-9) if len(candidates) else 1.0
    for j, i in enumerate(candidates):
        words = tokens(store.texts[i])
        hits = [w for w in words if w in qset]
        feats[j] = [bm25[i] / top, j / max(len(candidates) - 1, 1), prior[j] * 5.0,
                    len(hits) / max(len(words), 1), 1.0 / (1.0 + len(hits) - len(set(hits)))]
    return feats


class ProxyRanker(nn.Module):
    """A small MLP scoring each candidate from :func:`candidate_features`; the scores define a
    Plackett-Luce policy over rankings (sampled with the Gumbel-top-k trick)."""

    def __init__(self, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats).squeeze(-1)


def plackett_luce_logp(scores: torch.Tensor, rankings: torch.Tensor) -> torch.Tensor:
    """Log-probability of each (partial) ranking ``rankings`` (G, K) under Plackett-Luce with
    ``scores`` (M,): ``sum_p [s_{r_p} - logsumexp(s of the candidates not yet placed)]``."""
    g, k = rankings.shape
    onehot = torch.nn.functional.one_hot(rankings, scores.shape[0])  # (G, K, M)
    placed = (onehot.cumsum(1) - onehot) > 0  # candidates placed before position p
    rest = scores.expand(g, k, -1).masked_fill(placed, float("-inf"))
    return (scores[rankings] - torch.logsumexp(rest, 2)).sum(1)


@dataclass
class Prepared:
    question: Question
    candidates: list[int]
    feats: torch.Tensor
    gold_pos: list[int]


def prepare(questions: Sequence[Question], m: int = 20, method: str = "bm25") -> list[Prepared]:
    """Prefilter each question's memory (:class:`~forgetcore.memory.store.Prefilter`, BM25 or
    TF-IDF, no decay prior: recency is a feature the ranker weighs) to ``m`` candidates and
    compute their features."""
    pre = Prefilter(method)
    out = []
    for q in questions:
        bm = pre.scores(q.store, q.text)
        cand = list(np.argsort(-bm, kind="stable")[:m])
        feats = torch.tensor(candidate_features(q, cand, bm), dtype=torch.float32)
        gold_pos = [j for j, i in enumerate(cand) if q.store.ids[i] in q.gold]
        out.append(Prepared(q, [int(c) for c in cand], feats, gold_pos))
    return out


def outcome_scores(p: Prepared, ranking: Sequence[int], reader: ExtractiveReader,
                   tiers: Sequence[int] = TIERS) -> dict[int, float]:
    """``{k: s_k}`` for k = 0 and each tier: the reader's score with the top-k ranked sessions."""
    texts = [p.question.store.texts[p.candidates[j]] for j in _dedupe(ranking)]
    return {k: reader.score(p.question, texts[:k]) for k in [0, *tiers]}


def reward(p: Prepared, ranking: Sequence[int], reader: ExtractiveReader, mode: str = "task",
           legacy: bool = False) -> float:
    if mode == "dcg":
        return dcg_reward(ranking, p.gold_pos, len(p.candidates))
    return tiered_reward(outcome_scores(p, ranking, reader), legacy=legacy)


def train_ranker(ranker: ProxyRanker, data: Sequence[Prepared], *, steps: int = 150, group: int = 8,
                 batch: int = 16, lr: float = 0.03, mode: str = "task", legacy: bool = False, top: int = 10,
                 seed: int = 0, progress: bool = False) -> list[float]:
    """REINFORCE with a group-mean baseline: per question, ``group`` rankings sampled from the
    Plackett-Luce policy (Gumbel-top-``top``), reward each, advantage = reward minus the group's
    mean, loss = -mean(advantage * log-prob). Returns the mean reward per step."""
    if mode not in ("task", "dcg"):
        raise ValueError(f"mode: expected 'task' or 'dcg', got {mode!r}")
    if not data:
        raise ValueError("data: expected prepared questions, got none")
    reader = ExtractiveReader()
    g = torch.Generator().manual_seed(_checks.seed(seed))
    opt = torch.optim.Adam(ranker.parameters(), lr=lr)
    history = []
    for _ in tqdm(range(steps), desc="proxy ranker", disable=not progress, leave=False):
        idx = torch.randint(len(data), (batch,), generator=g).tolist()
        losses, rs = [], []
        for i in idx:
            p = data[i]
            s = ranker(p.feats)
            k = min(top, len(p.candidates))
            gumbel = -torch.log(-torch.log(torch.rand(group, len(s), generator=g).clamp(1e-12, 1 - 1e-12)))
            rankings = torch.topk(s.detach() + gumbel, k, dim=1).indices
            r = torch.tensor([reward(p, rk.tolist(), reader, mode, legacy) for rk in rankings])
            adv = r - r.mean()
            losses.append(-(adv * plackett_luce_logp(s, rankings)).mean())
            rs.append(float(r.mean()))
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(sum(rs) / len(rs))
    return history


@torch.no_grad()
def evaluate(data: Sequence[Prepared], ranker: ProxyRanker | None = None, *, k: int = 3) -> dict[str, float]:
    """Mean tiered reward, nDCG@10 and the reader's accuracy with the top-k sessions, for the
    ranker's greedy ranking (None: the prefilter's BM25 order)."""
    reader = ExtractiveReader()
    rew, nd, acc = [], [], []
    for p in data:
        order = list(range(len(p.candidates))) if ranker is None else torch.argsort(
            ranker(p.feats), descending=True, stable=True).tolist()
        rew.append(reward(p, order, reader))
        nd.append(ndcg(order, p.gold_pos))
        acc.append(outcome_scores(p, order, reader, tiers=(k,))[k])
    return {"reward": float(np.mean(rew)), "ndcg10": float(np.mean(nd)), f"acc@{k}": float(np.mean(acc))}


Rewarder = Callable[[Prepared, Sequence[int]], float]

__all__ = ["TIERS", "ExtractiveReader", "ProxyRanker", "Question", "candidate_features", "dcg_reward", "evaluate",
           "ndcg", "outcome_scores", "plackett_luce_logp", "prepare", "reward", "synthetic_memories", "tiered_reward",
           "train_ranker"]
