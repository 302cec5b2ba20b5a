"""Long-term memory for LLM agents, with forgetting: a small MemSifter.

:mod:`.store`: dated sessions with deletion, TTL and a power-law retrieval prior, and a BM25 /
TF-IDF prefilter. :mod:`.memsifter`: the DCG and tiered marginal rewards, a proxy re-ranker
trained with REINFORCE against a deterministic working model, and synthetic distractor-heavy
memories to measure it on.
"""

from __future__ import annotations

from .memsifter import (
                        ExtractiveReader,
                        ProxyRanker,
                        Question,
                        dcg_reward,
                        evaluate,
                        ndcg,
                        prepare,
                        synthetic_memories,
                        tiered_reward,
                        train_ranker,
)
from .store import BM25, MemoryStore, Prefilter

__all__ = ["BM25", "ExtractiveReader", "MemoryStore", "Prefilter", "ProxyRanker", "Question", "dcg_reward", "evaluate",
           "ndcg", "prepare", "synthetic_memories", "tiered_reward", "train_ranker"]
