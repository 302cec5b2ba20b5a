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


__all__ = ["distillation_kl", "threshold_margin_loss"]


def threshold_margin_loss(pred: torch.Tensor, ref: torch.Tensor, pos_thr: torch.Tensor, neg_thr: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """GeRe's threshold-based margin (TM) loss (Zhang et al., "GeRe: Towards Efficient Anti-Forgetting
    in Continual Learning of LLM via General Samples Replay", arXiv 2508.04676, 2025).

    Each element of the reference activations ``ref`` falls in a region of its unit ``j``:
    NEG (``ref <= neg_thr_j``), POS (``ref >= pos_thr_j``) or NEU (in between). The loss pushes
    the current activation ``pred`` back into its reference's region, and is zero inside it:
    ``NEG * relu(pred - neg) + POS * relu(pos - pred) + NEU * (relu(pred - pos) + relu(neg - pred))``,
    times ``mask`` (e.g. the attention mask, broadcast over units), summed and divided by the
    number of NON-ZERO elements plus 1e-8 (the official normaliser: dividing by every element
    would shrink it by orders of magnitude and change the meaning of the weight ``w``).

    Shapes: ``pred`` and ``ref`` (..., H) alike; ``pos_thr``/``neg_thr`` (H,); ``mask`` (...)
    or None. Zero exactly when ``pred == ref`` (each reference satisfies its own region).
    """
    if pred.shape != ref.shape or pred.dim() < 1:
        raise ValueError(f"pred: expected the shape of ref {tuple(ref.shape)}, got {_checks.describe(pred)}")
    h = pred.shape[-1]
    for name, t in (("pos_thr", pos_thr), ("neg_thr", neg_thr)):
        if t.shape != (h,):
            raise ValueError(f"{name}: expected shape ({h},), got {_checks.describe(t)}")
    ref = ref.detach()
    neg, pos = neg_thr.detach(), pos_thr.detach()
    is_neg = ref <= neg
    is_pos = ref >= pos
    loss = torch.where(is_neg, F.relu(pred - neg),
                       torch.where(is_pos, F.relu(pos - pred), F.relu(pred - pos) + F.relu(neg - pred)))
    if mask is not None:
        if mask.shape != pred.shape[:-1]:
            raise ValueError(f"mask: expected shape {tuple(pred.shape[:-1])}, got {_checks.describe(mask)}")
        loss = loss * mask.unsqueeze(-1).to(loss.dtype)
    return loss.sum() / ((loss != 0).sum() + 1e-8)
