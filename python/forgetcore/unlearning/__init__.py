"""Machine unlearning: every method has ``fit(model, data: UnlearnData) -> dict`` and edits the model in place.

- :class:`SSD` / :class:`LFSSD`: Selective Synaptic Dampening (Foster et al., AAAI 2024).
- :class:`GU`: Geometric-disentanglement Unlearning (Zhou et al., 2025), PCGrad as its baseline.
- :class:`IAU`: influence approximation, one Adam step (Liu et al., 2025).
- :class:`RandomLabelForgetting`: fine-tune on random labels (Zhang, Choshen & Andreas, 2024).
- :class:`SafeEraser`: refusal unlearning with the prompt-decouple term (Chen et al., 2025).
- :class:`CUPID`: sharpness-partitioned, pathway-routed ascent under bias (Kwon et al., 2026).
- :class:`GSLoRA` / :class:`GSLoRAPlusPlus`: group-sparse LoRA forgetting (Zhao et al., 2024/2025).
- Baselines: :class:`Retrain` (gold standard), :class:`RetainFinetune`, :class:`GradientAscent`.

``forgetcore.evaluation.unlearning`` builds scenarios on the embedded digits/MNIST data and
compares methods (accuracies, membership inference, wall time).
"""

from __future__ import annotations

from .baselines import TRAIN_DEFAULTS, GradientAscent, RetainFinetune, Retrain
from .cupid import CUPID
from .data import UnlearnData
from .gslora import GSLoRA, GSLoRAPlusPlus
from .gu import GU
from .iau import IAU
from .random_label import RandomLabelForgetting
from .safeeraser import SafeEraser
from .ssd import DEFAULT_ALPHAS, LFSSD, SSD

__all__ = ["UnlearnData", "CUPID", "GSLoRA", "GSLoRAPlusPlus", "GU", "IAU", "RandomLabelForgetting", "SafeEraser",
           "SSD", "LFSSD", "Retrain", "RetainFinetune", "GradientAscent", "TRAIN_DEFAULTS", "DEFAULT_ALPHAS"]
