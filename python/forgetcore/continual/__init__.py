"""Continual learning: scenarios over embedded real data, one training loop with plugins, methods.

    from forgetcore.continual import scenarios, Trainer, ER
    scenario = scenarios.split("digits", n_tasks=5, mode="class", seed=0)
    trainer = Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                      plugins=[ER(capacity=200, seed=0)], epochs=5)
    result = trainer.fit(scenario)          # result["R"]: the accuracy matrix

Methods (each a plugin of the one ``Trainer``): ``Finetune``, ``ER`` (any buffer), ``Joint``,
``GPM``, ``UER``, ``WA``, ``ViewBatch``, ``PowerLawRehearsal``, SCoLe's ``LogitMask`` and
``SCoLeReplay`` (streams: ``scenarios.scole``); ``FOT`` runs its own federated loop.

Metrics over ``result["R"]`` and over per-iteration curves (the stability gap) live in
:mod:`forgetcore.evaluation.continual`.
"""

from __future__ import annotations

from . import moe, scenarios
from .fot import FOT
from .gpm import GPM
from .kfpf import KFPF
from .methods import ER, Finetune, Joint
from .powerlaw import PowerLawRehearsal
from .refresh import DERpp, Refresh
from .rif import GRPO, RIF
from .scenarios import Scenario, Task
from .scole import LogitMask, SCoLeReplay
from .trainer import Context, Plugin, Trainer
from .uer import UER
from .viewbatch import ViewBatch
from .wa import WA

__all__ = ["DERpp", "ER", "FOT", "GPM", "GRPO", "KFPF", "RIF", "UER", "WA", "Context", "Finetune", "Joint",
           "LogitMask", "Plugin", "PowerLawRehearsal", "Refresh", "SCoLeReplay", "Scenario", "Task", "Trainer",
           "ViewBatch", "moe", "scenarios"]
