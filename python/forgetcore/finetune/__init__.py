"""Selective and regularised fine-tuning: which weights to train, and how, so that what a model
knew survives. Each method has the shape of :class:`FinetuneMethod` (``prepare``, ``penalty``,
``after_stage``), driven by :class:`FinetunePlugin` (forgetcore's continual ``Trainer``) or
:class:`FinetuneCallback` (a Hugging Face ``transformers.Trainer`` run)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use (PEP 562): the callbacks subclass transformers' TrainerCallback, so
# importing them eagerly would make every `import forgetcore.continual` (which needs only
# `finetune.losses`) pay for transformers and peft (measured 5.8 of 8.4 s).
_WHERE = {
    "FinetuneCallback": "base", "FinetuneMethod": "base", "FinetunePlugin": "base", "trainable_parameters": "base",
    "GeRe": "gere", "GeReCallback": "gere", "GeRePlugin": "gere", "HFT": "hft", "GatedMLP": "hft",
    "KappaTune": "kappatune", "RegLoRA": "reglora",
}
__all__ = ["HFT", "FinetuneCallback", "FinetuneMethod", "FinetunePlugin", "GatedMLP", "GeRe", "GeReCallback",
           "GeRePlugin", "KappaTune", "RegLoRA", "trainable_parameters"]

if TYPE_CHECKING:
    from .base import FinetuneCallback, FinetuneMethod, FinetunePlugin, trainable_parameters
    from .gere import GeRe, GeReCallback, GeRePlugin
    from .hft import HFT, GatedMLP
    from .kappatune import KappaTune
    from .reglora import RegLoRA


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
