"""RegLoRA (SEFE): keep the positions where earlier tasks' LoRA updates were largest from moving again.

Chen et al., "SEFE: Superficial and Essential Forgetting Eliminator for Multimodal Continual
Instruction Tuning" (ICML 2025); official code ``jinpeng0528/SEFE``
(``key_elements_identification.py``; the regulariser in ``llava/model/language_model/modeling_llama.py``
and ``llava_llama.py``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from .. import _checks
from .base import FinetuneMethod, check_state

__all__ = ["RegLoRA"]

_ADAPTER = "default"


class RegLoRA(FinetuneMethod):
    """Sequential LoRA, merged after each task, with SEFE's L1 penalty at earlier tasks' key positions.

    - ``prepare(model)`` injects peft LoRA adapters (``r``, ``lora_alpha``, no dropout) into the
      ``target_modules`` IN PLACE (``peft.inject_adapter_in_model``: the model object stays the
      same, its base weights are frozen, only ``lora_A``/``lora_B`` train).
    - ``after_stage(model)`` (after each task): for every adapted module, ``dW = B @ A`` WITHOUT
      the alpha/r scaling; the indices of the top ``top`` fraction (2 %) of ``|dW|`` over the
      flattened matrix (``k = int(top * out * in)``) are appended to that module's key positions
      (duplicates kept: a position chosen by several tasks weighs more); then the adapter is
      merged into the base weight (with its scaling, as peft merges) and re-initialised for the
      next task (A: peft's Kaiming init from a generator seeded by ``(seed, stage)``; B: 0).
    - ``penalty``: ``lam * (1/n_modules) * sum_m mean_{(i,j) in K_m} |(B_m A_m)_ij|``, the mean
      over each module's positions with their duplicates, the entries gathered as
      ``(B[rows] * A[:, cols].T).sum(-1)`` (the full ``B @ A`` is never formed in training).
      Zero in the first task. ``lam = 2.5e3`` is the official value.

    Departure: the official code divides by 224 (= 32 layers x 7 modules of LLaVA's LLM,
    hard-coded); here ``n_modules`` defaults to the number of adapted modules.
    """

    def __init__(self, *, target_modules: list[str] | str, r: int = 4, lora_alpha: float = 8.0, top: float = 0.02,
                 lam: float = 2.5e3, n_modules: int | None = None, seed: int = 0) -> None:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        if not isinstance(target_modules, list) or not target_modules or not all(
                isinstance(t, str) for t in target_modules):
            raise TypeError(f"target_modules: expected a non-empty list of module names, got {target_modules!r}")
        self.target_modules = list(target_modules)
        self.r = _checks.positive_int("r", r)
        self.lora_alpha = _checks.real("lora_alpha", lora_alpha, low=0.0, low_open=True)
        self.top = _checks.real("top", top, low=0.0, high=1.0, low_open=True)
        self.lam = _checks.real("lam", lam, low=0.0)
        self.n_modules = None if n_modules is None else _checks.positive_int("n_modules", n_modules)
        self.seed = _checks.positive_int("seed", seed, allow_zero=True)
        self.stage = -1
        self.keys: dict[str, torch.Tensor] = {}  # module name -> flat indices, all tasks so far

    # -- adapters -----------------------------------------------------------------------------
    def _lora_modules(self, model: torch.nn.Module) -> dict[str, Any]:
        return {n: m for n, m in model.named_modules()
                if hasattr(m, "lora_A") and _ADAPTER in getattr(m, "lora_A", {})}

    def prepare(self, model: torch.nn.Module) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
        from peft import LoraConfig, inject_adapter_in_model

        names = {n for n, _ in model.named_modules()}
        missing = [t for t in self.target_modules if t not in names]
        if missing:
            raise ValueError(f"target_modules: model has no modules named {missing[:5]}")
        pattern = "^(?:" + "|".join(re.escape(t) for t in self.target_modules) + ")$"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._stage_seed(0))
            inject_adapter_in_model(LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=0.0,
                                               target_modules=pattern), model)
        self.stage = 0

    def _stage_seed(self, stage: int) -> int:
        return int(np.random.SeedSequence([self.seed, stage, 0x5EFE]).generate_state(1, dtype=np.uint64)[0] >> 1)

    @staticmethod
    def _ab(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return module.lora_A[_ADAPTER].weight, module.lora_B[_ADAPTER].weight  # (r, in), (out, r)

    @torch.no_grad()
    def after_stage(self, model: torch.nn.Module) -> None:
        mods = self._lora_modules(model)
        if not mods:
            raise ValueError("model: no LoRA adapters found; call prepare(model) first")
        for name, m in mods.items():
            a, b = self._ab(m)
            delta = (b.float() @ a.float()).abs().flatten()  # no alpha/r scaling in the importance
            k = int(self.top * delta.numel())
            if k > 0:
                idx = torch.topk(delta, k).indices.sort().values.cpu()
                self.keys[name] = torch.cat([self.keys.get(name, torch.empty(0, dtype=torch.long)), idx])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._stage_seed(self.stage + 1))
            for m in mods.values():
                m.base_layer.weight.add_(m.get_delta_weight(_ADAPTER).to(m.base_layer.weight.dtype))
                m.reset_lora_parameters(_ADAPTER, True)
        self.stage += 1

    def penalty(self, model: torch.nn.Module, batch: Any, outputs: Any) -> torch.Tensor:
        mods = self._lora_modules(model)
        dev = next(model.parameters()).device
        if not self.keys or self.lam == 0:
            return torch.zeros((), device=dev)
        total = torch.zeros((), device=dev)
        for name, idx in self.keys.items():
            a, b = self._ab(mods[name])
            idx = idx.to(a.device)
            rows, cols = idx // a.shape[1], idx % a.shape[1]
            vals = (b[rows] * a[:, cols].T).sum(-1)  # (B A)_ij for the key positions only
            total = total + vals.abs().mean()
        return self.lam * total / (self.n_modules or len(mods))

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "seed": self.seed, "keys": {n: v.clone() for n, v in self.keys.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, {"keys", "seed", "stage"}, {"seed": 0, "stage": -1})
        keys = state["keys"]
        if not isinstance(keys, dict) or not all(
                isinstance(n, str) and isinstance(v, torch.Tensor) and v.dim() == 1 and v.dtype == torch.long
                for n, v in keys.items()):
            raise TypeError(f"state: keys must map module names to 1-D int64 tensors, got {_checks.describe(keys)}")
        if any(len(v) and int(v.min()) < 0 for v in keys.values()):
            raise ValueError("state: keys must hold flat indices >= 0")
        self.stage, self.seed = state["stage"], state["seed"]
        self.keys = {n: v.clone() for n, v in keys.items()}
