"""Metrics and harnesses over the results of forgetcore's methods.

``evaluation.continual``: accuracy-matrix metrics, continual evaluation (stability gap) and
MLLM-CTBench's metrics; ``evaluation.unlearning``: forget/retain/test
accuracy, membership-inference attacks and the baseline comparison harness.
"""

from __future__ import annotations

from . import continual, probes, unlearning

__all__ = ["continual", "probes", "unlearning"]
