"""HFT: Half Fine-Tuning, a random half of each layer's matrices trains in each stage.

Hui et al., "HFT: Half Fine-Tuning for Large Language Models" (arXiv 2404.18466; ACL 2025).
No official code was found: this follows the paper's category-level
variant as two independent third-party descriptions state it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import _checks
from .base import FinetuneMethod, check_state

__all__ = ["HFT", "GatedMLP"]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


class HFT(FinetuneMethod):
    """Freeze a random half of each transformer layer's parameter matrices, redrawn per stage.

    The category-level mask of the paper, drawn at ``prepare`` and again at every
    ``after_stage`` (a new task, or a new epoch of multi-epoch fine-tuning; never per step,
    which would make it dropout-like full fine-tuning): in every layer, 2 of the 4 attention
    matrices; the FFN's gate/up/down matrices 2 of 3 in a random half of the layers
    (``n_layers // 2`` of them) and 1 of 3 in the others (half of the FFN matrices overall
    when the layer count is even); 1 of the 2 norms. Everything outside the layers
    (embeddings, LM head, the final norm) always trains. Half is counted in matrices, as the
    paper does, not in parameters. A module's parameters (weight and bias) move together.

    Frozen tensors have ``requires_grad=False``; build the optimiser from
    :func:`~forgetcore.finetune.trainable_parameters` so that they get no optimiser state and
    weight decay cannot move them (the spec's pitfall).

    Works on Hugging Face Llama-architecture models (``model.model.layers``, SmolLM2) and on any
    model whose layers hold submodules named as in Llama (``self_attn.q_proj``, ...,
    ``mlp.gate_proj``, ..., ``input_layernorm``, ``post_attention_layernorm``); other names via
    ``attention``/``ffn``/``norms`` (matched as the last component of a submodule's name).

    Args:
        seed: the masks of stage ``s`` come from a generator seeded with ``(seed, s)``.
        layers: dotted path of the ``ModuleList`` of layers; default ``model.layers`` if present,
            else ``layers``.
        attention, ffn, norms: the names of each category's submodules within a layer.

    Attributes: ``stage`` (masks drawn so far minus one), ``trainable`` (names of the layer
    parameters that train in the current stage).
    """

    def __init__(self, seed: int = 0, *, layers: str | None = None, attention: Sequence[str] = ATTENTION,
                 ffn: Sequence[str] = FFN, norms: Sequence[str] = NORMS) -> None:
        self.seed = _checks.positive_int("seed", seed, allow_zero=True)
        if layers is not None and not isinstance(layers, str):
            raise TypeError(f"layers: expected a dotted module path or None, got {type(layers).__name__}")
        self.layers = layers
        self.categories = {"attention": tuple(attention), "ffn": tuple(ffn), "norms": tuple(norms)}
        self.stage = -1
        self.trainable: list[str] = []

    # -- the layer structure ------------------------------------------------------------------
    def _layer_list(self, model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
        mods = dict(model.named_modules())
        for path in ([self.layers] if self.layers else ["model.layers", "layers"]):
            if isinstance(mods.get(path), torch.nn.ModuleList) and len(mods[path]) > 0:
                return path, mods[path]
        raise ValueError(f"model: no non-empty ModuleList of layers at {self.layers or 'model.layers or layers'}")

    def _units(self, model: torch.nn.Module) -> list[dict[str, list[str]]]:
        """Per layer, per category: the full names of its submodules, in a fixed order."""
        path, layers = self._layer_list(model)
        out = []
        for i, layer in enumerate(layers):
            found: dict[str, list[str]] = {}
            for cat, names in self.categories.items():
                found[cat] = [f"{path}.{i}.{n}" for n, _ in layer.named_modules()
                              if n and n.rsplit(".", 1)[-1] in names]
            if not any(found.values()):
                raise ValueError(f"model: layer {path}.{i} has none of the submodules "
                                 f"{[n for v in self.categories.values() for n in v]}")
            out.append(found)
        return out

    # -- the mask -----------------------------------------------------------------------------
    def draw(self, model: torch.nn.Module, stage: int) -> list[str]:
        """The module names that train in ``stage`` (a pure function of seed, stage and model)."""
        units = self._units(model)
        ss = np.random.SeedSequence([self.seed, stage]).generate_state(1, dtype=np.uint64)[0]
        g = torch.Generator().manual_seed(int(ss))
        n = len(units)
        two_of_three = set(torch.randperm(n, generator=g)[: n // 2].tolist())
        chosen: list[str] = []
        for i, u in enumerate(units):
            for cat in ("attention", "ffn", "norms"):
                mods = u[cat]
                if not mods:
                    continue
                if cat == "ffn" and len(mods) == 3:
                    k = 2 if i in two_of_three else 1
                else:
                    k = len(mods) // 2 if len(mods) > 1 else int(torch.randint(2, (1,), generator=g))
                pick = torch.randperm(len(mods), generator=g)[:k].tolist()
                chosen.extend(mods[j] for j in sorted(pick))
        return chosen

    def _apply(self, model: torch.nn.Module) -> None:
        units = self._units(model)
        in_layers = {m for u in units for v in u.values() for m in v}
        on = set(self.trainable)
        for name, p in model.named_parameters():
            owner = next((m for m in _prefixes(name) if m in in_layers), None)
            p.requires_grad_(owner is None or owner in on)

    def prepare(self, model: torch.nn.Module) -> None:
        self.trainable = self.draw(model, 0)  # raises before anything is frozen
        self.stage = 0
        self._apply(model)

    def after_stage(self, model: torch.nn.Module) -> None:
        self.trainable = self.draw(model, self.stage + 1)
        self.stage += 1
        self._apply(model)

    def reapply(self, model: torch.nn.Module) -> None:
        if self.stage >= 0:
            self._apply(model)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "stage": self.stage, "trainable": list(self.trainable)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, {"seed", "stage", "trainable"}, {"seed": 0, "stage": -1})
        trainable = state["trainable"]
        if not isinstance(trainable, list) or not all(isinstance(n, str) for n in trainable):
            raise TypeError(f"state: trainable must be a list of names, got {_checks.describe(trainable)}")
        if state["stage"] == -1 and trainable:
            raise ValueError("state: trainable must be empty before the first mask (stage -1)")
        self.seed, self.stage, self.trainable = state["seed"], state["stage"], list(trainable)


def _prefixes(name: str) -> list[str]:
    """'a.b.c.weight' -> ['a.b.c', 'a.b', 'a']: the modules that own a parameter, innermost first."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


class GatedMLP(torch.nn.Module):
    """The spec's stand-in for a Llama-architecture model on vectors (no sequence axis).

    ``embed`` (Linear) -> ``layers`` of blocks -> ``norm`` -> ``head``; each block has Llama's
    submodule names: ``input_layernorm``, ``self_attn.{q,k,v,o}_proj`` (a gated mixing
    ``o(v(h) * sigmoid(q(h) * k(h)))`` in place of attention, which needs tokens), a residual,
    ``post_attention_layernorm`` and ``mlp.{gate,up,down}_proj`` (``down(silu(gate(h)) * up(h))``),
    so :class:`HFT` and other per-category methods see the same structure as on SmolLM2.
    """

    def __init__(self, n_in: int = 64, n_out: int = 10, d: int = 64, n_layers: int = 4, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = torch.nn.Linear(n_in, d)
            self.layers = torch.nn.ModuleList(_Block(d) for _ in range(n_layers))
            self.norm = torch.nn.LayerNorm(d)
            self.head = torch.nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1))
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        lin = torch.nn.Linear
        self.input_layernorm = torch.nn.LayerNorm(d)
        self.self_attn = torch.nn.ModuleDict({n: lin(d, d) for n in ATTENTION})
        self.post_attention_layernorm = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.ModuleDict({"gate_proj": lin(d, 2 * d), "up_proj": lin(d, 2 * d),
                                        "down_proj": lin(2 * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, m = self.self_attn, self.mlp
        h = self.input_layernorm(x)
        x = x + a["o_proj"](a["v_proj"](h) * torch.sigmoid(a["q_proj"](h) * a["k_proj"](h)))
        h = self.post_attention_layernorm(x)
        return x + m["down_proj"](torch.nn.functional.silu(m["gate_proj"](h)) * m["up_proj"](h))
