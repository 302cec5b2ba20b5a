"""What every unlearning method receives: the forget set, the retain set and optional held-out sets.

A neutral module: methods (``forgetcore.unlearning``) and the harness (``forgetcore.evaluation``)
both import it; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from .. import _checks

#: The recipe of the harness's original models (Adam, cross-entropy, shuffled mini-batches);
#: ``Retrain`` reuses it so that its model is the one training would have produced without the
#: forget set.
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 30, "lr": 1e-3, "batch_size": 64, "weight_decay": 0.0}

#: Orders of :meth:`UnlearnData.full`.
ORDERS = ("shuffled", "official")


def _size(name: str, ds: Dataset | None, *, required: bool) -> int:
    if ds is None:
        if required:
            raise ValueError(f"{name}: expected a Dataset, got None")
        return 0
    if not isinstance(ds, Dataset):
        raise TypeError(f"{name}: expected a torch Dataset, got {type(ds).__name__}")
    n = len(ds)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"{name}: expected a non-empty dataset, got 0 examples")
    return n


def labels_of(ds: Dataset) -> torch.Tensor:
    """The integer labels of a dataset of ``(x, y)`` pairs, in order (no copy for a TensorDataset)."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]


@dataclass(frozen=True)
class UnlearnData:
    """Datasets of ``(x, y)`` for one unlearning request.

    ``forget``: the examples to remove; ``retain``: the rest of the training set (both were
    trained on). ``forget_val`` / ``retain_val``: held-out examples that behave like them, for
    choosing hyper-parameters (``SSD(alpha="auto")``); ``test``: held-out examples of every
    class. ``forget_classes``: the classes removed in full-class forgetting (None for a random
    subset); evaluation then also splits test accuracy by forgotten and kept classes.
    Each method owns its batch size and loader order.
    """

    forget: Dataset
    retain: Dataset
    forget_val: Dataset | None = None
    retain_val: Dataset | None = None
    test: Dataset | None = None
    forget_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _size("forget", self.forget, required=True)
        _size("retain", self.retain, required=True)
        for name in ("forget_val", "retain_val", "test"):
            _size(name, getattr(self, name), required=False)
        if self.forget_classes is not None:
            object.__setattr__(self, "forget_classes", tuple(int(c) for c in self.forget_classes))

    @staticmethod
    def check(model: Any, data: Any) -> None:
        """The argument check every ``fit(model, data)`` starts with: a module and an ``UnlearnData``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(data, UnlearnData):
            raise TypeError(f"data: expected an UnlearnData, got {type(data).__name__}")

    def whole_forgotten_classes(self) -> list[int]:
        """Classes present in ``forget`` and absent from ``retain`` (a class-forgetting request in disguise)."""
        f = set(labels_of(self.forget).tolist())
        r = set(labels_of(self.retain).tolist())
        return sorted(int(c) for c in f - r)

    def full(self, seed: int = 0, order: str = "shuffled") -> Dataset:
        """The whole training set (retain and forget) in one pass order.

        - ``"shuffled"`` (ours): retain and forget mixed in one seeded random order, so every
          mini-batch is class-mixed.
        - ``"official"``: the order of the SSD official code's ``full_train_dl``
          (``ConcatDataset((retain, forget))``, unshuffled): for full-class forgetting the retain
          set is built class by class there, so here it is sorted by label (stable) and followed
          by the forget set; for random forgetting the retain set comes in its ``random_split``
          order, here a seeded permutation, then the forget set. Almost every batch of the
          full-class order is single-class, which changes any batch estimate (SSD's batch Fisher).
        """
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
        nr, nf = len(self.retain), len(self.forget)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(_checks.seed(seed))
        if order == "shuffled":
            perm = torch.randperm(nr + nf, generator=g)
        else:
            if self.forget_classes is not None:
                r_order = torch.sort(labels_of(self.retain), stable=True).indices
            else:
                r_order = torch.randperm(nr, generator=g)
            perm = torch.cat([r_order, nr + torch.arange(nf)])
        r, f = self.retain, self.forget
        if isinstance(r, TensorDataset) and isinstance(f, TensorDataset) and len(r.tensors) == len(f.tensors):
            # One gathered copy: later passes slice it instead of collating example by example.
            return TensorDataset(*(torch.cat([a, b])[perm] for a, b in zip(r.tensors, f.tensors)))
        return Subset(ConcatDataset([r, f]), perm.tolist())


__all__ = ["UnlearnData", "TRAIN_DEFAULTS", "ORDERS", "labels_of"]
