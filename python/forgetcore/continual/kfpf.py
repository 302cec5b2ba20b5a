"""FPF / k-FPF: fine-tune only the forgetting-prone modules on a small buffer, k times in a run.

Zhao, Zhou, Shi, Tao and Tang, "Does Continual Learning Equally Forget All Parameters?"
(ICML 2023, arXiv 2304.04158). No official code was found: beyond the
abstract-level claims, the procedure below is the spec's reconstruction; its choices are named.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .. import _checks
from ..importance import fisher_diagonal
from ..replay import ReservoirBuffer
from .scenarios import Task
from .trainer import Batch, Context, Plugin

__all__ = ["KFPF", "kfpf_plugins", "module_drift", "sensitivity"]

_BN = (torch.nn.modules.batchnorm._BatchNorm,)


def _modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules that own parameters directly (conv, BN, linear, ...), by name."""
    return {n: m for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))}


def module_drift(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per module ``||theta(t) - theta(t-1)|| / ||theta(t-1)||`` over its parameters (both dicts are
    ``state_dict``-style name -> tensor; batch-norm running statistics count as their own
    "module.running" entries)."""
    groups: dict[str, list[str]] = {}
    for name in before:
        if name.endswith("num_batches_tracked"):
            continue
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        key = f"{owner}.running" if leaf.startswith("running_") else owner
        groups.setdefault(key, []).append(name)
    out = {}
    for key, names in groups.items():
        num = math.sqrt(sum(float((after[n].float() - before[n].float()).square().sum()) for n in names))
        den = math.sqrt(sum(float(before[n].float().square().sum()) for n in names))
        out[key] = num / max(den, 1e-12)
    return out


def sensitivity(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Per module: the mean diagonal Fisher (empirical, ``forgetcore.importance.fisher_diagonal``)
    over its parameters on ``(x, y)``, the spec's ``s_m = (1/|theta_m|) sum_i F_ii``. Computed in eval
    mode (batch-norm uses its running statistics and does not update them)."""
    was = model.training
    model.eval()
    try:
        fisher = fisher_diagonal(model, torch.utils.data.TensorDataset(x, y), mode="empirical", batch_size=batch_size)
    finally:
        model.train(was)
    out: dict[str, list[torch.Tensor]] = {}
    for name, f in fisher.items():
        out.setdefault(name.rsplit(".", 1)[0], []).append(f.flatten())
    return {m: float(torch.cat(v).detach().mean()) for m, v in out.items()}


class KFPF(Plugin):
    """k-FPF: plain SGD on the stream (no replay), a reservoir buffer of stream examples, and every
    ``floor(T / k)`` optimisation steps (``T``: the run's total steps) FPF: ``n_ft`` SGD steps on
    buffer batches that train only the forgetting-prone modules.

    The forgetting-prone set (reconstructed): the ``n_prone`` modules with the highest
    :func:`sensitivity` on the buffer, recomputed at every FPF call; or a fixed list ``prone``
    (e.g. the BN layers and the final FC, the set the paper reports for ResNet-18). During FPF only
    those modules train; a batch-norm module outside the set is in eval mode, so its running
    statistics do not move, while one inside the set is in train mode (the spec's pitfall).
    ``variant="ce"``: cross-entropy on the buffer (k-FPF-CE); ``"kd"``: CE plus
    ``alpha * MSE(logits, stored logits)`` (k-FPF-KD, DER-style). ``drift`` records
    :func:`module_drift` between the ends of consecutive tasks; ``replay_examples`` counts the
    buffer examples passed forward and backward (the cost the paper compares with ER's).
    """

    def __init__(self, capacity: int, total_steps: int | None = None, *, k: int = 10, n_ft: int = 30, lr: float = 0.05,
                 batch_size: int = 10, n_prone: int = 4, prone: list[str] | None = None, variant: str = "ce",
                 alpha: float = 0.5, seed: int = 0) -> None:
        self.buffer = ReservoirBuffer(capacity, seed=seed)
        self.total_steps = None if total_steps is None else _checks.positive_int("total_steps", total_steps)
        self.k = _checks.positive_int("k", k)
        self.n_ft = _checks.positive_int("n_ft", n_ft)
        self.lr = _checks.real("lr", lr, low=0.0, low_open=True)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.n_prone = _checks.positive_int("n_prone", n_prone)
        if prone is not None and (not isinstance(prone, list) or not all(isinstance(p, str) for p in prone)):
            raise TypeError(f"prone: expected a list of module names or None, got {prone!r}")
        self.prone = prone
        if not isinstance(variant, str):
            raise TypeError(f"variant: expected 'ce' or 'kd', got {type(variant).__name__}")
        if variant not in ("ce", "kd"):
            raise ValueError(f"variant: expected 'ce' or 'kd', got {variant!r}")
        self.variant = variant
        self.alpha = _checks.real("alpha", alpha, low=0.0)
        self.gen = torch.Generator().manual_seed(_checks.positive_int("seed", seed, allow_zero=True))
        self.period = 0
        self.calls: list[list[str]] = []   # the prone set of each FPF call
        self.drift: list[dict[str, float]] = []
        self.replay_examples = 0
        self._last_state: dict[str, torch.Tensor] | None = None
        self._logits: torch.Tensor | None = None

    def before_task(self, ctx: Context, task: Task) -> None:
        if ctx.scenario is not None and ctx.scenario.mode == "task":
            raise ValueError("scenario: KFPF replays unmasked logits; task-incremental scenarios are not supported")
        if self.prone is not None:
            mods = _modules(ctx.model)
            missing = [p for p in self.prone if p not in mods]
            if missing:
                raise ValueError(f"prone: model has no parameter-owning modules named {missing[:5]}")
        if self.period == 0:
            total = self.total_steps
            if total is None:
                tr = ctx.trainer
                total = sum(int(tr.epochs * math.ceil(len(t.train) / tr.batch_size)) for t in ctx.scenario or ())
            self.period = max(1, total // self.k)
        if self._last_state is None:
            self._last_state = {n: v.detach().clone() for n, v in ctx.model.state_dict().items()}

    def loss(self, ctx: Context, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        self._logits = output.detach()
        return F.cross_entropy(output, batch["y"])

    def after_step(self, ctx: Context, batch: Batch) -> None:
        n = batch["n_stream"]
        self.buffer.add(x=batch["x"][:n].detach().cpu(), y=batch["y"][:n].cpu(), logits=self._logits[:n].cpu())
        if ctx.step % self.period == 0:
            self.fpf(ctx.model)

    def after_task(self, ctx: Context, task: Task) -> None:
        now = {n: v.detach().clone() for n, v in ctx.model.state_dict().items()}
        self.drift.append(module_drift(self._last_state, now))
        self._last_state = now

    def prone_set(self, model: torch.nn.Module) -> list[str]:
        if self.prone is not None:
            return list(self.prone)
        data = self.buffer.data()
        s = sensitivity(model, data["x"], data["y"])
        return sorted(s, key=s.get, reverse=True)[: self.n_prone]

    def fpf(self, model: torch.nn.Module) -> None:
        """One FPF call: ``n_ft`` SGD steps of the prone modules on buffer batches."""
        if len(self.buffer) == 0:
            return
        prone = self.prone_set(model)
        self.calls.append(prone)
        mods = _modules(model)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        modes = {n: m.training for n, m in model.named_modules()}
        keep = {n for n in prone}
        params = [p for n, m in mods.items() if n in keep for p in m.parameters(recurse=False)]
        for n, p in model.named_parameters():
            p.requires_grad_(n.rsplit(".", 1)[0] in keep)
        model.train()
        for n, m in model.named_modules():
            if isinstance(m, _BN) and n not in keep:
                m.eval()  # frozen BN: its running statistics stay
        opt = torch.optim.SGD(params, lr=self.lr)
        dev = params[0].device
        try:
            for _ in range(self.n_ft):
                b = self.buffer.sample(min(self.batch_size, len(self.buffer)), generator=self.gen)
                out = model(b["x"].to(dev))
                loss = F.cross_entropy(out, b["y"].to(dev))
                if self.variant == "kd":
                    loss = loss + self.alpha * F.mse_loss(out, b["logits"].to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.replay_examples += len(b["y"])
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
                p.grad = None
            for n, m in model.named_modules():
                m.train(modes[n])

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "gen": self.gen.get_state(), "period": self.period,
                "calls": [list(c) for c in self.calls], "drift": [dict(d) for d in self.drift],
                "replay_examples": self.replay_examples,
                "last_state": dict(self._last_state) if self._last_state is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        need = {"buffer", "gen", "period", "calls", "drift", "replay_examples", "last_state"}
        if not isinstance(state, dict) or not need <= state.keys():
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected keys {sorted(need)}, got {got}")
        for key in ("period", "replay_examples"):
            _checks.positive_int(f"state: {key}", state[key], allow_zero=True)
        _check_generator_state(state["gen"], self.gen)
        calls, drift, last = state["calls"], state["drift"], state["last_state"]
        if not isinstance(calls, list) or not all(isinstance(c, list) and all(isinstance(n, str) for n in c)
                                                  for c in calls):
            raise TypeError(f"state: calls must be a list of lists of module names, got {_checks.describe(calls)}")
        if not isinstance(drift, list) or not all(
                isinstance(d, dict) and all(isinstance(n, str) and isinstance(v, float) and v >= 0
                                            for n, v in d.items()) for d in drift):
            raise ValueError(f"state: drift must be a list of dicts name -> float >= 0, got {_checks.describe(drift)}")
        if not isinstance(last, dict) or not all(isinstance(n, str) and isinstance(v, torch.Tensor)
                                                 for n, v in last.items()):
            raise TypeError(f"state: last_state must map names to tensors, got {_checks.describe(last)}")
        self.buffer.load_state_dict(state["buffer"])  # the buffer checks its own state before it applies any
        self.gen.set_state(state["gen"])
        self.period, self.replay_examples = state["period"], state["replay_examples"]
        self.calls = [list(c) for c in calls]
        self.drift = [dict(d) for d in drift]
        self._last_state = dict(last) or None


def _check_generator_state(gen_state: Any, gen: torch.Generator) -> None:
    """A torch CPU generator's state: a uint8 tensor of the size the generator's own has."""
    like = gen.get_state()
    if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8 or gen_state.shape != like.shape:
        raise ValueError(f"state: gen must be a generator state (uint8, {tuple(like.shape)}), "
                         f"got {_checks.describe(gen_state)}")


def kfpf_plugins(seed: int, capacity: int = 200, k: int = 10) -> list[Plugin]:
    """k-FPF-CE for the continual demo's table (k = 10 calls of 30 FPF steps on batches of 10, the
    4 most sensitive modules). On a model with at most 4 parameter-owning modules (the demo's MLP)
    every module is in the set, and k-FPF is periodic replay of the whole model; the claim test
    uses a small CNN with BN, where the set is a real subset."""
    return [KFPF(capacity, k=k, seed=seed)]
