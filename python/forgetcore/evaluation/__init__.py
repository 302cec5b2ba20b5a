"""Metrics over the results of forgetcore's methods (``evaluation.continual``: accuracy-matrix metrics)."""

from __future__ import annotations

from . import continual

__all__ = ["continual"]
