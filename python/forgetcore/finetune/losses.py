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


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group-normalised advantages (Shao et al., "DeepSeekMath", arXiv 2402.03300, 2024;
    EasyR1 ``compute_grpo_outcome_advantage``, commit 2a319e33): ``A_i = (r_i - mean(r)) / (std(r) + eps)`` within
    each group (row) of ``rewards`` (B, G), with the unbiased (n - 1) standard deviation as
    ``torch.std`` computes it. A group whose rewards are all equal gets A = 0 exactly."""
    _checks.tensor("rewards", rewards, ndim=2)
    _checks.finite("rewards", rewards)
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards: expected groups of >= 2 rollouts (B, G >= 2), got {_checks.describe(rewards)}")
    r = rewards.float()
    return (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None = None,
              ref_logp: torch.Tensor | None = None, *, clip_low: float = 0.2, clip_high: float = 0.3,
              dual_clip: float | None = 3.0, kl_coef: float = 1e-2) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO policy loss as EasyR1 computes it (``verl/trainer/core_algos.py``, read at commit
    2a319e33: ``compute_policy_loss`` with ``loss_type="default"``, ``compute_kl``, ``average_loss``):

    - ratio ``rho = exp(clamp(logp - old_logp, -20, 20))`` per token;
    - clipped surrogate ``max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))`` (asymmetric
      clip), and for ``A < 0`` the dual clip ``min(that, -A * dual_clip)`` (Ye et al. 2020);
    - the k3 ("low_var_kl") KL to the reference: ``d = clamp(ref_logp - logp, -20, 20)``,
      ``clamp(exp(d) - d - 1, -10, 10)``, weighted by ``kl_coef`` (EasyR1 default 1e-2);
    - token-mean averaging over ``mask`` (``loss_avg_mode = "token"``).

    All tensors share one shape, e.g. (B*G, T) of the sampled responses' tokens; ``advantages``
    is broadcast per response to its tokens by the caller. ``ref_logp=None`` drops the KL term.
    Returns ``(loss, stats)`` with ``pg_loss``, ``kl`` and ``clip_frac`` as floats.
    """
    _checks.tensor("logp", logp)
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None:
            _checks.tensor(name, t)
            if t.shape != logp.shape:
                raise ValueError(f"{name}: expected the shape of logp {tuple(logp.shape)}, got {_checks.describe(t)}")
    _checks.real("clip_low", clip_low, low=0.0, high=1.0, high_open=True)
    _checks.real("clip_high", clip_high, low=0.0)
    _checks.real("kl_coef", kl_coef, low=0.0)
    if dual_clip is not None:
        _checks.real("dual_clip", dual_clip, low=1.0, low_open=True)
    m = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
    n = m.sum().clamp_min(1.0)
    adv = advantages.detach().to(logp.dtype)
    ratio = torch.exp(torch.clamp(logp - old_logp.detach(), -20.0, 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    pg_loss = (pg * m).sum() / n
    loss = pg_loss
    kl_val = 0.0
    if ref_logp is not None and kl_coef > 0:
        d = torch.clamp(ref_logp.detach() - logp, -20.0, 20.0)
        kl = torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
        kl_mean = (kl * m).sum() / n
        loss = loss + kl_coef * kl_mean
        kl_val = float(kl_mean.detach())
    clip_frac = float((((pg2 > pg1).to(logp.dtype)) * m).sum() / n)
    return loss, {"pg_loss": float(pg_loss.detach()), "kl": kl_val, "clip_frac": clip_frac}


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


__all__ = ["distillation_kl", "grpo_advantages", "grpo_loss", "threshold_margin_loss"]
