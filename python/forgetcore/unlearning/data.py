"""What every unlearning method receives: the forget set, the retain set and optional held-out sets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset


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

    def full(self, seed: int = 0) -> Dataset:
        """The whole training set (retain and forget) in one seeded random order.

        Batch estimates depend on how the set is batched: retain-then-forget, unshuffled, ends
        in class-pure batches, which SSD's batch Fisher does not expect (the official code
        iterates a class-mixed training set).
        """
        n = len(self.retain) + len(self.forget)  # type: ignore[arg-type]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        r, f = self.retain, self.forget
        if isinstance(r, TensorDataset) and isinstance(f, TensorDataset) and len(r.tensors) == len(f.tensors):
            # One gathered copy: later passes slice it instead of collating example by example.
            return TensorDataset(*(torch.cat([a, b])[perm] for a, b in zip(r.tensors, f.tensors)))
        return Subset(ConcatDataset([r, f]), perm.tolist())
