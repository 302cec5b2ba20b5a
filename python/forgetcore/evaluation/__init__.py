"""Metrics and harnesses over the results of forgetcore's methods.

``evaluation.continual``: accuracy-matrix metrics, continual evaluation (stability gap) and
MLLM-CTBench's metrics; ``evaluation.unlearning``: forget/retain/test accuracy, membership-inference
attacks and the baseline comparison harness; ``evaluation.probes``: linear probes on frozen features;
``evaluation.memorization``: Feldman and Zhang's memorisation and influence estimator;
``evaluation.memory``: recognition, recall and retention of studied text in a causal LM (Orhan
2023); ``evaluation.knowledge``: factual-knowledge acquisition, effectivity, retainability and
the power-law decay fit (Chang et al. 2024).
"""

from __future__ import annotations

from . import continual, knowledge, memorization, memory, probes, unlearning

__all__ = ["continual", "knowledge", "memorization", "memory", "probes", "unlearning"]
