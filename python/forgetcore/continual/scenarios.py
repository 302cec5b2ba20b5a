"""Continual-learning scenarios over the real data that ships inside packages (no downloads).

Three settings, in van de Ven, Tuytelaars and Tolias's terms ("Three types of incremental
learning", Nature Machine Intelligence 2022):

- ``split(mode="class")``: class-incremental. The classes are cut into ``n_tasks`` disjoint
  groups; the model has one head over every class and is never told the task at test time.
- ``split(mode="task")``: task-incremental. The same split, but the task id is known, so the
  trainer masks the logits to the task's own classes (in training and at evaluation).
- ``permuted`` and ``rotated``: domain-incremental. Every task holds all classes; the input
  distribution changes (a fixed pixel permutation, or a rotation, per task).

Labels are always the dataset's global class ids (0-9), so one output layer of
``scenario.n_classes`` logits serves every setting.

The train/val/test split is stratified by class and fixed by ``seed``
(:func:`forgetcore.datasets.stratified_split`); every task of a domain-incremental stream uses the
same images, transformed. Every later method needs the validation split for its hyperparameters,
so it is always there (``val_fraction=0`` makes it empty).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .. import _checks, datasets

MODES = ("class", "task", "domain")


@dataclass(frozen=True)
class Task:
    """One task of a stream: its id, its classes, and its train/val/test data.

    ``train``, ``val`` and ``test`` are ``TensorDataset`` s of ``(x float32 (N, 1, H, W),
    y int64 (N,))`` with global class ids.
    """

    id: int
    classes: list[int]
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


class Scenario(Sequence[Task]):
    """A sequence of :class:`Task` s plus what a model needs to know about it.

    Attributes: ``name`` (e.g. ``"split-digits-class"``), ``mode`` (``"class"``, ``"task"`` or
    ``"domain"``), ``n_classes`` (size of the output layer), ``input_shape`` (one example,
    e.g. ``(1, 8, 8)``), ``seed``.
    """

    def __init__(self, tasks: Sequence[Task], *, name: str, mode: str, n_classes: int,
                 input_shape: tuple[int, ...], seed: int) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.tasks = tuple(tasks)
        if not isinstance(name, str):
            raise TypeError(f"name: expected a str, got {type(name).__name__}")
        self.name = name
        self.mode = mode
        self.n_classes = _checks.positive_int("n_classes", n_classes)
        if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, (tuple, list, torch.Size)):
            raise TypeError(f"input_shape: expected a tuple of ints, got {type(input_shape).__name__}")
        self.input_shape = tuple(_checks.positive_int("input_shape", d) for d in input_shape)
        self.seed = _checks.seed(seed)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i):  # type: ignore[override]
        return self.tasks[i]

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{len(t.train)}/{len(t.val)}/{len(t.test)}" for t in self.tasks)
        return (f"Scenario({self.name!r}, mode={self.mode!r}, n_tasks={len(self)}, "
                f"n_classes={self.n_classes}, input_shape={self.input_shape}, "
                f"train/val/test per task: {sizes})")


def _check_common(dataset: str, n_tasks: int, seed: int, val_fraction: float,
                  test_fraction: float) -> tuple[int, int, float, float]:
    if not isinstance(dataset, str) or dataset not in datasets.NAMES:
        raise ValueError(f"dataset: expected one of {datasets.NAMES}, got {dataset!r}")
    n_tasks = _checks.positive_int("n_tasks", n_tasks)
    seed = _checks.seed(seed)
    val_fraction = _checks.real("val_fraction", val_fraction, low=0.0, high=1.0, high_open=True)
    test_fraction = _checks.real("test_fraction", test_fraction, low=0.0, high=1.0,
                                 low_open=True, high_open=True)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction: val_fraction + test_fraction must leave training data, "
                         f"got {val_fraction} + {test_fraction} >= 1")
    return n_tasks, int(seed), val_fraction, test_fraction


def _splits(dataset: str, seed: int, val_fraction: float, test_fraction: float):
    x, y = datasets.load(dataset)
    parts = datasets.stratified_split(
        y, [1.0 - val_fraction - test_fraction, val_fraction, test_fraction], seed)
    return x, y, parts


def split(dataset: str = "digits", n_tasks: int = 5, mode: str = "class", seed: int = 0,
          val_fraction: float = 0.1, test_fraction: float = 0.2,
          class_order: Sequence[int] | None = None) -> Scenario:
    """Split a dataset's classes into ``n_tasks`` tasks of equal size (Split-Digits, Split-MNIST).

    ``mode="class"``: class-incremental; ``mode="task"``: task-incremental (logits masked to the
    task's classes). ``class_order`` (a permutation of the classes) sets which classes form which
    task; by default tasks take the classes in order, (0, 1), (2, 3), ... as in Split-MNIST
    (Zenke et al. 2017). ``seed`` fixes the stratified train/val/test split.
    """
    n_tasks, seed, val_fraction, test_fraction = _check_common(
        dataset, n_tasks, seed, val_fraction, test_fraction)
    if mode not in ("class", "task"):
        raise ValueError(f"mode: expected 'class' or 'task', got {mode!r}")
    x, y, parts = _splits(dataset, seed, val_fraction, test_fraction)
    classes = sorted(torch.unique(y).tolist())
    if class_order is None:
        order = classes
    else:
        order = [int(c) for c in class_order]
        if sorted(order) != classes:
            raise ValueError(f"class_order: expected a permutation of {classes}, got {list(class_order)}")
    if len(classes) % n_tasks:
        divisors = [d for d in range(1, len(classes) + 1) if len(classes) % d == 0]
        raise ValueError(f"n_tasks: expected a divisor of the {len(classes)} classes of "
                         f"{dataset!r} {tuple(divisors)}, got {n_tasks}")
    per = len(classes) // n_tasks
    tasks = []
    for t in range(n_tasks):
        cls = order[t * per:(t + 1) * per]
        member = torch.isin(y, torch.tensor(cls))
        sets = [datasets.subset(x, y, p[member[p]]) for p in parts]
        tasks.append(Task(t, list(cls), *sets))
    return Scenario(tasks, name=f"split-{dataset}-{mode}", mode=mode, n_classes=len(classes),
                    input_shape=tuple(x.shape[1:]), seed=seed)


def _domain_stream(dataset: str, n_tasks: int, seed: int, val_fraction: float,
                   test_fraction: float, transforms, name: str) -> Scenario:
    x, y, parts = _splits(dataset, seed, val_fraction, test_fraction)
    classes = sorted(torch.unique(y).tolist())
    tasks = []
    for t, f in enumerate(transforms):
        sets = [TensorDataset(f(x[p]).contiguous(), y[p].clone()) for p in parts]
        tasks.append(Task(t, list(classes), *sets))
    return Scenario(tasks, name=name, mode="domain", n_classes=len(classes),
                    input_shape=tuple(x.shape[1:]), seed=seed)


def permuted(dataset: str = "digits", n_tasks: int = 5, seed: int = 0,
             val_fraction: float = 0.1, test_fraction: float = 0.2) -> Scenario:
    """Permuted-Digits / Permuted-MNIST (Goodfellow et al. 2013; GEM, Lopez-Paz & Ranzato 2017).

    Task 0 shows the original images; task t > 0 applies one fixed random pixel permutation,
    drawn from ``seed``, to every image (train, val and test alike), as van de Ven et al. do.
    """
    n_tasks, seed, val_fraction, test_fraction = _check_common(
        dataset, n_tasks, seed, val_fraction, test_fraction)
    g = torch.Generator().manual_seed(seed)
    shape = datasets.load(dataset)[0].shape[1:]
    n_pix = math.prod(shape)
    perms = [torch.arange(n_pix)] + [torch.randperm(n_pix, generator=g) for _ in range(n_tasks - 1)]

    def permute(p: torch.Tensor):
        return lambda x: x.reshape(len(x), -1)[:, p].reshape(x.shape)

    return _domain_stream(dataset, n_tasks, seed, val_fraction, test_fraction,
                          [permute(p) for p in perms], f"permuted-{dataset}")


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate square images (N, C, H, W) counter-clockwise as displayed (row 0 on top) about the
    centre, like ``torch.rot90(x, 1, (2, 3))`` at 90 degrees; bilinear, zero fill."""
    if degrees == 0:
        return x.clone()
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotated(dataset: str = "digits", n_tasks: int = 5, seed: int = 0,
            angles: Sequence[float] | None = None, val_fraction: float = 0.1,
            test_fraction: float = 0.2) -> Scenario:
    """Rotated-Digits / Rotated-MNIST (GEM, Lopez-Paz & Ranzato 2017): task t rotates every image.

    ``angles`` (degrees, one per task) defaults to evenly spaced rotations 0, 180/n, ...,
    180(n-1)/n. GEM draws 20 random angles in [0, 180); fixed, spread angles make the
    stream's difficulty the same for every seed. ``seed`` fixes the train/val/test split.
    """
    n_tasks, seed, val_fraction, test_fraction = _check_common(
        dataset, n_tasks, seed, val_fraction, test_fraction)
    if angles is None:
        angles = [180.0 * t / n_tasks for t in range(n_tasks)]
    else:
        if isinstance(angles, (str, bytes)) or not isinstance(angles, Sequence):
            raise TypeError(f"angles: expected a sequence of {n_tasks} numbers, got {type(angles).__name__}")
        if len(angles) != n_tasks:
            raise ValueError(f"angles: expected one angle per task ({n_tasks}), got {len(angles)}")
        angles = [_checks.real(f"angles[{i}]", a) for i, a in enumerate(angles)]
    return _domain_stream(dataset, n_tasks, seed, val_fraction, test_fraction,
                          [lambda x, a=a: rotate(x, a) for a in angles], f"rotated-{dataset}")


# ---------------------------------------------------------------------------- SCoLe
def scole_probabilities(n_classes: int, entropy_decrease: float = 0.0, seed: int = 0) -> np.ndarray:
    """SCoLe's class distribution (Lesort et al. 2023, ``sampling.get_probability``).

    ``entropy_decrease == 0``: uniform. Otherwise ``p_c = 1/C - (1/C) c f`` (``f = 0.05`` for
    C = 10, else 0.01), normalised, raised to the power ``entropy_decrease`` and normalised
    again, then shuffled over classes by ``seed``: a few classes become frequent, the rest rare.
    """
    c = _checks.positive_int("n_classes", n_classes)
    ed = _checks.real("entropy_decrease", entropy_decrease, low=0.0)
    if ed == 0:
        return np.full(c, 1.0 / c)
    f = 0.05 if c == 10 else 0.01
    p = 1.0 / c - (1.0 / c) * np.arange(c) * f
    if (p <= 0).any():
        raise ValueError(f"n_classes: SCoLe's skew 1/C - c f/C turns non-positive for C = {c}")
    p = p / p.sum()
    p = p ** ed / (p ** ed).sum()
    np.random.RandomState(seed).shuffle(p)
    return p


def scole_classes(n_tasks: int, n_classes: int = 10, classes_per_task: int = 2, *, entropy_decrease: float = 0.0,
                  prob_reduction: float | None = None, forgetting_probe: bool = False,
                  seed: int = 0) -> list[list[int]]:
    """The classes of each task of a SCoLe stream (Lesort et al. 2023, ``sampling.get_classes``).

    Task t draws ``classes_per_task`` distinct classes with probabilities
    :func:`scole_probabilities` (so classes re-occur, hundreds of times in long streams).
    ``prob_reduction = r`` divides the drawn classes' probabilities by r afterwards
    (renormalised: recently seen classes become less likely). ``forgetting_probe``: from task
    ``t > n_tasks / 2`` on, classes are drawn only from the first ``n_classes // 2`` (the
    others are never seen again; their accuracy shows how forgetting proceeds).
    One seeded ``numpy`` stream drives the draws (the official code seeds numpy's global state).
    """
    t_n = _checks.positive_int("n_tasks", n_tasks)
    c = _checks.positive_int("n_classes", n_classes)
    k = _checks.positive_int("classes_per_task", classes_per_task)
    if k > c or (forgetting_probe and k > c // 2):
        raise ValueError(f"classes_per_task: expected at most {c // 2 if forgetting_probe else c} "
                         f"(the classes that can be drawn), got {k}")
    if prob_reduction is not None:
        prob_reduction = _checks.real("prob_reduction", prob_reduction, low=0.0, low_open=True)
    p = scole_probabilities(c, entropy_decrease, seed)
    rng = np.random.RandomState(seed)
    out = []
    for t in range(t_n):
        q = p.copy()
        if forgetting_probe and t > t_n / 2:
            q[c // 2:] = 0.0
        q = q / q.sum()
        cls = rng.choice(c, size=k, replace=False, p=q)
        out.append(sorted(int(v) for v in cls))
        if prob_reduction is not None:
            p[cls] /= prob_reduction
            p = p / p.sum()
    return out


def scole(dataset: str = "digits", n_tasks: int = 100, classes_per_task: int = 2, *, entropy_decrease: float = 0.0,
          prob_reduction: float | None = None, forgetting_probe: bool = False, seed: int = 0,
          val_fraction: float = 0.1, test_fraction: float = 0.2) -> Scenario:
    """A SCoLe stream (Lesort, Ostapenko, Rodriguez, Misra, Arefin, Charlin and Rish, "Challenging
    Common Assumptions about Catastrophic Forgetting and Knowledge Accumulation", CoLLAs 2023;
    official code ``TLESORT/SCoLe-SCaling-Continual-Learning``): long sequences (hundreds of tasks)
    of few classes each, drawn with re-occurrence by :func:`scole_classes`.

    Each task trains on every training example of its classes (class-incremental head, global
    labels). Every task's ``test`` split is the FULL test set of all classes, as SCoLe evaluates,
    and shares its tensors: evaluate it once per boundary with ``Trainer(eval_tasks="current")``.
    Train with per-minibatch logit masking (:class:`forgetcore.continual.LogitMask`) and,
    optionally, :class:`forgetcore.continual.SCoLeReplay`.
    """
    n_tasks, seed, val_fraction, test_fraction = _check_common(dataset, n_tasks, seed, val_fraction, test_fraction)
    x, y, (tr, va, te) = _splits(dataset, seed, val_fraction, test_fraction)
    n_classes = len(torch.unique(y))
    plan = scole_classes(n_tasks, n_classes, classes_per_task, entropy_decrease=entropy_decrease,
                         prob_reduction=prob_reduction, forgetting_probe=forgetting_probe, seed=seed)
    test = datasets.subset(x, y, te)
    by_class_tr = {c: datasets.subset(x, y, tr[y[tr] == c]) for c in range(n_classes)}
    by_class_va = {c: datasets.subset(x, y, va[y[va] == c]) for c in range(n_classes)}

    def union(parts: dict[int, TensorDataset], cls: list[int]) -> TensorDataset:
        return TensorDataset(torch.cat([parts[c].tensors[0] for c in cls]),
                             torch.cat([parts[c].tensors[1] for c in cls]))

    tasks = [Task(t, cls, union(by_class_tr, cls), union(by_class_va, cls), test) for t, cls in enumerate(plan)]
    name = f"scole-{dataset}-{n_tasks}x{classes_per_task}" + (f"-ed{entropy_decrease:g}" if entropy_decrease else "")
    return Scenario(tasks, name=name + ("-probe" if forgetting_probe else ""), mode="class",
                    n_classes=n_classes, input_shape=tuple(x.shape[1:]), seed=seed)
