"""A memory store of dated sessions with forgetting hooks, and a lexical prefilter over it.

Part of the small MemSifter (see :mod:`forgetcore.memory`): the store keeps raw session texts
with timestamps (no heavy indexing); forgetting hooks in as deletion, a time-to-live, and a
power-law decay prior on retrieval, ``(age + c) ** -d`` (Anderson and Schooler 1991; the
weight of :class:`forgetcore.replay.PowerLawScheduler`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import _checks
from ..power_law import power_law_weight


def tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words."""
    return re.findall(r"[a-z0-9]+", text.lower())


class MemoryStore:
    """Dated sessions (``id``, ``text``, ``timestamp``) with forgetting hooks.

    - :meth:`remove` deletes a session (unlearning a memory); :meth:`expire` drops every session
      older than ``ttl`` at time ``now`` (a time-to-live);
    - :meth:`prior` gives each session's power-law decay weight ``(now - t + c) ** -d``, which
      :class:`Prefilter` multiplies into retrieval scores (forgetting as fading access, not
      deletion).
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.texts: list[str] = []
        self.times: list[float] = []
        self._next = 0

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, text: str, timestamp: float) -> int:
        """Store a session; returns its id."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text: expected a non-empty string, got {text!r}")
        ts = _checks.real("timestamp", timestamp)
        sid = self._next
        self._next += 1
        self.ids.append(sid)
        self.texts.append(text)
        self.times.append(ts)
        return sid

    def remove(self, session_id: int) -> None:
        if isinstance(session_id, bool) or not isinstance(session_id, (int, np.integer)):
            raise TypeError(f"session_id: expected an int, got {type(session_id).__name__}")
        if session_id not in self.ids:
            raise ValueError(f"session_id: no session {session_id} in the store")
        i = self.ids.index(session_id)
        for lst in (self.ids, self.texts, self.times):
            del lst[i]

    def expire(self, now: float, ttl: float) -> int:
        """Drop the sessions with ``now - timestamp > ttl``; returns how many went."""
        now = _checks.real("now", now)
        ttl = _checks.real("ttl", ttl, low=0.0)
        keep = [i for i, t in enumerate(self.times) if now - t <= ttl]
        gone = len(self.ids) - len(keep)
        self.ids = [self.ids[i] for i in keep]
        self.texts = [self.texts[i] for i in keep]
        self.times = [self.times[i] for i in keep]
        return gone

    def prior(self, now: float, *, c: float = 1.0, d: float = 0.5) -> np.ndarray:
        """Power-law retrieval prior of every session at time ``now`` (d = 0.5: Anderson and
        Schooler's estimate); sessions from the future count as age 0."""
        now = _checks.real("now", now)
        age = np.maximum(now - np.asarray(self.times, dtype=np.float64), 0.0)
        return power_law_weight(torch.from_numpy(age), c, d).numpy()

    def state_dict(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "texts": list(self.texts), "times": list(self.times), "next": self._next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, validated whole first (distinct increasing ids below
        ``next``, non-empty texts, finite times, all of one length); a failure changes nothing."""
        _checks.state_mapping("state", state, ("ids", "texts", "times", "next"))
        for k in ("ids", "texts", "times"):
            if not isinstance(state[k], (list, tuple)):
                raise TypeError(f"state[{k!r}]: expected a list, got {type(state[k]).__name__}")
        nxt = _checks.state_int("state['next']", state["next"])
        ids = [_checks.state_int(f"state['ids'][{i}]", v, high=nxt - 1) for i, v in enumerate(state["ids"])]
        if any(a >= b for a, b in itertools.pairwise(ids)):
            raise ValueError("state['ids']: expected increasing session ids")
        texts = list(state["texts"])
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"state['texts'][{i}]: expected a non-empty string, got {t!r}")
        times = [_checks.real(f"state['times'][{i}]", t) for i, t in enumerate(state["times"])]
        if not len(ids) == len(texts) == len(times):
            raise ValueError("state: ids, texts and times differ in length")
        self.ids, self.texts, self.times, self._next = ids, texts, times, nxt


class BM25:
    """Okapi BM25 (Robertson and Zaragoza 2009) over :func:`tokens`, with the Lucene idf
    ``ln(1 + (N - n + 0.5) / (n + 0.5))``; ``k1 = 1.5``, ``b = 0.75``."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.tfs = [Counter(tokens(d)) for d in docs]
        self.lens = np.array([sum(tf.values()) for tf in self.tfs], dtype=np.float64)
        self.avg = float(self.lens.mean()) if len(self.lens) else 0.0
        df: Counter[str] = Counter()
        for tf in self.tfs:
            df.update(tf.keys())
        n = len(self.tfs)
        self.idf = {w: math.log(1 + (n - k + 0.5) / (k + 0.5)) for w, k in df.items()}

    def scores(self, query: str) -> np.ndarray:
        q = tokens(query)
        out = np.zeros(len(self.tfs))
        for i, tf in enumerate(self.tfs):
            norm = self.k1 * (1 - self.b + self.b * self.lens[i] / max(self.avg, 1e-9))
            out[i] = sum(self.idf.get(w, 0.0) * tf[w] * (self.k1 + 1) / (tf[w] + norm) for w in q if w in tf)
        return out


class Prefilter:
    """Lexical first stage: BM25 (default) or TF-IDF cosine (scikit-learn) over the store's
    sessions, optionally multiplied by the store's power-law prior; :meth:`top` returns the
    ``m`` best session positions and their scores, best first (ties: earlier session first)."""

    def __init__(self, method: str = "bm25") -> None:
        if method not in ("bm25", "tfidf"):
            raise ValueError(f"method: expected 'bm25' or 'tfidf', got {method!r}")
        self.method = method

    def scores(self, store: MemoryStore, question: str, *, now: float | None = None, c: float = 1.0,
               d: float = 0.5) -> np.ndarray:
        if len(store) == 0:
            return np.zeros(0)
        if self.method == "bm25":
            s = BM25(store.texts).scores(question)
        else:
            from sklearn.feature_extraction.text import TfidfVectorizer

            vec = TfidfVectorizer(token_pattern=r"[a-z0-9]+")
            m = vec.fit_transform(store.texts + [question])
            s = (m[:-1] @ m[-1].T).toarray().ravel()
        if now is not None:
            s = s * store.prior(now, c=c, d=d)
        return s

    def top(self, store: MemoryStore, question: str, m: int, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        m = _checks.positive_int("m", m)
        s = self.scores(store, question, **kw)
        order = np.argsort(-s, kind="stable")[:m]
        return order, s[order]


__all__ = ["BM25", "MemoryStore", "Prefilter", "tokens"]
