"""Metrics of continual learning over the accuracy matrix.

``R[i][j]`` is the accuracy on task j's test set after training on tasks 0..i (0-based here;
the papers count from 1). ``R`` may hold fewer rows than columns (a run still going, or the
trainer's rows for every task, seen or not): with ``n`` rows, every metric describes the model
after task ``n - 1`` and uses only columns ``j < n`` (plus ``b``). Metrics keep ``R``'s unit
(fractions from :class:`forgetcore.continual.Trainer`; percentages if you pass percentages).

- :func:`average_accuracy`: ACC (Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual
  Learning", NeurIPS 2017, Sec. 2; "A_k" in Chaudhry et al. 2018).
- :func:`backward_transfer`: BWT (GEM, Sec. 2).
- :func:`forward_transfer`: FWT (GEM, Sec. 2).
- :func:`average_forgetting`: F_k (Chaudhry, Dokania, Ajanthan and Torr, "Riemannian Walk for
  Incremental Learning: Understanding Forgetting and Intransigence", ECCV 2018, the forgetting
  measure of its evaluation section).

Continual evaluation (De Lange, van de Ven and Tuytelaars, "Continual Evaluation for Lifelong
Learning: Identifying the Stability Gap", ICLR 2023), over per-iteration accuracy curves
(:class:`ContinualEvaluation`, or ``Trainer(eval_every=1)``'s ``curves``): :func:`min_acc`,
:func:`wc_acc`, :func:`windowed_forgetting`, :func:`windowed_plasticity`, :func:`lca`, and
:func:`stability_gap` for all of them.

Continual instruction tuning (MLLM-CTBench, ``eval_matrix.py`` / ``aggregate_cl.py`` of
``yueluoshuangtian/MLLM-CTBench``): :func:`ctbench_metrics` (AP, BWT, signed per-task Forget).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .. import _checks


def accuracy_matrix(R: Any) -> np.ndarray:
    """``R`` as a float64 array of shape (n, T) with 1 <= n <= T, checked.

    Accepts a nested list (``None`` for entries not measured), a numpy array, a torch tensor, or
    the dict :meth:`forgetcore.continual.Trainer.fit` returns (its ``"R"``). Entries that a
    metric uses (the lower triangle with the diagonal, and the first superdiagonal for forward
    transfer) must be finite; those above may be NaN/None.
    """
    if isinstance(R, Mapping):
        if "R" not in R:
            raise ValueError("R: expected a matrix or a Trainer.fit() result with key 'R', "
                             f"got a dict with keys {sorted(R)}")
        R = R["R"]
    if isinstance(R, torch.Tensor):
        R = R.detach().cpu().numpy()
    try:
        a = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"R: expected a 2-D matrix of numbers, got {type(R).__name__} ({e})") from None
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[0] > a.shape[1]:
        raise ValueError(f"R: expected a matrix of shape (n, T) with 1 <= n <= T, got shape {a.shape}")
    n = a.shape[0]
    if not np.isfinite(a[:, :n][np.tril_indices(n)]).all():
        raise ValueError("R: expected finite accuracies on and below the diagonal, got NaN/inf/None")
    return a


def average_accuracy(R: Any) -> float:
    """ACC = (1/n) sum_{j<n} R[n-1][j]: mean accuracy over the tasks trained so far.

    GEM (Lopez-Paz and Ranzato 2017): ACC = (1/T) sum_i R_{T,i}.
    """
    a = accuracy_matrix(R)
    n = a.shape[0]
    return float(a[n - 1, :n].mean())


def backward_transfer(R: Any) -> float:
    """BWT = 1/(n-1) sum_{j<n-1} (R[n-1][j] - R[j][j]): how training later tasks changed earlier ones.

    GEM (Lopez-Paz and Ranzato 2017): BWT = 1/(T-1) sum_{i=1}^{T-1} (R_{T,i} - R_{i,i}).
    Negative values are forgetting. Needs at least two trained tasks.
    """
    a = accuracy_matrix(R)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"R: backward transfer needs at least 2 trained tasks (rows), got {n}")
    j = np.arange(n - 1)
    return float((a[n - 1, j] - a[j, j]).mean())


def forward_transfer(R: Any, b: Any) -> float:
    """FWT = 1/(n-1) sum_{j=1}^{n-1} (R[j-1][j] - b[j]): accuracy on a task before training on it,
    against ``b[j]``, the accuracy of a randomly initialised model on task j.

    GEM (Lopez-Paz and Ranzato 2017): FWT = 1/(T-1) sum_{i=2}^{T} (R_{i-1,i} - b_i).
    (:meth:`Trainer.fit` returns ``b`` as ``"initial"`` when the model starts untrained.) In
    class-incremental learning R[j-1][j] is about 0 (the classes were never seen), so FWT mostly
    measures how far below chance the model falls; it is informative in domain-incremental streams.
    """
    a = accuracy_matrix(R)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"R: forward transfer needs at least 2 trained tasks (rows), got {n}")
    bb = np.array(b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if bb.ndim != 1 or len(bb) < n:
        raise ValueError(f"b: expected one accuracy per task (at least {n}), got shape {bb.shape}")
    j = np.arange(1, n)
    d = a[j - 1, j] - bb[j]
    if not np.isfinite(d).all():
        raise ValueError("R: forward transfer needs finite R[j-1][j] and b[j], got NaN/inf")
    return float(d.mean())


def average_forgetting(R: Any) -> float:
    """F = 1/(n-1) sum_{j<n-1} f_j, with f_j = max_{l<n-1} R[l][j] - R[n-1][j].

    Chaudhry et al. 2018 (RWalk): forgetting of task j after task k is the drop from
    the best accuracy it ever had at an earlier point, f_j^k = max_{l in 1..k-1} a_{l,j} - a_{k,j},
    averaged over j < k. As in the paper the max runs over every earlier row, including rows
    before task j was trained (those are rarely the max). Avalanche instead takes the accuracy
    right after task j was trained; the two differ only when an earlier task's accuracy rose
    later and fell again. Needs at least two trained tasks.
    """
    a = accuracy_matrix(R)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"R: forgetting needs at least 2 trained tasks (rows), got {n}")
    best = np.nanmax(a[: n - 1, : n - 1], axis=0)  # entries above the diagonal may be NaN
    return float((best - a[n - 1, : n - 1]).mean())


def summary(R: Any, b: Any = None) -> dict[str, float]:
    """All metrics of one run: ``acc``, ``forgetting``, ``bwt`` and, given ``b``, ``fwt``.

    With a single trained task the transfer metrics are undefined and left out.
    """
    a = accuracy_matrix(R)
    out = {"acc": average_accuracy(a)}
    if a.shape[0] >= 2:
        out["forgetting"] = average_forgetting(a)
        out["bwt"] = backward_transfer(a)
        if b is not None:
            out["fwt"] = forward_transfer(a, b)
    return out


# ---------------------------------------------------------------------------- MLLM-CTBench
def ctbench_metrics(P: Any) -> dict[str, Any]:
    """MLLM-CTBench's continual instruction-tuning metrics of an accuracy matrix ``P`` (N x N).

    ``P[i][j]``: score on task j after training task i. As the benchmark's code computes them
    (only the diagonal and the last row are needed; other entries may be NaN/None):

    - ``AP`` = (1/N) sum_j P[N-1][j]: average performance after the last task;
    - ``BWT`` = 1/(N-1) sum_{j<N-1} (P[N-1][j] - P[j][j]) (negative: forgetting);
    - ``forget``: per task j < N-1, the signed P[N-1][j] - P[j][j] (negative: forgetting;
      not the max-based forgetting of :func:`average_forgetting`).

    The benchmark applies the same three to its CoT-quality scores; pass that matrix the same way.
    """
    if isinstance(P, torch.Tensor):
        P = P.detach().cpu().numpy()
    try:
        a = np.array(P, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"P: expected a square matrix of numbers, got {type(P).__name__} ({e})") from None
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"P: expected a square matrix (N, N) with N >= 2, got shape {a.shape}")
    n = a.shape[0]
    diag, last = np.diag(a), a[n - 1]
    if not (np.isfinite(diag).all() and np.isfinite(last).all()):
        raise ValueError("P: expected finite scores on the diagonal and the last row, got NaN/inf/None")
    forget = (last[: n - 1] - diag[: n - 1]).tolist()
    return {"AP": float(last.mean()), "BWT": float(np.mean(forget)), "forget": forget}


# ---------------------------------------------------------------------------- continual evaluation
def _curves(curves: Any) -> tuple[np.ndarray, np.ndarray]:
    """(learning task per evaluation (E,), accuracy (E, T) with NaN where not evaluated)."""
    if isinstance(curves, Mapping) and "curves" in curves and "acc" not in curves:
        curves = curves["curves"]  # a Trainer.fit() result
    if not isinstance(curves, Mapping) or not {"task", "acc"} <= set(curves):
        raise ValueError("curves: expected a dict with 'task' (learning task per evaluation) and 'acc' "
                         "(accuracy per task per evaluation), as Trainer.fit()['curves'] or "
                         "ContinualEvaluation.curves")
    task = np.asarray(curves["task"], dtype=np.int64)
    acc = np.array([[np.nan if v is None else v for v in row] for row in curves["acc"]], dtype=np.float64)
    if task.ndim != 1 or len(task) == 0 or acc.ndim != 2 or acc.shape[0] != len(task):
        raise ValueError(f"curves: expected as many accuracy rows as learning tasks (>= 1), got "
                         f"{len(task)} tasks and accuracy shape {acc.shape}")
    if np.isinf(acc).any():
        raise ValueError("curves: expected finite accuracies (or None/NaN where not evaluated), got inf")
    return task, acc


def _average(name: str, average: str) -> None:
    if average not in ("previous", "all"):
        raise ValueError(f"{name}: expected 'previous' (the paper) or 'all' (the official code), got {average!r}")


def min_acc(curves: Any, per_task: bool = False) -> float | dict[int, float]:
    """Average minimum accuracy, min-ACC (De Lange et al. 2023, Sec. 4, Eq. 4).

    For each task i, the lowest accuracy over every evaluation taken while another task is being
    learned (so evaluations after task i was learned count, those while it is learned do not;
    a pre-update point of the next task counts, as it belongs to that task). Averaged over the
    tasks that have such evaluations, the previous tasks (``per_task=True``: the dict).
    ``nan`` when there are none (a single task).
    """
    task, acc = _curves(curves)
    out = {}
    for i in range(acc.shape[1]):
        v = acc[(task != i), i]
        v = v[~np.isnan(v)]
        if len(v):
            out[i] = float(v.min())
    if per_task:
        return out
    return float(np.mean(list(out.values()))) if out else float("nan")


def wc_acc(curves: Any) -> float:
    """Worst-case accuracy at the last evaluation, WC-ACC (De Lange et al. 2023, Eq. 5):
    ``(1/k) A(current task) + (1 - 1/k) min-ACC`` over the k tasks seen, i.e. the mean of the
    current task's accuracy and the previous tasks' minimum accuracies (the official code's
    ``WCACCPluginMetric``)."""
    task, acc = _curves(curves)
    k = int(task[-1])
    cur = acc[-1, k]
    if np.isnan(cur):
        raise ValueError(f"curves: the current task {k} was not evaluated at the last point")
    mins = min_acc({"task": task, "acc": acc}, per_task=True)
    vals = [cur] + [m for i, m in mins.items() if i != k]
    return float(np.mean(vals))


def _window_delta(seq: np.ndarray, window: int, sign: float) -> float:
    """max over windows of ``window`` consecutive values of max_{m<n} sign*(A_m - A_n) (>= 0
    once two values exist; the official code's running max starts at 0)."""
    best = 0.0
    for n in range(1, len(seq)):
        lo = max(0, n - window + 1)
        d = sign * (seq[lo:n] - seq[n])
        best = max(best, float(d.max()))
    return best


def _windowed(curves: Any, window: int, average: str, sign: float, per_task: bool):
    window = _checks.positive_int("window", window)
    if window < 2:
        raise ValueError(f"window: expected at least 2 evaluations, got {window}")
    _average("average", average)
    task, acc = _curves(curves)
    k = int(task[-1])
    out = {}
    for i in range(acc.shape[1]):
        seq = acc[:, i][~np.isnan(acc[:, i])]
        if len(seq) == 0 or (average == "previous" and i >= k):
            continue
        out[i] = _window_delta(seq, window, sign)
    if per_task:
        return out
    return float(np.mean(list(out.values()))) if out else float("nan")


def windowed_forgetting(curves: Any, window: int = 10, average: str = "previous",
                        per_task: bool = False) -> float | dict[int, float]:
    """Windowed forgetting WF^w (De Lange et al. 2023, Eq. 6): for each task, the largest drop
    ``A_m - A_n`` (m < n) inside any ``window`` consecutive evaluations of that task, over the
    whole run (the official code's running max, starting at 0).

    ``average="previous"`` (default, the paper) averages over the tasks before the current
    (last) one; ``"all"`` over every evaluated task, the current one included (the official
    code's ``TaskAveragingPluginMetric``).
    """
    return _windowed(curves, window, average, 1.0, per_task)


def windowed_plasticity(curves: Any, window: int = 10, average: str = "previous",
                        per_task: bool = False) -> float | dict[int, float]:
    """Windowed plasticity WP^w (De Lange et al. 2023): as :func:`windowed_forgetting` with the
    largest rise ``A_n - A_m`` (m < n) instead."""
    return _windowed(curves, window, average, -1.0, per_task)


def lca(curves: Any, beta: int = 10) -> float:
    """Learning curve area (Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019)
    as De Lange et al.'s code computes it: per task, the mean accuracy of its first ``beta``
    evaluations while it is the task being learned (here the first is the pre-update point),
    averaged over the tasks that had ``beta`` such evaluations (``nan`` if none)."""
    beta = _checks.positive_int("beta", beta)
    task, acc = _curves(curves)
    vals = []
    for i in np.unique(task):
        v = acc[task == i, i]
        v = v[~np.isnan(v)]
        if len(v) >= beta:
            vals.append(float(v[:beta].mean()))
    return float(np.mean(vals)) if vals else float("nan")


def stability_gap(curves: Any, window: int = 10, beta: int = 10, average: str = "previous") -> dict[str, float]:
    """Every continual-evaluation metric of one run: ``min_acc``, ``wc_acc``, ``wf`` (WF^window),
    ``wp`` (WP^window), ``lca``; ``average`` as in :func:`windowed_forgetting`."""
    return {"min_acc": min_acc(curves), "wc_acc": wc_acc(curves),
            "wf": windowed_forgetting(curves, window, average), "wp": windowed_plasticity(curves, window, average),
            "lca": lca(curves, beta)}


class ContinualEvaluation:
    """Per-iteration evaluation as a :class:`~forgetcore.continual.Trainer` plugin (De Lange et al.
    2023, Sec. 3, the official ``ContinualEvaluationPhasePlugin``).

    Before each task's first update (the pre-update point, x = -1 for task 0) and after every
    ``every``-th optimisation step, the model (in eval mode, restored after) is evaluated on
    every seen task's test split, or on ``subset_size`` examples of it. The subset is drawn once
    per task from ``seed`` and kept (default: a fixed subset, so that resampling noise does not
    bias the minimum down); ``resample=True`` draws a fresh one at every evaluation, as the
    official code does (seeded by (seed, task, step), so a resumed run draws the same).

    ``curves`` has the format of ``Trainer.fit()["curves"]`` (``step``, ``task``, ``acc`` with
    None for tasks not seen) and feeds :func:`stability_gap`. Logits are masked to the task's
    classes in task-incremental scenarios, as the trainer's evaluation does.
    """

    def __init__(self, every: int = 1, subset_size: int | None = 1000, resample: bool = False,
                 seed: int = 0, batch_size: int = 1024) -> None:
        self.every = _checks.positive_int("every", every)
        self.subset_size = None if subset_size is None else _checks.positive_int("subset_size", subset_size)
        if not isinstance(resample, bool):
            raise TypeError(f"resample: expected a bool, got {type(resample).__name__}")
        self.resample = resample
        self.seed = _checks.seed(seed)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.curves: dict[str, list] = {"step": [], "task": [], "acc": []}

    def _subset(self, j: int, n: int, step: int) -> torch.Tensor:
        if self.subset_size is None or self.subset_size >= n:
            return torch.arange(n)
        key = [self.seed, j, step] if self.resample else [self.seed, j]
        s = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
        return torch.randperm(n, generator=torch.Generator().manual_seed(s))[: self.subset_size]

    @torch.no_grad()
    def _evaluate(self, ctx: Any) -> None:
        model, sc, t = ctx.model, ctx.scenario, ctx.task_id
        was = model.training
        model.eval()
        row: list[float | None] = [None] * len(sc)
        try:
            for j in range(t + 1):
                x, y = sc[j].test.tensors
                idx = self._subset(j, len(y), ctx.step)
                correct = 0
                for part in idx.split(self.batch_size):
                    out = model(x[part].to(ctx.device))
                    if sc.mode == "task":
                        mask = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
                        mask[sc[j].classes] = True
                        out = out.masked_fill(~mask, torch.finfo(out.dtype).min)
                    correct += int((out.argmax(1).cpu() == y[part]).sum())
                row[j] = correct / len(idx)
        finally:
            model.train(was)
        self.curves["step"].append(int(ctx.step))
        self.curves["task"].append(int(t))
        self.curves["acc"].append(row)

    def before_task(self, ctx: Any, task: Any) -> None:
        self._evaluate(ctx)

    def after_step(self, ctx: Any, batch: Any) -> None:
        if ctx.step % self.every == 0:
            self._evaluate(ctx)

    def state_dict(self) -> dict[str, Any]:
        return {"curves": {k: [list(v) if isinstance(v, list) else v for v in vs] for k, vs in self.curves.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the curves, validated first (three lists of one length, non-negative steps
        and task ids, rows of accuracies in [0, 1] or None); a state that fails changes nothing."""
        _checks.state_mapping("state", state, ("curves",))
        c = _checks.state_mapping("state['curves']", state["curves"], ("step", "task", "acc"))
        if not all(isinstance(c[k], (list, tuple)) for k in ("step", "task", "acc")) or not (
                len(c["step"]) == len(c["task"]) == len(c["acc"])):
            raise ValueError("state['curves']: expected lists 'step', 'task' and 'acc' of one length")
        for k in ("step", "task"):
            for i, v in enumerate(c[k]):
                _checks.state_int(f"state['curves'][{k!r}][{i}]", v)
        for i, row in enumerate(c["acc"]):
            if not isinstance(row, (list, tuple)):
                raise TypeError(f"state['curves']['acc'][{i}]: expected a list, got {type(row).__name__}")
            for a in row:
                if a is not None:
                    _checks.real(f"state['curves']['acc'][{i}]", a, low=0.0, high=1.0)
        self.curves = {k: [list(v) if isinstance(v, (list, tuple)) else v for v in c[k]]
                       for k in ("step", "task", "acc")}
