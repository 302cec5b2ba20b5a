"""forgetcore: the fast, faithful toolkit for forgetting in neural networks.

``import forgetcore`` gives the primitive families (Rust kernels on CPU, CUDA kernels on GPU,
pure torch elsewhere); the paper methods live in ``forgetcore.continual``,
``forgetcore.unlearning``, ``forgetcore.kvcache``, ``forgetcore.finetune`` and
``forgetcore.evaluation``; the ``forgetcore`` command runs experiments.
"""

from __future__ import annotations

from . import _core, datasets, reference
from . import spectral

__version__: str = _core.__version__

__all__ = ["__version__", "datasets", "reference", "spectral"]
