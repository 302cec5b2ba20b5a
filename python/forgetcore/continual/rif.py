"""Reinforcement fine-tuning (GRPO) as a continual method, and RIF-RFT's rollout-based filter.

Lai et al., "Reinforcement Fine-Tuning Naturally Mitigates Forgetting in Continual
Post-Training" (arXiv 2507.05386, 2025; PMLR v306). The paper continues post-training a
multimodal LLM task after task with GRPO (run on ``hiyouga/EasyR1``) instead of SFT, finds that
it forgets much less, and proposes RIF-RFT: before a task's RFT, drop the instances on which the
current policy gets none of K sampled rollouts right ("rollout-based instance filtering"), since
GRPO gives such all-wrong groups zero advantage and they only cost rollouts.

Here the policy is any classifier a :class:`~forgetcore.continual.Trainer` trains: a rollout is
a label sampled from ``softmax(logits)`` and the reward is 1 when it is the true label (the
spec's "smallest honest experiment"; a tiny bandit, not an LLM). Per step, for each example:
G rollouts, rewards, advantages by :func:`forgetcore.finetune.losses.grpo_advantages`, and the
loss of :func:`forgetcore.finetune.losses.grpo_loss` (clipped ratio with asymmetric and dual
clip, k3 KL to the reference, token mean: one token per response here).

Defaults follow EasyR1 (``examples/config.yaml``): n = 5 rollouts, temperature 1, KL on with
``kl_coef = 1e-2`` and ``low_var_kl``, clip 0.2 / 0.3, dual clip 3. The reference is the model
at the start of each task (``reference="task"``): in continual post-training EasyR1's reference,
"the run's initial model", is the previous task's model. ``reference="first"`` keeps the model
before the first RFT task instead. Departure: each step samples its own rollouts and makes one
update with them, so the ratio is exactly 1 in value and only its gradient acts; EasyR1 splits a
rollout batch (512) into several updates (global batch 128), so its later updates are slightly
off-policy and the clipping can bite. Not
verified against the paper: its own n, K (8 in a third-party reimplementation, used here) and
KL coefficient. RIF drops only all-wrong instances (not DAPO's all-correct groups), once, before
the task, with the same sampler and reward as training.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import _checks
from ..finetune.losses import grpo_advantages, grpo_loss
from .scenarios import Task
from .trainer import Batch, Context, Plugin


def _generator(*key: int) -> torch.Generator:
    s = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(s)


class GRPO(Plugin):
    """Reinforcement fine-tuning of a classifier with the GRPO loss (see the module doc).

    Args:
        n_rollouts: G, labels sampled per example and step (EasyR1 default 5).
        temperature: sampling temperature (1.0).
        kl_coef: weight of the k3 KL to the reference (1e-2; 0 turns the reference off).
        clip_low, clip_high, dual_clip: the ratio clipping (0.2, 0.3, 3.0).
        reference: ``"task"`` (the model at the start of each task) or ``"first"``.
        sft_tasks: ids of tasks trained with plain cross-entropy instead (e.g. the pretraining
            task of a continual post-training run).
        seed: seeds the rollouts (with the task id and step, so a resumed run draws the same).
    """

    def __init__(self, n_rollouts: int = 5, *, temperature: float = 1.0, kl_coef: float = 1e-2,
                 clip_low: float = 0.2, clip_high: float = 0.3, dual_clip: float | None = 3.0,
                 reference: str = "task", sft_tasks: tuple[int, ...] = (), seed: int = 0) -> None:
        self.n_rollouts = _checks.positive_int("n_rollouts", n_rollouts)
        if self.n_rollouts < 2:
            raise ValueError(f"n_rollouts: expected an int >= 2 (advantages need a group), got {n_rollouts}")
        self.temperature = _checks.real("temperature", temperature, low=0.0, low_open=True)
        self.kl_coef = _checks.real("kl_coef", kl_coef, low=0.0)
        self.clip_low = _checks.real("clip_low", clip_low, low=0.0, high=1.0, high_open=True)
        self.clip_high = _checks.real("clip_high", clip_high, low=0.0)
        self.dual_clip = None if dual_clip is None else _checks.real("dual_clip", dual_clip, low=1.0, low_open=True)
        if reference not in ("task", "first"):
            raise ValueError(f"reference: expected 'task' or 'first', got {reference!r}")
        self.reference = reference
        if isinstance(sft_tasks, (str, bytes)) or not isinstance(sft_tasks, (tuple, list, set, frozenset, range)):
            raise TypeError(f"sft_tasks: expected a tuple of task ids, got {type(sft_tasks).__name__}")
        self.sft_tasks = tuple(_checks.positive_int("sft_tasks", t, allow_zero=True) for t in sft_tasks)
        self.seed = _checks.seed(seed)
        self.rollouts = 0  # labels sampled so far (training and filtering)
        self.updates = 0
        self._ref: torch.nn.Module | None = None
        self._ref_task = -1

    def _rl(self, task_id: int) -> bool:
        return task_id not in self.sft_tasks

    def before_task(self, ctx: Context, task: Task) -> None:
        if self._rl(task.id) and self.kl_coef > 0 and (self.reference == "task" or self._ref is None):
            self._ref = copy.deepcopy(ctx.model).eval()
            for p in self._ref.parameters():
                p.requires_grad_(False)
            self._ref_task = task.id

    def sample(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(N, G) labels drawn from ``softmax(logits / temperature)`` on the CPU generator."""
        probs = F.softmax(logits.detach().float() / self.temperature, dim=1).cpu()
        return torch.multinomial(probs, self.n_rollouts, replacement=True, generator=generator).to(logits.device)

    def loss(self, ctx: Context, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        if not self._rl(ctx.task_id):
            return F.cross_entropy(output, batch["y"])
        g = _generator(self.seed, ctx.seed, ctx.task_id, ctx.step)
        actions = self.sample(output, g)  # (N, G)
        rewards = (actions == batch["y"][:, None]).float()
        adv = grpo_advantages(rewards)
        logp_all = F.log_softmax(output.float() / self.temperature, dim=1)
        logp = logp_all.gather(1, actions)
        ref_logp = None
        self._materialise_ref(ctx.model)
        if self._ref is not None and self.kl_coef > 0:
            with torch.no_grad():
                ref_all = F.log_softmax(self._ref(batch["x"]).float() / self.temperature, dim=1)
            ref_logp = ref_all.gather(1, actions)
        loss, _ = grpo_loss(logp, logp.detach(), adv, None, ref_logp, clip_low=self.clip_low,
                            clip_high=self.clip_high, dual_clip=self.dual_clip, kl_coef=self.kl_coef)
        self.rollouts += actions.numel()
        self.updates += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        ref = getattr(self, "_ref_state", None)
        if self._ref is not None:
            ref = {k: v.clone() for k, v in self._ref.state_dict().items()}
        return {"rollouts": self.rollouts, "updates": self.updates, "ref_task": self._ref_task, "ref": ref}

    def _check_state(self, state: Any) -> dict[str, Any]:
        """Everything of a loaded state, validated (nothing is applied here)."""
        _checks.state_mapping("state", state, ("rollouts", "updates", "ref_task", "ref"))
        out = {k: _checks.state_int(f"state[{k!r}]", state[k]) for k in ("rollouts", "updates")}
        out["ref_task"] = _checks.state_int("state['ref_task']", state["ref_task"], low=-1)
        ref = state["ref"]
        if ref is not None:
            _checks.state_mapping("state['ref']", ref)
            for k, v in ref.items():  # a model's state: buffers may hold inf by design
                _checks.tensor(f"state['ref'][{k!r}]", v)
        out["ref"] = ref
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, validated whole first; the reference model's tensors are
        checked against the model (keys, shapes, dtypes) when it is first used."""
        st = self._check_state(state)
        self.rollouts, self.updates, self._ref_task = st["rollouts"], st["updates"], st["ref_task"]
        self._ref_state = st["ref"]  # materialised on the first use, once the model is known

    def _materialise_ref(self, model: torch.nn.Module) -> None:
        state = getattr(self, "_ref_state", None)
        if state is not None:
            own = model.state_dict()
            if set(state) != set(own):
                raise ValueError(f"state['ref']: expected the model's keys, got {sorted(set(state) ^ set(own))} "
                                 f"differing")
            for k, v in state.items():
                _checks.tensor(f"state['ref'][{k!r}]", v, dtype=own[k].dtype, shape=tuple(own[k].shape))
            self._ref = copy.deepcopy(model).eval()
            self._ref.load_state_dict(state)
            for p in self._ref.parameters():
                p.requires_grad_(False)
            self._ref_state = None


class RIF(GRPO):
    """RIF-RFT: GRPO on the instances the policy can already solve sometimes.

    Before each RL task, every training instance gets ``k`` rollouts from the current policy
    (same sampler and reward as training); instances with no correct rollout are dropped for the
    whole task. ``kept`` / ``filtered`` record the counts per task, and the filter's rollouts
    are counted in ``rollouts``. Other arguments as :class:`GRPO`.
    """

    def __init__(self, n_rollouts: int = 5, *, k: int = 8, **kwargs: Any) -> None:
        super().__init__(n_rollouts, **kwargs)
        self.k = _checks.positive_int("k", k)
        self.kept: dict[str, int] = {}
        self.filtered: dict[str, int] = {}
        self._masks: dict[str, torch.Tensor] = {}  # per task, so a resumed run trains on the same instances

    @torch.no_grad()
    def train_data(self, ctx: Context, task: Task) -> dict[str, torch.Tensor]:
        x, y = task.train.tensors
        ids = torch.full((len(y),), task.id, dtype=torch.long)
        if not self._rl(task.id):
            return {"x": x, "y": y, "task": ids}
        if str(task.id) in self._masks:
            mask = self._masks[str(task.id)]
            return {"x": x[mask], "y": y[mask], "task": ids[mask]}
        model = ctx.model
        was = model.training
        model.eval()
        g = _generator(self.seed, ctx.seed, task.id, 2**32)  # a key no training step uses
        keep = []
        for i in range(0, len(y), 1024):
            logits = model(x[i : i + 1024].to(ctx.device))
            probs = F.softmax(logits.float() / self.temperature, dim=1).cpu()
            acts = torch.multinomial(probs, self.k, replacement=True, generator=g)
            keep.append((acts == y[i : i + 1024, None]).any(1))
        model.train(was)
        mask = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool)
        self._masks[str(task.id)] = mask
        self.kept[str(task.id)] = int(mask.sum())
        self.filtered[str(task.id)] = int((~mask).sum())
        self.rollouts += self.k * len(y)
        if not bool(mask.any()):
            raise ValueError(f"task: RIF kept no instance of task {task.id} (no correct rollout among "
                             f"k={self.k}); raise k or train this task with SFT first")
        return {"x": x[mask], "y": y[mask], "task": ids[mask]}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "k": self.k, "kept": dict(self.kept), "filtered": dict(self.filtered),
                "masks": {k: v.clone() for k, v in self._masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As :meth:`GRPO.load_state_dict`, plus ``k`` (must equal this plugin's), the per-task
        counts and instance masks (bool, ``kept`` of them set), all validated before applying."""
        st = self._check_state(state)
        _checks.state_mapping("state", state, ("k", "kept", "filtered", "masks"))
        if state["k"] != self.k:
            raise ValueError(f"state['k']: saved with k = {state['k']}, this plugin has k = {self.k}")
        counts = {}
        for key in ("kept", "filtered"):
            d = _checks.state_mapping(f"state[{key!r}]", state[key])
            counts[key] = {str(t): _checks.state_int(f"state[{key!r}][{t!r}]", v) for t, v in d.items()}
        masks = _checks.state_mapping("state['masks']", state["masks"])
        for t, m in masks.items():
            _checks.tensor(f"state['masks'][{t!r}]", m, dtype=torch.bool, ndim=1)
            if counts["kept"].get(str(t)) != int(m.sum()) or counts["filtered"].get(str(t)) != int((~m).sum()):
                raise ValueError(f"state['masks'][{t!r}]: its kept/filtered counts disagree with state['kept'] "
                                 f"and state['filtered']")
        self.rollouts, self.updates, self._ref_task = st["rollouts"], st["updates"], st["ref_task"]
        self._ref_state = st["ref"]
        self.kept, self.filtered = counts["kept"], counts["filtered"]
        self._masks = {str(k): v.clone() for k, v in masks.items()}


__all__ = ["GRPO", "RIF"]
