"""The experiments behind ``forgetcore demo``: one module per family, and their registry.

Each demo module has ``run(out_dir, seeds, quick, progress, **options) -> dict``: it prints its
table and writes PNG/JSON files to ``out_dir``. ``options`` are the demo's own command-line
flags, declared in :data:`DEMOS` so that ``forgetcore demo NAME --help`` lists them. A demo
whose seeds are independent declares ``jobs=True`` and takes ``run(..., jobs=N)``: its seeds
run in N spawned processes (``forgetcore.distributed.sweep``), with the sequential results.

Demos sit above the methods and the evaluation code (they import both); nothing in the package
imports a demo.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """A demo-specific command-line flag: ``--flag`` sets ``run(**{dest: value})``."""

    flag: str
    help: str
    action: str = "store_true"
    type: Callable[[str], Any] | None = None
    default: Any = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Demo:
    module: str  # under forgetcore.demos
    description: str
    options: tuple[Option, ...] = field(default_factory=tuple)
    jobs: bool = False  # its seeds are independent: `--jobs N` runs them across processes

    def load(self) -> Callable[..., dict[str, Any]]:
        # Imported on use, so `forgetcore --help` does not import torch or transformers.
        return importlib.import_module(f"{__name__}.{self.module}").run


DEMOS: dict[str, Demo] = {
    "cl": Demo("continual", "Split-Digits class-incremental: Finetune, ER, UER, WA, ViewBatch, PowerLaw, DER++, "
               "Refresh, k-FPF, Joint; stability-gap plot; SCoLe long streams with --scole N",
               (Option("--full", "10 epochs per task instead of 4 (longer)"),
                Option("--scole", "also run SCoLe streams of N tasks (e.g. 300) with and without masking",
                       action="store", type=int))),
    "unlearn": Demo("unlearning", "SSD, IAU, GS-LoRA(++), random labels vs Retrain/Finetune/GradientAscent, "
                    "with MIA; SafeEraser, CUPID and memorisation studies",
                    (Option("--iau-gr", "train IAU its gradient-restricted original (slower)"),)),
    "kv": Demo("kvcache", "KV-cache eviction on SmolLM2: A2SF, H2O, RecentWindow; every press on passkey retrieval "
                          "(at most 18 minutes on 2 cores; --quick about 1.5)"),
    "subspace": Demo("subspace", "Permuted-Digits: GPM vs Finetune vs ER; federated FOT vs FedAvg",
                     (Option("--flower", "also run FOT on Flower's deployment engine on localhost "
                             "(1 SuperLink, 2 SuperNodes; needs forgetcore[fl])"),), jobs=True),
    "finetune": Demo("finetune", "Selective fine-tuning on SmolLM2-135M: KappaTune, HFT, RegLoRA, GeRe vs full "
                                 "fine-tuning (about 8 CPU-minutes; --quick about 2.5)"),
    "memory": Demo("memory", "LM memory on SmolLM2: recognition/recall/retention, knowledge decay, MemSifter",
                   (Option("--tiny", "run the tiny LM instead of SmolLM2 (what --quick does)"),)),
}

# Other names for the same demo (kept so that older commands keep working).
ALIASES: dict[str, str] = {"kappa": "finetune"}


def resolve(name: str) -> Demo:
    """The demo registered under ``name`` or one of its aliases."""
    key = ALIASES.get(name, name)
    if key not in DEMOS:
        raise ValueError(f"name: expected one of {sorted([*DEMOS, *ALIASES])}, got {name!r}")
    return DEMOS[key]


__all__ = ["ALIASES", "DEMOS", "Demo", "Option", "resolve"]
