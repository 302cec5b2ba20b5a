"""Training objectives that several methods share: one home, one implementation each.

Methods import their losses from here rather than writing them again (knowledge distillation,
policy-gradient and margin losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                    *, scale_by_t2: bool = False) -> torch.Tensor:
    """Hinton et al. (2015) knowledge distillation: KL(softmax(t/T) || softmax(s/T)), batch mean.

    ``teacher_logits`` are detached (the old model is a fixed target). ``scale_by_t2`` multiplies by
    T^2, Hinton's gradient-scale correction (off by default: each method states its choice).
    Shapes: (N, C) each; a student with more classes than the teacher (class-incremental
    learning) is compared on the teacher's first C classes.
    """
    t = _checks.real("temperature", temperature, low=0.0, low_open=True)
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(f"student_logits, teacher_logits: expected 2-D (N, C) tensors, got "
                         f"{_checks.describe(student_logits)} and {_checks.describe(teacher_logits)}")
    n, c = teacher_logits.shape
    if student_logits.shape[0] != n or student_logits.shape[1] < c:
        raise ValueError(f"student_logits: expected shape ({n}, >= {c}) to match teacher_logits, "
                         f"got {tuple(student_logits.shape)}")
    log_p = F.log_softmax(student_logits[:, :c] / t, dim=1)
    q = F.softmax(teacher_logits.detach() / t, dim=1)
    loss = F.kl_div(log_p, q, reduction="batchmean")
    return loss * t * t if scale_by_t2 else loss


__all__ = ["distillation_kl"]
