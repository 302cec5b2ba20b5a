"""Metrics and harnesses over the results of forgetcore's methods.

``evaluation.continual``: accuracy-matrix metrics; ``evaluation.unlearning``: forget/retain/test
accuracy, membership-inference attacks and the baseline comparison harness;
``evaluation.memory``: recognition, recall and retention of studied text in a causal LM (Orhan
2023); ``evaluation.knowledge``: factual-knowledge acquisition, effectivity, retainability and
the power-law decay fit (Chang et al. 2024).
"""

from __future__ import annotations

from . import continual, knowledge, memory, unlearning

__all__ = ["continual", "knowledge", "memory", "unlearning"]
