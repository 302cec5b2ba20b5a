"""forgetcore: the fast, faithful toolkit for forgetting in neural networks.

``import forgetcore`` gives the primitive families (Rust kernels on CPU, CUDA kernels on GPU,
pure torch elsewhere); the paper methods live in ``forgetcore.continual``,
``forgetcore.unlearning``, ``forgetcore.kvcache``, ``forgetcore.finetune`` and
``forgetcore.evaluation``, imported on first use so ``import forgetcore`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _core, datasets, importance, kvscore, reference, replay, spectral, subspace

__version__: str = _core.__version__

# Method packages: loaded on first attribute access (``forgetcore.continual.ER``).
_METHOD_PACKAGES = ("continual", "evaluation", "finetune", "kvcache", "unlearning")

__all__ = ["__version__", "datasets", "reference"]
__all__ += ["importance", "kvscore", "replay", "spectral", "subspace"]
__all__ += list(_METHOD_PACKAGES)


def __getattr__(name: str) -> Any:
    if name in _METHOD_PACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'forgetcore' has no attribute {name!r}")
