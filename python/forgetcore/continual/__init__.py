"""Continual learning: scenarios over embedded real data, one training loop with plugins, methods.

    from forgetcore.continual import scenarios, Trainer, ER
    scenario = scenarios.split("digits", n_tasks=5, mode="class", seed=0)
    trainer = Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                      plugins=[ER(capacity=200, seed=0)], epochs=5)
    result = trainer.fit(scenario)          # result["R"]: the accuracy matrix

Metrics over ``result["R"]`` live in :mod:`forgetcore.evaluation.continual`.
"""

from __future__ import annotations

from . import moe, scenarios
from .fot import FOT
from .gpm import GPM
from .kfpf import KFPF
from .methods import ER, Finetune, Joint
from .refresh import DERpp, Refresh
from .scenarios import Scenario, Task
from .trainer import Context, Plugin, Trainer

__all__ = ["DERpp", "ER", "FOT", "GPM", "KFPF", "Context", "Finetune", "Joint", "Plugin", "Refresh", "Scenario",
           "Task", "Trainer", "moe", "scenarios"]
