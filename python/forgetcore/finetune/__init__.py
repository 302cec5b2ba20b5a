"""Selective and regularised fine-tuning: which weights to train, and how, so that what a model
knew survives. Each method has the shape of :class:`FinetuneMethod` (``prepare``, ``penalty``,
``after_stage``), driven by :class:`FinetunePlugin` (forgetcore's continual ``Trainer``) or
:class:`FinetuneCallback` (a Hugging Face ``transformers.Trainer`` run)."""

from __future__ import annotations

from .base import FinetuneCallback, FinetuneMethod, FinetunePlugin, trainable_parameters
from .gere import GeRe, GeReCallback, GeRePlugin
from .hft import HFT, GatedMLP
from .kappatune import KappaTune
from .reglora import RegLoRA

__all__ = ["HFT", "FinetuneCallback", "FinetuneMethod", "FinetunePlugin", "GatedMLP", "GeRe", "GeReCallback",
           "GeRePlugin", "KappaTune", "RegLoRA", "trainable_parameters"]
