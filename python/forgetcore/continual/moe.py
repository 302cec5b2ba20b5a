"""Mixture-of-Experts continual learning on linear tasks: the theory paper's setting, simulated exactly.

Li, Lin, Duan, Liang and Shroff, "Theory on Mixture-of-Experts in Continual Learning" (ICLR 2025,
arXiv 2406.16437). No official code was found; the setting follows the
spec, which marks the feature structure and the termination rule as uncertain: see
:func:`simulate` for what is implemented.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _checks

__all__ = ["forgetting_generalisation", "simulate"]


def simulate(*, n_experts: int, seeds: list[int] | range, d: int = 50, s: int = 10, n_tasks: int = 3,
             rounds: int = 2000, lr: float = 0.01, noise: float = 0.3, alpha: float = 0.5,
             beta: float = 1.0, sigma: float = 0.1, terminate: bool = True, terminate_after: int | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Run the MoE continual-learning process for every seed at once (vectorised over seeds).

    Per seed: ``n_tasks`` ground truths ``w_n ~ N(0, I_d / d)`` and unit signal vectors ``v_n``
    (orthonormal). Round ``t`` draws a task ``n_t`` uniformly (tasks recur) and data
    ``X_t`` (d x s): column 0 is ``beta * v_{n_t}``, the others ``N(0, sigma^2 I_d)``;
    ``y_t = X_t^T w_{n_t}``. Then:

    - gate ``h_m = theta_m^T sum_i X_{t,i}``; routing ``m_t = argmax_m (h_m + r_m)``,
      ``r_m ~ U[0, noise]`` (exploration: at ``theta = 0`` every gate ties);
    - only expert ``m_t`` learns, by the exact min-norm fixed point of gradient descent
      ``w <- w + X (X^T X)^{-1} (y - X^T w)`` (a Cholesky of the s x s ``X^T X``, not SGD);
    - router loss ``L_loc + L_aux``: locality ``sum_m pi_m ||w_t^(m) - w_{t-1}^(m)||`` (pi =
      softmax of the gates) and load balancing ``alpha M sum_m f_m P_m`` with ``f_m`` the
      cumulative fraction of rounds routed to ``m`` and ``P_m`` the cumulative mean of
      ``pi_m`` (both over all rounds so far); one gradient step on ``theta`` with ``lr``;
    - termination: with ``terminate``, the ROUTER stops updating after
      ``terminate_after`` rounds (default ``T1 = ceil(M / lr)``, the paper's horizon); the
      experts keep learning. The paper stops once the gating gaps separate, a rule the spec
      could not extract; the fixed horizon is ours.

    Returns numpy arrays (leading axis: seeds): ``task`` (S, T) and ``expert`` (S, T) per round,
    ``err_now`` (S, T) = ``E_t(w_t^(m_t))`` right after round t's update, ``err_end`` (S, T) =
    ``E_t(w_T^(m_t))`` with the final experts, where ``E_t(w) = ||w - w_{n_t}||^2``;
    ``forgetting`` F_T and ``generalisation`` G_T per seed (:func:`forgetting_generalisation`);
    ``routing_purity`` (S, T): 1 where round t went to the expert that task ``n_t`` is routed
    to most often over the whole run (the specialisation it settled into).
    """
    m_exp = _checks.positive_int("n_experts", n_experts)
    seeds = [_checks.positive_int("seeds", x, allow_zero=True) for x in seeds]
    if not seeds:
        raise ValueError("seeds: expected at least one seed, got none")
    d, s = _checks.positive_int("d", d), _checks.positive_int("s", s)
    if s >= d:
        raise ValueError(f"s: expected fewer samples than dimensions d={d} (overparameterised), got {s}")
    n = _checks.positive_int("n_tasks", n_tasks)
    if n > d:
        raise ValueError(f"n_tasks: expected at most d={d} orthonormal signal vectors, got {n}")
    T = _checks.positive_int("rounds", rounds)
    if T < 2:
        raise ValueError(f"rounds: expected at least 2 (forgetting compares rounds), got {T}")
    lr = _checks.real("lr", lr, low=0.0, low_open=True)
    noise = _checks.real("noise", noise, low=0.0)
    alpha = _checks.real("alpha", alpha, low=0.0)
    beta = _checks.real("beta", beta, low=0.0, low_open=True)
    sigma = _checks.real("sigma", sigma, low=0.0, low_open=True)
    t1 = math.ceil(m_exp / lr) if terminate_after is None else _checks.positive_int("terminate_after", terminate_after)
    S = len(seeds)
    dt = torch.float64
    # Per-seed randomness from one generator per seed, drawn in a fixed order: the same seed
    # gives the same run whatever other seeds run beside it.
    gens = [torch.Generator().manual_seed(int(np.random.SeedSequence([x, 0x40E]).generate_state(1)[0])) for x in seeds]
    truth = torch.stack([torch.randn(n, d, generator=g, dtype=dt) / math.sqrt(d) for g in gens])       # (S, n, d)
    signal = torch.stack([torch.linalg.qr(torch.randn(d, n, generator=g, dtype=dt))[0].T for g in gens])  # (S, n, d)
    tasks = torch.stack([torch.randint(n, (T,), generator=g) for g in gens])                            # (S, T)
    W = torch.zeros(S, m_exp, d, dtype=dt)
    theta = torch.zeros(S, m_exp, d, dtype=dt)
    counts = torch.zeros(S, m_exp, dtype=dt)
    pi_sum = torch.zeros(S, m_exp, dtype=dt)
    ar = torch.arange(S)
    expert = torch.zeros(S, T, dtype=torch.long)
    err_now = torch.zeros(S, T, dtype=dt)
    for t in tqdm(range(T), desc=f"moe M={m_exp}", disable=not progress, leave=False):
        nt = tasks[:, t]
        X = torch.stack([torch.randn(d, s, generator=g, dtype=dt) for g in gens]) * sigma  # (S, d, s)
        X[:, :, 0] = beta * signal[ar, nt]
        y = torch.einsum("bds,bd->bs", X, truth[ar, nt])
        r = torch.stack([torch.rand(m_exp, generator=g, dtype=dt) for g in gens]) * noise
        xsum = X.sum(2)                                                                           # (S, d)
        th = theta.clone().requires_grad_(t < t1 or not terminate)
        h = torch.einsum("bmd,bd->bm", th, xsum)
        mt = (h.detach() + r).argmax(1)
        # Exact min-norm update of the routed expert.
        w_old = W[ar, mt]
        resid = y - torch.einsum("bds,bd->bs", X, w_old)
        L = torch.linalg.cholesky(X.transpose(1, 2) @ X)
        step = torch.einsum("bds,bs->bd", X, torch.cholesky_solve(resid.unsqueeze(2), L).squeeze(2))
        W[ar, mt] = w_old + step
        expert[:, t] = mt
        err_now[:, t] = (W[ar, mt] - truth[ar, nt]).square().sum(1)
        counts[ar, mt] += 1
        pi = torch.softmax(h, dim=1)
        if th.requires_grad:
            change = torch.zeros(S, m_exp, dtype=dt)
            change[ar, mt] = step.norm(dim=1)
            f = counts / (t + 1)
            P = (pi_sum + pi) / (t + 1)
            loss = (pi * change).sum() + alpha * m_exp * (f * P).sum()
            (grad,) = torch.autograd.grad(loss, th)
            theta = theta - lr * grad
        pi_sum += pi.detach()
    tasks_np, expert_np = tasks.numpy(), expert.numpy()
    err_end = (W[ar[:, None], expert] - truth[ar[:, None], tasks]).square().sum(2)
    F_T, G_T = forgetting_generalisation(err_now.numpy(), err_end.numpy())
    # Each task's most frequent expert over the run; purity = went there.
    home = np.zeros((S, n), dtype=np.int64)
    for i in range(S):
        for j in range(n):
            routed = expert_np[i][tasks_np[i] == j]
            home[i, j] = np.bincount(routed, minlength=m_exp).argmax() if len(routed) else -1
    purity = (expert_np == np.take_along_axis(home, tasks_np, axis=1)).astype(np.float64)
    return {"task": tasks_np, "expert": expert_np, "err_now": err_now.numpy(), "err_end": err_end.numpy(),
            "forgetting": F_T, "generalisation": G_T, "routing_purity": purity, "terminate_after": t1,
            "theta": theta.detach().numpy(), "experts": W.numpy()}


def forgetting_generalisation(err_now: np.ndarray, err_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F_T and G_T of the paper from per-round model errors (last axis: rounds).

    ``F_T = 1/(T-1) sum_{t<T} [E_t(w_T^(m_t)) - E_t(w_t^(m_t))]`` (how much the expert that
    learned round t has since moved away from round t's task) and
    ``G_T = 1/T sum_t E_t(w_T^(m_t))`` (the final experts' error on every round's task).
    """
    err_now, err_end = np.asarray(err_now, dtype=np.float64), np.asarray(err_end, dtype=np.float64)
    if err_now.shape != err_end.shape or err_now.ndim < 1 or err_now.shape[-1] < 2:
        raise ValueError(f"err_now: expected the shape of err_end {err_end.shape} with at least 2 rounds, "
                         f"got {err_now.shape}")
    if not (np.isfinite(err_now).all() and np.isfinite(err_end).all()):
        raise ValueError("err_now: expected finite errors, got NaN or inf")
    T = err_now.shape[-1]
    forgetting = (err_end[..., :-1] - err_now[..., :-1]).sum(-1) / (T - 1)
    return forgetting, err_end.mean(-1)
