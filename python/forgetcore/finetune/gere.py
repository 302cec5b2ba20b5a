"""GeRe: replay a fixed set of general samples with a threshold-based margin loss on their activations.

Zhang et al., "GeRe: Towards Efficient Anti-Forgetting in Continual Learning of LLM via General
Samples Replay" (arXiv 2508.04676, 2025); official code ``Qznan/GeRe`` (``gere/gere_trainer.py``:
``GeRePresaveCallback``, ``init_margin_loss_thres``, ``compute_gere_loss``, ``compute_loss``,
``InterpolateRandomSampler``), read at 4936fed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import _checks
from .base import FinetuneCallback, FinetuneMethod, FinetunePlugin, check_state
from .losses import threshold_margin_loss

__all__ = ["GeRe", "GeReCallback", "GeRePlugin"]


class GeRe(FinetuneMethod):
    """Reference activations and per-unit thresholds of a general set, frozen from the initial model.

    ``prepare(model)`` runs every general sample through the model ONE AT A TIME (batch size 1,
    so sequences need no padding, as the official pre-save does), records the output of the
    ``features`` submodule (for a Hugging Face Llama, ``"model.norm"``: the official code's
    ``hidden_states[-1]``, which is after the final norm), and from all rows (tokens) of all
    samples the per-unit mean and standard deviation (``sigma^2 = E[h^2] - mu^2``); thresholds
    ``pos = mu + sigma``, ``neg = mu - sigma``. Nothing of it is ever recomputed in training.

    During training, the general samples of a batch get their ordinary CE loss plus
    ``w * L_TM`` (:func:`~forgetcore.finetune.losses.threshold_margin_loss`, normalised over the
    violating elements only); ``w`` is ``100`` (the official default), ``1``, ``"dy"``
    (``CE.item() / (L_TM.item() + 1e-8)``, detached, as the official code computes it) or any
    number >= 0 (``0``: CE-only replay, the ablation). :meth:`loss` has the official CE
    averaging: ``(CE_general + CE_task) / 2`` when a batch holds both, else whichever is present.

    Args:
        general_x, general_y: the general replay set (inputs and their CE targets); the
            official set is 1000 SlimPajama documents, 563 tokens each.
        features: the name of the submodule whose output is the representation.
        w: the margin loss's weight (see above).
        k: general samples per batch for :class:`GeRePlugin` (0: the random mixing of the
            official default, where the general fraction of a batch varies).

    Loops: :class:`GeRePlugin` in forgetcore's ``Trainer``; :class:`GeReCallback` in a Hugging Face
    ``transformers.Trainer`` run (the generic :class:`~forgetcore.finetune.FinetuneCallback` cannot
    carry this loss: see there).

    Departure: in forgetcore's ``Trainer`` the general and task rows share one forward pass
    (the official code runs two); the same for models without batch-coupled layers (no
    batch-norm in training mode).
    """

    def __init__(self, general_x: torch.Tensor, general_y: torch.Tensor, *, features: str,
                 w: float | str = 100, k: int = 0, seed: int = 0) -> None:
        if not isinstance(general_x, torch.Tensor) or general_x.dim() < 2 or len(general_x) == 0:
            raise ValueError(f"general_x: expected a non-empty tensor (N, ...), got {_checks.describe(general_x)}")
        if not torch.is_floating_point(general_x) and general_x.dtype != torch.long:
            raise TypeError(f"general_x: expected float inputs or int64 token ids, got {general_x.dtype}")
        if torch.is_floating_point(general_x) and not bool(torch.isfinite(general_x).all()):
            raise ValueError("general_x: expected finite values, got NaN or inf")
        if (not isinstance(general_y, torch.Tensor) or general_y.dtype != torch.long
                or general_y.shape[0] != general_x.shape[0]):
            raise ValueError(f"general_y: expected int64 targets with {len(general_x)} rows, "
                             f"got {_checks.describe(general_y)}")
        if not isinstance(features, str) or not features:
            raise TypeError(f"features: expected a submodule name, got {features!r}")
        if w != "dy":
            if isinstance(w, str) or isinstance(w, bool) or not isinstance(w, (int, float)):
                raise ValueError(f"w: expected a number >= 0 or 'dy', got {w!r}")
            w = _checks.real("w", w, low=0.0)
        self.general_x, self.general_y = general_x, general_y
        self.features, self.w = features, w
        self.k = _checks.positive_int("k", k, allow_zero=True)
        self.seed = _checks.positive_int("seed", seed, allow_zero=True)
        self.ref: list[torch.Tensor] = []
        self.pos_thr: torch.Tensor | None = None
        self.neg_thr: torch.Tensor | None = None
        self._hook: Any = None
        self._last: torch.Tensor | None = None

    # -- references ---------------------------------------------------------------------------
    def _module(self, model: torch.nn.Module) -> torch.nn.Module:
        mods = dict(model.named_modules())
        if self.features not in mods:
            raise ValueError(f"features: model has no submodule named {self.features!r}")
        return mods[self.features]

    def _attach(self, model: torch.nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()

        def keep(module: torch.nn.Module, args: Any, out: Any) -> None:
            self._last = out[0] if isinstance(out, tuple) else out

        self._hook = self._module(model).register_forward_hook(keep)

    @torch.no_grad()
    def prepare(self, model: torch.nn.Module) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
        self._module(model)  # raises before anything changes
        dev = next(model.parameters()).device
        was = model.training
        model.eval()
        self._attach(model)
        refs = []
        try:
            for i in range(len(self.general_x)):
                model(self.general_x[i:i + 1].to(dev))
                refs.append(self._last[0].detach().float())  # (H,) or (len, H)
        finally:
            model.train(was)
        rows = torch.cat([r.reshape(-1, r.shape[-1]) for r in refs]).double()
        mu = rows.mean(0)
        var = (rows.square().mean(0) - mu.square()).clamp_min(0.0)
        self.ref = refs
        self.pos_thr, self.neg_thr = (mu + var.sqrt()).float(), (mu - var.sqrt()).float()

    def reapply(self, model: torch.nn.Module) -> None:
        self._attach(model)

    @property
    def last_features(self) -> torch.Tensor | None:
        """The ``features`` output of the model's latest forward pass (kept by a hook)."""
        return self._last

    def close(self) -> None:
        """Remove the forward hook from the model."""
        if self._hook is not None:
            self._hook.remove()
            self._hook, self._last = None, None

    def tm_loss(self, hidden: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """L_TM of the current ``hidden`` (one row per general sample ``index[i]``) against the references."""
        if self.pos_thr is None:
            raise ValueError("model: call prepare(model) before training (the references are not recorded)")
        ref = torch.stack([self.ref[int(i)] for i in index]).to(hidden.device)
        return threshold_margin_loss(hidden, ref, self.pos_thr.to(hidden.device), self.neg_thr.to(hidden.device), mask)

    def weight(self, ce: torch.Tensor, tm: torch.Tensor) -> float:
        if self.w == "dy":
            return float(ce.detach()) / (float(tm.detach()) + 1e-8)
        return float(self.w)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        """The official objective on a batch whose general rows have ``task = -(index + 1)``."""
        g = batch["task"] < 0
        parts = []
        if bool(g.any()):
            parts.append(F.cross_entropy(output[g], batch["y"][g]))
        if bool((~g).any()):
            parts.append(F.cross_entropy(output[~g], batch["y"][~g]))
        ce = parts[0] if len(parts) == 1 else (parts[0] + parts[1]) / 2  # the official averaging
        return ce + self.penalty(model, batch, output, ce=ce)

    def penalty(self, model: torch.nn.Module, batch: Any, outputs: Any, ce: torch.Tensor | None = None) -> torch.Tensor:
        if batch is None:
            raise ValueError("batch: GeRe's margin loss needs the batch (the general rows' activations); "
                             "use GeRePlugin, or tm_loss() in your own loss")
        g = batch["task"] < 0
        if not bool(g.any()) or self._last is None:
            return torch.zeros((), device=outputs.device)
        tm = self.tm_loss(self._last[g], -batch["task"][g] - 1)
        if ce is None:
            ce = F.cross_entropy(outputs[g], batch["y"][g])
        return self.weight(ce, tm) * tm

    # -- the sampler --------------------------------------------------------------------------
    def batch_indices(self, n_task: int, batch_size: int, seed: int, task: int, epoch: int) -> list[torch.Tensor]:
        """Batches over ``general ++ task`` data (the general set first, as the official
        concatenation): with ``k > 0`` every batch holds exactly ``k`` general samples at random
        positions (the general set reshuffled whenever it runs out) and ``batch_size - k`` task
        samples; with ``k = 0`` a random permutation of everything."""
        n_g = len(self.general_x)
        s = int(np.random.SeedSequence([seed, task, epoch, 0x6E4E]).generate_state(1, dtype=np.uint64)[0])
        gen = torch.Generator().manual_seed(s)
        if self.k == 0:
            return list(torch.randperm(n_g + n_task, generator=gen).split(batch_size))
        if self.k >= batch_size:
            raise ValueError(f"k: expected fewer general samples per batch than batch_size {batch_size}, got {self.k}")
        per = batch_size - self.k
        n_batches = math.ceil(n_task / per)
        task_order = torch.randperm(n_task, generator=gen) + n_g
        need = n_batches * self.k
        general = torch.cat([torch.randperm(n_g, generator=gen) for _ in range(math.ceil(need / n_g))])
        out = []
        for b in range(n_batches):
            idx = torch.cat([task_order[b * per:(b + 1) * per], general[b * self.k:(b + 1) * self.k]])
            out.append(idx[torch.randperm(len(idx), generator=gen)])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w if isinstance(self.w, str) else float(self.w), "k": self.k, "seed": self.seed,
                "ref": list(self.ref),
                "pos_thr": self.pos_thr if self.pos_thr is not None else torch.empty(0),
                "neg_thr": self.neg_thr if self.neg_thr is not None else torch.empty(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, {"w", "k", "seed", "ref", "pos_thr", "neg_thr"}, {"k": 0, "seed": 0})
        w = state["w"]
        if w != "dy" and (isinstance(w, (bool, str)) or not isinstance(w, (int, float)) or not w >= 0
                          or not math.isfinite(w)):
            raise ValueError(f"state: w must be a number >= 0 or 'dy', got {w!r}")
        ref, pos, neg = state["ref"], state["pos_thr"], state["neg_thr"]
        tensors = [pos, neg, *ref] if isinstance(ref, list) else None
        if tensors is None or not all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in tensors):
            raise TypeError("state: ref must be a list of float32 tensors, pos_thr and neg_thr float32 tensors")
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise ValueError("state: ref, pos_thr and neg_thr must be finite")
        if ref:
            h = pos.shape
            if len(ref) != len(self.general_x) or pos.dim() != 1 or neg.shape != h or any(
                    r.shape[-1:] != h for r in ref):
                raise ValueError(f"state: expected {len(self.general_x)} references and thresholds of their "
                                 f"width, got {len(ref)} references, thresholds {tuple(pos.shape)}, {tuple(neg.shape)}")
        elif pos.numel() or neg.numel():
            raise ValueError("state: thresholds without references")
        self.w, self.k, self.seed = (w if w == "dy" else float(w)), state["k"], state["seed"]
        self.ref = list(ref)
        self.pos_thr = pos if pos.numel() else None
        self.neg_thr = neg if neg.numel() else None


class GeRePlugin(FinetunePlugin):
    """GeRe in forgetcore's ``Trainer``: the general set in front of each task's data (general
    rows carry ``task = -(index + 1)``, so class- and domain-incremental scenarios only), the
    batches from :meth:`GeRe.batch_indices` through the trainer's ``batch_indices`` hook, and
    :meth:`GeRe.loss` as the loss."""

    def __init__(self, method: GeRe) -> None:
        if not isinstance(method, GeRe):
            raise TypeError(f"method: expected a GeRe, got {type(method).__name__}")
        super().__init__(method)
        self.method: GeRe = method

    def before_task(self, ctx: Any, task: Any) -> None:
        if ctx.scenario is not None and ctx.scenario.mode == "task":
            raise ValueError("scenario: GeRePlugin marks general rows with negative task ids; "
                             "task-incremental scenarios are not supported")
        super().before_task(ctx, task)

    def train_data(self, ctx: Any, task: Any) -> dict[str, torch.Tensor]:
        x, y = task.train.tensors
        gx = self.method.general_x.reshape(-1, *x.shape[1:]).to(x.dtype)
        n_g = len(gx)
        return {"x": torch.cat([gx, x]), "y": torch.cat([self.method.general_y, y]),
                "task": torch.cat([-torch.arange(1, n_g + 1), torch.full((len(y),), task.id, dtype=torch.long)])}

    def batch_indices(self, ctx: Any, task: Any, epoch: int, n: int) -> list[torch.Tensor]:
        return self.method.batch_indices(n - len(self.method.general_x), ctx.trainer.batch_size, ctx.seed,
                                         task.id, epoch)

    def loss(self, ctx: Any, batch: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        return self.method.loss(ctx.model, batch, output)


class GeReCallback(FinetuneCallback):
    """GeRe in a Hugging Face ``transformers.Trainer`` run: add it to ``callbacks=[...]``.

    Why the generic :class:`FinetuneCallback` cannot drive GeRe: its penalty is a function of the
    parameters alone, added at ``on_step_begin``, and a ``TrainerCallback`` never sees the batch
    nor the loss; GeRe's objective needs a forward pass of general samples and mixes their CE with
    the task's CE (``(CE_task + CE_general) / 2 + w * L_TM``, with ``w = "dy"`` reading that mixed
    CE), so it cannot be written as a separate gradient added before or after the task's.

    What this callback does instead: at ``on_train_begin`` it records GeRe's references (unless
    ``model=`` did so already) and puts a forward hook on the model. In training mode, when the
    model's output holds the task ``loss`` (the Trainer passes ``labels``), the hook runs the
    model on the next ``k`` general samples (``model(input_ids=general_x[i], labels=general_y[i])``,
    a forward of its own, as the official ``GeReTrainer.compute_loss`` does), reads ``L_TM`` on the
    ``features`` output, and replaces ``outputs.loss`` with the official objective; the Trainer then
    backpropagates it as usual, so gradient accumulation, clipping and mixed precision all apply.
    Under gradient accumulation the Trainer divides the model's summed loss by the number of target
    tokens of the whole accumulated batch (``num_items_in_batch``): the general part gets the same
    factor as the task part, so each micro-batch carries the official objective at the Trainer's
    scale.

    The general samples come in a fixed order: the general set reshuffled on every pass by a
    generator seeded with ``(seed, pass)``; ``drawn`` (in :meth:`state_dict`) counts the samples
    used, so a resumed run continues the same order. Departures from the official sampler: the
    official ``InterpolateRandomSampler`` puts general samples into the Trainer's own batches;
    here every micro-batch gets exactly ``k`` (GeRe's ``k``; ``k = 0`` means 1) extra ones. The
    model must return a ``ModelOutput`` (``return_dict``, the default) and compute its own loss
    from ``labels`` (no ``compute_loss_func``, no label smoothing, which replace ``outputs.loss``).
    """

    def __init__(self, method: GeRe, model: torch.nn.Module | None = None) -> None:
        if not isinstance(method, GeRe):
            raise TypeError(f"method: expected a GeRe, got {type(method).__name__}")
        super().__init__(method, model)
        self.method: GeRe = method
        self.drawn = 0
        self.losses: list[tuple[float, float]] = []  # (CE of the general samples, L_TM) per forward
        self._hook: Any = None
        self._inside = False
        if model is not None:
            self._attach(model)

    def _next(self) -> torch.Tensor:
        """The next ``k`` indices of the general set in the fixed reshuffled order."""
        n, k = len(self.method.general_x), max(self.method.k, 1)
        out = []
        for j in range(self.drawn, self.drawn + k):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.method.seed * 1_000_003 + j // n))
            out.append(perm[j % n])
        self.drawn += k
        return torch.stack(out)

    def _attach(self, model: torch.nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
        self.method.reapply(model)
        self._hook = model.register_forward_hook(self._replace_loss, with_kwargs=True)

    def _replace_loss(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        if self._inside or not module.training:
            return None
        if not isinstance(out, dict):
            raise ValueError("model: GeReCallback needs a ModelOutput with .loss (return_dict=True)")
        loss = out.get("loss")
        if loss is None:
            return None
        idx = self._next()
        dev = loss.device
        self._inside = True
        try:
            g = module(input_ids=self.method.general_x[idx].to(dev), labels=self.method.general_y[idx].to(dev))
        finally:
            self._inside = False
        tm = self.method.tm_loss(self.method.last_features, idx)
        scale = 1.0
        if kwargs.get("num_items_in_batch") is not None:  # the model summed over tokens / all items of the step
            mean = _causal_lm_ce(out["logits"].detach(), kwargs["labels"])
            scale = float(loss.detach()) / max(float(mean), 1e-30)
        ce = (loss / scale + g.loss) / 2  # the official averaging, at the per-token mean scale
        out["loss"] = scale * (ce + self.method.weight(ce, tm) * tm)
        self.losses.append((float(g.loss.detach()), float(tm.detach())))
        return out

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self._attach(model)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        pass  # the objective is set in the forward hook, not as a separate penalty

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.method.close()

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "method": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, {"drawn", "method"}, {"drawn": 0})
        self.method.load_state_dict(state["method"])  # checks its own state before it applies any
        self.drawn = state["drawn"]
        self.prepared = self.method.pos_thr is not None


def _causal_lm_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over the targets that are not -100 (what a causal LM's loss averages)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                           ignore_index=-100)
