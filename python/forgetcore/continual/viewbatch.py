"""View-Batch: recall-interval replay and one-sample multi-view consistency, as a Trainer plugin."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import _checks
from ..replay import view_batch_indices
from .scenarios import Task
from .trainer import Batch, Context, Plugin

VIEWS = ("noise", "none")


class ViewBatch(Plugin):
    """The View-Batch model: "Do Your Best and Get Enough Rest for Continual Learning", CVPR 2025
    (arXiv 2503.18371; official code ``hankyul2/ViewBatchModel``).

    Two parts, each switchable:

    - ``repeat=R`` (the paper's relearning interval; ``--aug-repeat``): the epoch's batches come
      from :func:`forgetcore.replay.view_batch_indices` through the trainer's ``batch_indices``
      hook: one permutation per block of ``R`` epochs, every example ``R`` times in a row in
      the same mini-batch, then resting ``R - 1`` epochs, at the same number of items per epoch
      (equal compute). The trainer's ``batch_size`` must be a multiple of ``R``.
    - views: the first copy of an example is the data as it comes; copy ``l = 1..R-1`` gets
      additive uniform noise ``U[0, 1) * alpha * l / (R - 1)`` (``views="noise"``, the official
      ``--prog-aug 1``; the strong image augmentations of ``--prog-aug 2/5`` are not meaningful
      on 8x8 digits). The level of each copy is its position in its group of ``R``, known
      exactly from the sampler (the official code infers groups from consecutive equal labels,
      which runs two adjacent examples of a class together: the spec's off-by-one pitfall).
    - ``ssl=True``: the one-sample multi-view consistency loss, from epoch ``ssl_start`` of each
      task on (official: epoch > 5): with ``p`` the softmax over the seen classes, the first
      copy's ``p`` (detached) is the anchor of the later copies,
      ``L = CE + ssl_weight * sum_{l >= 1} KL(p_anchor || p_l) / R``, each KL with
      ``F.kl_div(..., reduction="mean")`` as the official code (it divides by the number of
      classes too: ``kl_reduction="batchmean"`` gives the per-example sum instead).

    Replayed examples a replay plugin appends (after ``batch["n_stream"]``) get the CE only, and
    ``batch["store"]`` marks each example's first copy so that :class:`ER` stores it once, not
    ``R`` (noisy) times.
    Departures: the official code applies View-Batch to the union of the task's data and the
    buffer (iCaRL); here it orders the task's data and replay (e.g. :class:`ER`) adds to each
    batch as usual; groups are never cut (see ``view_batch_indices``).

    Args:
        repeat: R (1: plain shuffling).
        views: ``"noise"`` or ``"none"`` (copies left identical).
        alpha: the noise scale (official 0.2).
        ssl: add the consistency loss.
        ssl_weight: its weight (official ``prog_alpha`` 1.0).
        ssl_start: first epoch (0-based, within each task) with the consistency loss.
        kl_reduction: ``"mean"`` (official) or ``"batchmean"``.
    """

    def __init__(self, repeat: int = 4, *, views: str = "noise", alpha: float = 0.2, ssl: bool = True,
                 ssl_weight: float = 1.0, ssl_start: int = 0, kl_reduction: str = "mean") -> None:
        self.repeat = _checks.positive_int("repeat", repeat)
        if views not in VIEWS:
            raise ValueError(f"views: expected one of {VIEWS}, got {views!r}")
        self.views = views
        self.alpha = _checks.real("alpha", alpha, low=0.0)
        if not isinstance(ssl, bool):
            raise TypeError(f"ssl: expected a bool, got {type(ssl).__name__}")
        self.ssl = ssl
        self.ssl_weight = _checks.real("ssl_weight", ssl_weight, low=0.0)
        self.ssl_start = _checks.positive_int("ssl_start", ssl_start, allow_zero=True)
        if kl_reduction not in ("mean", "batchmean"):
            raise ValueError(f"kl_reduction: expected 'mean' or 'batchmean', got {kl_reduction!r}")
        self.kl_reduction = kl_reduction

    def before_task(self, ctx: Context, task: Task) -> None:
        bs = ctx.trainer.batch_size
        if bs % self.repeat:
            raise ValueError(f"repeat: the trainer's batch_size ({bs}) must be a multiple of repeat "
                             f"({self.repeat}), so that an example's copies share a mini-batch")

    def batch_indices(self, ctx: Context, task: Task, epoch: int, n: int) -> torch.Tensor:
        if self.repeat > n:
            raise ValueError(f"repeat: expected at most the task's {n} examples, got {self.repeat}")
        return view_batch_indices(n, epoch, self.repeat, seed=[ctx.seed, task.id])

    def _levels(self, n: int) -> torch.Tensor:
        return torch.arange(n) % self.repeat  # batches hold whole groups of R copies

    def transform_batch(self, ctx: Context, batch: Batch) -> Batch:
        if self.repeat == 1:
            return batch
        n = batch["n_stream"]
        if self.views == "none" or self.alpha == 0:
            return {**batch, "store": self._levels(n) == 0}

        s = int(np.random.SeedSequence([ctx.seed, 7, ctx.step]).generate_state(1, dtype=np.uint64)[0])
        g = torch.Generator().manual_seed(s)
        x = batch["x"]
        beta = self.alpha * self._levels(n).to(x.dtype) / (self.repeat - 1)
        noise = torch.rand(x[:n].shape, generator=g, dtype=x.dtype) * beta.view(-1, *([1] * (x.dim() - 1)))
        out = dict(batch)
        out["x"] = torch.cat([x[:n] + noise.to(x.device), x[n:]])
        out["store"] = self._levels(n) == 0  # a replay memory stores each example once, unaltered
        return out

    def loss(self, ctx: Context, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(output, batch["y"])
        if not self.ssl or self.repeat == 1 or ctx.epoch < self.ssl_start or self.ssl_weight == 0:
            return ce
        n = batch["n_stream"]
        g = n // self.repeat
        if g == 0:
            return ce
        seen = sorted({c for t in ctx.scenario[: ctx.task_id + 1] for c in t.classes})
        z = output[: g * self.repeat][:, seen].reshape(g, self.repeat, len(seen))
        logp = F.log_softmax(z, dim=2)
        anchor = logp[:, 0].exp().detach()
        # F.kl_div(logp_v, anchor, reduction): "mean" divides the sum by every element (g * C),
        # "batchmean" by the g examples; written out so torch's deprecation warning stays quiet
        div = anchor.numel() if self.kl_reduction == "mean" else g
        ssl = sum((torch.xlogy(anchor, anchor) - anchor * logp[:, v]).sum() / div for v in range(1, self.repeat))
        return ce + self.ssl_weight * ssl / self.repeat
