"""Reference points for every unlearning method, with the same ``fit(model, data) -> dict`` signature.

- :class:`Retrain`: train from scratch on the retain set, the gold standard that unlearning
  approximates (exact by construction, and the slowest).
- :class:`RetainFinetune`: keep training the original model on the retain set only
  ("finetune" in Golatkar et al., CVPR 2020, and in the SSD paper's tables), relying on
  catastrophic forgetting of what is no longer shown.
- :class:`GradientAscent`: maximise the loss on the forget set ("NegGrad", Golatkar et al.
  2020; "GradAscent" in open-unlearning).

Defaults are sized for the embedded digits/MNIST scenarios of ``evaluation.unlearning``; the
original models there are trained with :data:`TRAIN_DEFAULTS`, which ``Retrain`` reuses so that
its model is the one training would have produced without the forget set.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from .. import _checks
from ..training import fit_epochs, reinit_
from .data import TRAIN_DEFAULTS, UnlearnData


class Retrain:
    """Re-initialise the model (seeded) and train it on ``data.retain`` only.

    Every submodule with ``reset_parameters`` is reset, then the model is trained with the same
    recipe as the original (``TRAIN_DEFAULTS`` unless given).
    """

    name = "Retrain"

    def __init__(self, epochs: int = TRAIN_DEFAULTS["epochs"], lr: float = TRAIN_DEFAULTS["lr"],
                 batch_size: int = TRAIN_DEFAULTS["batch_size"],
                 weight_decay: float = TRAIN_DEFAULTS["weight_decay"], seed: int = 0,
                 progress: bool = False) -> None:
        self.epochs = _checks.positive_int("epochs", epochs)
        self.lr = _checks.real("lr", lr, low=0.0, low_open=True)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.weight_decay = _checks.real("weight_decay", weight_decay, low=0.0)
        self.seed = _checks.seed(seed)
        self.progress = progress

    def fit(self, model: nn.Module, data: UnlearnData) -> dict[str, Any]:
        UnlearnData.check(model, data)
        t0 = time.perf_counter()
        reinit_(model, self.seed)
        steps = fit_epochs(model, data.retain, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           weight_decay=self.weight_decay, seed=self.seed, progress=self.progress,
                           desc="retrain")
        return {"method": self.name, "steps": steps, "seconds": time.perf_counter() - t0}


class RetainFinetune:
    """Continue training the original model on ``data.retain`` for a few epochs."""

    name = "RetainFinetune"

    def __init__(self, epochs: int = 5, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                 progress: bool = False) -> None:
        self.epochs = _checks.positive_int("epochs", epochs)
        self.lr = _checks.real("lr", lr, low=0.0, low_open=True)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.seed = _checks.seed(seed)
        self.progress = progress

    def fit(self, model: nn.Module, data: UnlearnData) -> dict[str, Any]:
        UnlearnData.check(model, data)
        t0 = time.perf_counter()
        steps = fit_epochs(model, data.retain, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           seed=self.seed, progress=self.progress, desc="finetune")
        return {"method": self.name, "steps": steps, "seconds": time.perf_counter() - t0}


class GradientAscent:
    """Ascend the cross-entropy on ``data.forget`` (SGD with momentum) for a few epochs.

    Unbounded ascent eventually wrecks the whole model; the defaults stop early enough that the
    digits scenarios keep most of their retain accuracy, which is how the baseline is usually run.
    """

    name = "GradientAscent"

    def __init__(self, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                 progress: bool = False) -> None:
        self.epochs = _checks.positive_int("epochs", epochs)
        self.lr = _checks.real("lr", lr, low=0.0, low_open=True)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.seed = _checks.seed(seed)
        self.progress = progress

    def fit(self, model: nn.Module, data: UnlearnData) -> dict[str, Any]:
        UnlearnData.check(model, data)
        t0 = time.perf_counter()
        steps = fit_epochs(model, data.forget, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           seed=self.seed, ascent=True, optimizer="sgd", progress=self.progress,
                           desc="gradient ascent")
        return {"method": self.name, "steps": steps, "seconds": time.perf_counter() - t0}
