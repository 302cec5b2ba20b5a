"""Selective fine-tuning methods: which weights to train so that pretraining knowledge survives."""

from __future__ import annotations

from .kappatune import KappaTune

__all__ = ["KappaTune"]
