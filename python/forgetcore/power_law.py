"""Power-law rehearsal schedules: how much of each earlier task to rehearse when a new task
arrives, with weights that fall as a power law of the time since the task was last seen
(Gandhi et al., arXiv 2401.10393, after Anderson and Schooler 1991).

:func:`power_law_weight` is the weight itself; :class:`PowerLawScheduler` turns weights into
per-task rehearsal counts and draws which examples to rehearse. ``forgetcore.replay`` re-exports
the scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import _checks
from ._core import ReplayRng

__all__ = ["PowerLawScheduler", "power_law_weight"]

_MAX_PASSES = 1 << 20  # whole passes over one task's examples per sample_indices call (~1 s of calls)


def power_law_weight(delta: torch.Tensor | float, c: float = 1.0, d: float = 1.0) -> torch.Tensor:
    """``(delta + c) ** -d`` (float64): the rehearsal weight of a task last seen ``delta`` phases ago.

    ``delta``: a number or a tensor of ages, finite and >= 0 (``>= 1`` in a schedule: a task is
    rehearsed from the phase after its own); ``c >= 0`` and ``d >= 0`` finite, with
    ``delta + c > 0`` so that the weight is finite.
    """
    c = _checks.real("c", c, low=0.0)
    d = _checks.real("d", d, low=0.0)
    t = _ages(delta)
    if c == 0.0 and d > 0.0 and t.numel() and bool((t == 0).any()):
        raise ValueError("delta: expected ages > 0 when c = 0 (the weight (0 + 0) ** -d is infinite)")
    return (t + c) ** -d


def _ages(delta: Any) -> torch.Tensor:
    """``delta`` as a float64 tensor of finite ages >= 0, or a clear error naming it."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.integer, np.floating, torch.Tensor)):
        raise TypeError(f"delta: expected a number or a tensor, got {type(delta).__name__}")
    if isinstance(delta, torch.Tensor) and (delta.is_complex() or delta.dtype == torch.bool):
        raise TypeError(f"delta: expected a real tensor, got {_checks.describe(delta)}")
    t = torch.as_tensor(delta, dtype=torch.float64)
    if t.numel():
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            bad = t[~(torch.isfinite(t) & (t >= 0))].reshape(-1)[0]
            raise ValueError(f"delta: expected finite ages >= 0, got {float(bad)}")
    return t


class PowerLawScheduler:
    """How much of each earlier task to rehearse when a new task arrives, with weights that fall
    as a power law of the time since the task was last seen: Gandhi, Shah, Marupudi and Varma,
    "Catastrophic Interference is Mitigated in Naturalistic Power-Law Learning Environments"
    (arXiv 2401.10393, 2024; v3 "Natural Mitigation of Catastrophic Interference: Continual
    Learning in Power-Law Learning Environments"), after Anderson and Schooler (1991).

    Phase ``t`` (0-based) learns task ``t`` and rehearses every earlier task ``i < t``, whose
    age is ``delta_i = t - last_seen_i >= 1`` (``last_seen_i = i`` at first). Weights:

    - ``schedule="power"``: ``g(delta) = (delta + c) ** -d``;
    - ``schedule="exponential"`` (the paper's control): ``g(delta) = exp(-lam * delta)``;
    - ``schedule="uniform"``: ``g = 1`` (rehearsal without recency, the other natural control).

    Budget (``variant``):

    - ``"total"`` (variant A): a fixed total ``budget`` per phase split in proportion to the
      weights, ``n_i = budget * g_i / sum_j g_j``, rounded by largest remainder so that the
      counts sum to ``budget`` exactly (ties go to the earlier task);
    - ``"per_task"`` (variant B): ``n_i = round(budget * g_i)`` (half up), no renormalisation,
      so the total grows with the number of tasks.

    ``reset_on_rehearsal=True`` makes rehearsal count as seeing the task again (true
    Anderson-Schooler re-occurrence: ``last_seen_i = t`` after a phase that rehearsed it);
    ``False`` counts ages from the task's own phase.

    What is established: the functional forms, the comparison of power-law against
    exponential rehearsal, and the cognitive basis (need probability falling as ``t ** -d``
    with ``d`` near 0.5 in Anderson and Schooler). What is not: no official code was found,
    and the published constants are unknown; ``c``, ``d``, ``lam``, the budget, whether
    rehearsal resets "last seen" and the rounding are all parameters. Defaults: ``d = 1``
    (Zipf-like), ``c = 1``, ``reset_on_rehearsal=False`` (as in the spec), and
    ``lam = d * ln(1 + c)``, which makes ``g_exp(1) = g_pow(1)``; :meth:`area_matched_lambda`
    gives the rate whose weights have the same sum over a horizon instead. Compare schedules
    at the same total (``variant="total"``): otherwise the comparison measures the budget.

    :meth:`sample_indices` draws which examples of each task to rehearse, from a seeded
    xoshiro256++ stream saved by ``state_dict`` (same seed, same draws on every rank).
    """

    SCHEDULES = ("power", "exponential", "uniform")
    VARIANTS = ("total", "per_task")

    def __init__(self, budget: int, *, schedule: str = "power", variant: str = "total",
                 c: float = 1.0, d: float = 1.0, lam: float | None = None,
                 reset_on_rehearsal: bool = False, seed: int = 0):
        self.budget = _checks.positive_int("budget", budget, allow_zero=True)
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(self.SCHEDULES)}, got {schedule!r}")
        if variant not in self.VARIANTS:
            raise ValueError(f"variant: expected one of {', '.join(self.VARIANTS)}, got {variant!r}")
        self.schedule, self.variant = schedule, variant
        self.c = _checks.real("c", c, low=0.0)
        self.d = _checks.real("d", d, low=0.0)
        if lam is None:
            lam = self.d * math.log1p(self.c)
            if schedule == "exponential" and lam == 0.0:
                raise ValueError("lam: the default d * ln(1 + c) is 0 here (c = 0 or d = 0), which is "
                                 "uniform rehearsal; pass lam explicitly")
        self.lam = _checks.real("lam", lam, low=0.0)
        if not isinstance(reset_on_rehearsal, bool):
            raise TypeError(f"reset_on_rehearsal: expected a bool, got {type(reset_on_rehearsal).__name__}")
        self.reset_on_rehearsal = reset_on_rehearsal
        # A weight that underflows is an error where it is decided: the newest earlier task
        # (age 1) has the largest weight of every phase, so g(1) > 0 keeps every total finite.
        g1 = float(self.g(1.0))
        if not g1 > 0.0:
            name = {"power": "d", "exponential": "lam"}[schedule]
            raise ValueError(f"{name}: the weight of a task seen one phase ago, g(1), underflows to {g1} "
                             f"(schedule={schedule!r}, c={self.c}, d={self.d}, lam={self.lam}); use a smaller {name}")
        self.seed = _checks.seed(seed)
        self._rng = ReplayRng(self.seed)
        self._phase = 0
        self._last_seen: list[int] = []

    @property
    def phase(self) -> int:
        """The next phase :meth:`step` plans (= the number of tasks already introduced)."""
        return self._phase

    @property
    def last_seen(self) -> list[int]:
        return list(self._last_seen)

    def g(self, delta: torch.Tensor | float) -> torch.Tensor:
        """The weight of a task last seen ``delta >= 1`` phases ago (float64)."""
        if self.schedule == "power":
            return power_law_weight(delta, self.c, self.d)
        t = _ages(delta)
        if self.schedule == "exponential":
            return torch.exp(-self.lam * t)
        return torch.ones_like(t)

    def weights(self) -> torch.Tensor:
        """Weights of tasks ``0 .. phase-1`` for the coming phase (float64; empty in phase 0)."""
        delta = torch.tensor([self._phase - s for s in self._last_seen], dtype=torch.float64)
        return self.g(delta)

    def counts(self) -> list[int]:
        """How many examples of each earlier task the coming phase rehearses (no state change)."""
        w = self.weights()
        if len(w) == 0:
            return []
        if self.variant == "per_task":
            return [int(v) for v in torch.floor(self.budget * w + 0.5).tolist()]
        quota = self.budget * (w / w.sum())
        base = torch.floor(quota)
        # The floors sum to at most budget (each is below its quota) and to more than budget - k.
        short = self.budget - int(base.sum())
        order = sorted(range(len(w)), key=lambda i: -float(quota[i] - base[i]))
        out = [int(v) for v in base.tolist()]
        for i in order[:short]:
            out[i] += 1
        return out

    def step(self) -> list[int]:
        """Begin the next phase (a new task arrives): return the rehearsal count of each earlier
        task, then advance ``phase`` (and reset ``last_seen`` of rehearsed tasks if asked)."""
        counts = self.counts()
        t = self._phase
        if self.reset_on_rehearsal:
            self._last_seen = [t if n > 0 else s for s, n in zip(self._last_seen, counts)]
        self._last_seen.append(t)
        self._phase = t + 1
        return counts

    def sample_indices(self, counts: Sequence[int], sizes: Sequence[int]) -> list[torch.Tensor]:
        """Which examples to rehearse: for task ``i``, ``counts[i]`` indices into its
        ``sizes[i]`` examples, drawn without replacement (while ``counts[i] > sizes[i]``, each
        whole pass is a fresh permutation, so every example appears ``q`` or ``q + 1`` times).

        Sizes are checked before anything is drawn or allocated: the result and the draw's work
        array must fit in the host's physical memory (a ``ValueError`` naming ``counts[i]`` or
        ``sizes[i]`` and the bytes), and a task may take at most 2**20 whole passes per call (a
        loop of that many draws takes about a second)."""
        for name, v in (("counts", counts), ("sizes", sizes)):
            if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray, torch.Tensor)):
                raise TypeError(f"{name}: expected a list of ints, got {type(v).__name__}")
        if len(counts) != len(sizes):
            raise ValueError(f"sizes: expected one size per task ({len(counts)}), got {len(sizes)}")
        counts = [_checks.positive_int(f"counts[{i}]", n, allow_zero=True) for i, n in enumerate(counts)]
        sizes = [_checks.positive_int(f"sizes[{i}]", s, allow_zero=True) for i, s in enumerate(sizes)]
        limit, result, work = _checks.memory_bytes(), 0, 0
        for i, (n, s) in enumerate(zip(counts, sizes)):
            if n > 0 and s == 0:
                raise ValueError(f"sizes[{i}]: task {i} has no examples but {n} are to be rehearsed")
            # Sizes before allocation: the result (int64, built in parts then concatenated) and the
            # draw's work array (a permutation of all s examples, or a hash map of ~4 words a draw).
            result += 16 * n
            w = 8 * s if 8 * min(n, s) >= s else 32 * n
            work = max(work, w)
            if result + work > limit:
                _checks.fits(f"counts[{i}]" if 16 * n >= w else f"sizes[{i}]", result + work, None,
                             f"to draw {n} of {s} examples")
            # Every whole pass is one call: refuse a count that would loop for minutes.
            if s and n // s > _MAX_PASSES:
                raise ValueError(f"counts[{i}]: {n} draws from {s} examples take {n // s} whole passes, "
                                 f"more than {_MAX_PASSES}; rehearse fewer or pool the task's examples")
        out = []
        for n, s in zip(counts, sizes):
            parts = [self._rng.sample(s, s) for _ in range(n // s)] if s else []
            parts.append(self._rng.sample(s, n - (n // s) * s if s else 0))
            out.append(torch.from_numpy(np.concatenate(parts)))
        return out

    @staticmethod
    def area_matched_lambda(c: float, d: float, horizon: int) -> float:
        """The rate ``lam`` with ``sum_{delta=1..horizon} exp(-lam delta)`` equal to
        ``sum_{delta=1..horizon} (delta + c) ** -d`` (bisection), when that sum is below
        ``horizon``; the spec's "area matches" reading of the exponential control."""
        c = _checks.real("c", c, low=0.0)
        d = _checks.real("d", d, low=0.0)
        horizon = _checks.positive_int("horizon", horizon)
        deltas = torch.arange(1, horizon + 1, dtype=torch.float64)
        target = float(((deltas + c) ** -d).sum())
        if target >= horizon:
            raise ValueError(f"d: the power-law weights sum to {target} >= horizon, so no rate lam >= 0 matches")
        lo, hi = 0.0, 1.0
        while float(torch.exp(-hi * deltas).sum()) > target:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if float(torch.exp(-mid * deltas).sum()) > target:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def _config(self) -> dict[str, Any]:
        return {"budget": self.budget, "schedule": self.schedule, "variant": self.variant, "c": self.c,
                "d": self.d, "lam": self.lam, "reset_on_rehearsal": self.reset_on_rehearsal}

    def state_dict(self) -> dict[str, Any]:
        return {"type": "PowerLawScheduler", "config": self._config(), "phase": self._phase,
                "last_seen": torch.tensor(self._last_seen, dtype=torch.int64),
                "rng": _checks.rng_tensor(self._rng.get_state())}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, validated whole first (keys, configuration, ``phase``,
        ``last_seen`` in range, the random stream); a state that fails changes nothing."""
        _checks.state_mapping("state_dict", state_dict, ("type", "config", "phase", "last_seen", "rng"))
        if state_dict["type"] != "PowerLawScheduler":
            raise ValueError(f"state_dict['type']: expected 'PowerLawScheduler', got {state_dict['type']!r}")
        if state_dict["config"] != self._config():
            raise ValueError(f"state_dict['config']: expected the configuration {self._config()}, "
                             f"got {state_dict['config']}")
        phase = _checks.state_int("state_dict['phase']", state_dict["phase"])
        last = _checks.tensor("state_dict['last_seen']", state_dict["last_seen"], dtype=torch.int64, shape=(phase,))
        last_seen = [int(v) for v in last.tolist()]
        if any(not i <= s < phase for i, s in enumerate(last_seen)):
            raise ValueError(f"state_dict['last_seen']: expected task i last seen in [i, {phase}), got {last_seen}")
        rng = ReplayRng(self.seed)
        rng.set_state(_checks.rng_words("state_dict['rng']", state_dict["rng"]))
        self._rng, self._phase, self._last_seen = rng, phase, last_seen
