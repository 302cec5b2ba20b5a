"""The training loop every continual method plugs into.

One loop, written out so it can be read top to bottom (``Trainer.fit``); a method changes it only
through plugin hooks, in the order they run::

    for each task t:
        before_task(ctx, task)          # e.g. freeze weights, snapshot the old model
        optimizer = make_optimizer(model)
        data = train_data(ctx, task)    # default: task.train (Joint: every task seen so far)
        for each epoch:
          order = batch_indices(ctx, task, epoch, n)  # default: a seeded permutation of range(n)
          for each mini-batch of order:
            batch = {"x", "y", "task", "n_stream"}
            batch = transform_batch(ctx, batch)       # ER appends replayed examples here
            output = model(batch["x"])                # masked to the task's classes in task-IL
            loss = loss(ctx, batch, output)           # default: cross-entropy
            loss.backward(); after_backward(ctx)      # gradient projection goes here
            optimizer.step(); after_step(ctx, batch)  # ER stores the stream part here
            every eval_every steps: accuracy on each seen task -> learning curves, after_eval
        after_task(ctx, task)           # e.g. GPM's bases from the finished task's data
        accuracy on every task -> row t of the accuracy matrix R, after_eval

A plugin is any object with some of these methods (subclass :class:`Plugin` for no-op
defaults and documentation). ``loss``, ``train_data`` and ``batch_indices`` replace the
default, so at most one plugin of a trainer may define each. Hooks run in the order the plugins
were given.

Reproducibility: batches are shuffled by a generator seeded from ``(seed, task, epoch)``; the
global torch RNG (dropout, plugins that use it) is seeded with ``seed`` when a fresh run starts
and saved in ``state_dict``. ``fit(scenario, max_steps=n)`` pauses after ``n`` optimisation
steps in all; ``state_dict()`` then captures model, optimiser, plugins, RNG and progress, and a
new trainer that loads it continues bit-identically to a run that never stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import _checks
from .scenarios import Scenario, Task

log = logging.getLogger(__name__)

Batch = dict[str, Any]

_HOOKS = ("before_task", "resume_task", "transform_batch", "after_backward", "after_step",
          "after_task", "after_eval")
_REPLACING = ("loss", "train_data", "batch_indices")  # replace the default: at most one plugin each


class Plugin:
    """Base class of continual methods: every hook is a no-op until overridden.

    Hooks (all optional; a plugin need not subclass this):

    - ``before_task(ctx, task)``: before the task's optimiser is built (``ctx.optimizer`` is
      still the previous task's, or None), so parameters frozen here stay out of it.
    - ``resume_task(ctx, task)``: instead of ``before_task`` when a paused run resumes inside a
      task. ``before_task``'s effects on the plugin's own attributes must be in its
      ``state_dict``; effects on the model that its ``state_dict`` does not hold (e.g.
      ``requires_grad``) are re-applied here.
    - ``transform_batch(ctx, batch) -> batch``: may add examples (append them after the first
      ``batch["n_stream"]`` rows, which are the stream's) or fields.
    - ``loss(ctx, batch, output) -> Tensor``: replaces cross-entropy (at most one plugin).
    - ``train_data(ctx, task) -> dict(x=, y=, task=)``: replaces ``task.train`` as the data
      of the task's epochs (at most one plugin; :class:`~forgetcore.continual.Joint` uses it).
    - ``batch_indices(ctx, task, epoch, n) -> LongTensor | list[LongTensor]``: which examples
      of the task's data (``n`` of them) form this epoch's mini-batches, replacing the seeded
      shuffle (at most one plugin). A 1-D tensor is cut into batches of ``batch_size``; a list
      of 1-D tensors gives each batch explicitly. Indices may repeat (View-Batch's repeats, a
      fixed number of general samples per batch, a rank's shard under DDP). Called at the
      start of every epoch and again when a paused run resumes inside one, so it must be a
      function of its arguments, ``ctx.seed`` and the plugin's ``state_dict`` (derive
      randomness from ``(ctx.seed, task.id, epoch)``, as the default does).
    - ``after_backward(ctx)``: gradients are in ``p.grad``; the optimiser has not stepped.
    - ``after_step(ctx, batch)``: after ``optimizer.step()``; ``batch`` is the transformed batch.
    - ``after_task(ctx, task)``: the task's training is done, its evaluation not yet.
    - ``after_eval(ctx, accuracies)``: ``accuracies`` maps task id -> accuracy;
      ``ctx.eval_kind`` is ``"initial"``, ``"curve"`` or ``"task_end"`` and ``ctx.eval_split``
      ``"test"`` or ``"val"``.
    - ``state_dict()`` / ``load_state_dict(state)``: tensors, numbers, strings, lists and dicts
      only, so ``torch.load(..., weights_only=True)`` reads them back.
    """

    def before_task(self, ctx: Context, task: Task) -> None:
        pass

    def resume_task(self, ctx: Context, task: Task) -> None:
        pass

    def transform_batch(self, ctx: Context, batch: Batch) -> Batch:
        return batch

    def after_backward(self, ctx: Context) -> None:
        pass

    def after_step(self, ctx: Context, batch: Batch) -> None:
        pass

    def after_task(self, ctx: Context, task: Task) -> None:
        pass

    def after_eval(self, ctx: Context, accuracies: dict[int, float]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class Context:
    """What the hooks see. ``step`` counts optimisation steps over the whole run,
    ``task_step`` those of the current task."""

    model: torch.nn.Module
    trainer: Trainer
    device: torch.device
    seed: int
    scenario: Scenario | None = None
    optimizer: torch.optim.Optimizer | None = None
    task: Task | None = None
    task_id: int = -1
    epoch: int = 0
    step: int = 0
    task_step: int = 0
    eval_kind: str = ""
    eval_split: str = "test"


def _epoch_generator(seed: int, task: int, epoch: int) -> torch.Generator:
    # Independent of everything that ran before, so a resumed run rebuilds the same order.
    s = int(np.random.SeedSequence([seed, task, epoch]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(s)


def _get_rng(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":  # dropout on the GPU draws from the device's generator
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _device(device: Any) -> torch.device:
    """A usable torch device (``"cuda"`` -> ``cuda:0``), or a ValueError naming ``device``."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a torch.device or a str, got {type(device).__name__}")
    try:
        return torch.empty(0, device=device).device
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ValueError(f"device: expected a usable torch device, got {device!r} ({e})") from None


def _fresh_progress() -> dict[str, Any]:
    return {"task": 0, "epoch": 0, "batch": 0, "step": 0, "task_step": 0, "in_task": False,
            "started": False,
            "scenario": "", "n_tasks": 0, "R": [], "R_val": [], "initial": [], "initial_val": [],
            "curves": {"step": [], "task": [], "acc": []},
            "timings": {"train_s": [], "eval_s": 0.0, "total_s": 0.0}}


class Trainer:
    """Train a model on a :class:`Scenario`, task after task, with plugins for the method.

    Args:
        model: a module mapping a batch of inputs (N, *scenario.input_shape) to logits
            (N, scenario.n_classes).
        make_optimizer: ``model -> torch.optim.Optimizer``, called at the start of every task
            after ``before_task`` (a fresh optimiser per task, as Avalanche and Mammoth do).
        plugins: the method (see :class:`Plugin`); none means naive fine-tuning.
        epochs: passes over each task's training data.
        batch_size: stream examples per step (plugins may add more, e.g. replay).
        seed: seeds batch order and the global torch RNG of a fresh run.
        device: where batches go; default the model's device (the model is moved there if given).
        progress: show a tqdm bar.
        eval_every: also evaluate every seen task every this many steps (learning curves;
            each task is also evaluated before its first step and after its last). None: only
            those two points.
        eval_val: also fill ``R_val`` from each task's ``.val`` split.
        eval_tasks: which tasks are evaluated, so that long streams (hundreds of tasks) are not
            evaluated on every task at every boundary: ``"all"`` (default; every task after
            each task, the seen ones at curve points), ``"seen"`` (tasks 0..t), ``"current"``
            (task t only), a list of task ids, or a callable ``t -> task ids``. Entries of
            ``R`` that were not evaluated are NaN.
        eval_batch_size: examples per forward pass at evaluation.
    """

    def __init__(self, model: torch.nn.Module,
                 make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
                 plugins: Iterable[Any] = (), *, epochs: int = 1, batch_size: int = 32,
                 seed: int = 0, device: torch.device | str | None = None, progress: bool = True,
                 eval_every: int | None = 10, eval_val: bool = False,
                 eval_batch_size: int = 1024,
                 eval_tasks: str | Sequence[int] | Callable[[int], Iterable[int]] = "all") -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(make_optimizer):
            raise TypeError(f"make_optimizer: expected a callable model -> optimizer, "
                            f"got {type(make_optimizer).__name__}")
        if isinstance(plugins, (str, bytes)) or not isinstance(plugins, Iterable):
            raise TypeError(f"plugins: expected a list of plugins, got {type(plugins).__name__}")
        self.plugins = list(plugins)
        for name in _REPLACING:
            owners = [type(p).__name__ for p in self.plugins if callable(getattr(p, name, None))]
            if len(owners) > 1:
                raise ValueError(f"plugins: at most one plugin may define {name}(), "
                                 f"got {len(owners)}: {', '.join(owners)}")
        self.epochs = _checks.positive_int("epochs", epochs)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.seed = _checks.seed(seed)
        self.eval_every = None if eval_every is None else _checks.positive_int("eval_every", eval_every)
        self.eval_batch_size = _checks.positive_int("eval_batch_size", eval_batch_size)
        for name, v in (("eval_val", eval_val), ("progress", progress)):
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
        self.eval_val = bool(eval_val)
        if isinstance(eval_tasks, str):
            if eval_tasks not in ("all", "seen", "current"):
                raise ValueError(f"eval_tasks: expected 'all', 'seen', 'current', a list of task ids "
                                 f"or a callable, got {eval_tasks!r}")
        elif not callable(eval_tasks):
            if not isinstance(eval_tasks, Iterable):
                raise TypeError(f"eval_tasks: expected 'all', 'seen', 'current', a list of task ids "
                                f"or a callable, got {type(eval_tasks).__name__}")
            eval_tasks = [_checks.positive_int("eval_tasks", j, allow_zero=True) for j in eval_tasks]
        self.eval_tasks = eval_tasks
        self.progress = bool(progress)
        if device is None:
            p = next(model.parameters(), None)
            self.device = p.device if p is not None else torch.device("cpu")
        else:
            self.device = _device(device)
            model.to(self.device)
        self.model = model
        self.make_optimizer = make_optimizer
        self._hooks = {h: [getattr(p, h) for p in self.plugins if callable(getattr(p, h, None))]
                       for h in (*_HOOKS, *_REPLACING)}
        self.ctx = Context(model=model, trainer=self, device=self.device, seed=self.seed)
        self._p = _fresh_progress()
        self._rng: dict[str, torch.Tensor] | None = None  # global RNGs to restore when fit resumes
        self._optim_state: dict | None = None       # optimiser state to restore when fit resumes
        self._masks: torch.Tensor | None = None

    # ------------------------------------------------------------------ hooks and helpers
    def _call(self, hook: str, *args: Any) -> None:
        for f in self._hooks[hook]:
            f(self.ctx, *args)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        opt = self.make_optimizer(self.model)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"make_optimizer: expected a function returning a "
                            f"torch.optim.Optimizer, got {type(opt).__name__}")
        return opt

    def _train_data(self, task: Task) -> dict[str, torch.Tensor]:
        if self._hooks["train_data"]:
            data = self._hooks["train_data"][0](self.ctx, task)
            missing = {"x", "y", "task"} - set(data)
            if missing:
                raise ValueError(f"train_data: expected a dict with keys x, y, task, "
                                 f"missing {sorted(missing)}")
            return data
        x, y = task.train.tensors
        return {"x": x, "y": y, "task": torch.full((len(y),), task.id, dtype=torch.long)}

    def _forward(self, x: torch.Tensor, task_ids: torch.Tensor, n_classes: int) -> torch.Tensor:
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.shape != (x.shape[0], n_classes):
            raise ValueError(f"model: expected output of shape (batch, n_classes) = "
                             f"({x.shape[0]}, {n_classes}), got {_checks.describe(out)}")
        if self._masks is not None:  # task-incremental: only the example's task's classes count
            out = out.masked_fill(~self._masks[task_ids], torch.finfo(out.dtype).min)
        return out

    @torch.no_grad()
    def evaluate(self, scenario: Scenario, task_ids: Sequence[int] | None = None,
                 split: str = "test") -> dict[int, float]:
        """Accuracy of the model on each task's ``split`` ("test" or "val"): {task id: accuracy}.

        Runs in eval mode (dropout, batch-norm) and restores the previous mode after.
        """
        if split not in ("test", "val"):
            raise ValueError(f"split: expected 'test' or 'val', got {split!r}")
        self._set_masks(scenario)
        ids = range(len(scenario)) if task_ids is None else task_ids
        was_training = self.model.training
        self.model.eval()
        accs = {}
        try:
            for j in ids:
                x, y = getattr(scenario[j], split).tensors
                if len(y) == 0:
                    accs[j] = float("nan")
                    continue
                # eval_shard = (rank, world), set by forgetcore.distributed.ShardBatches: each rank
                # scores every world-th example and the counts are summed (gathered) over ranks.
                r, w = getattr(self, "eval_shard", None) or (0, 1)
                x, n = x[r::w], len(y)
                y = y[r::w]
                correct = 0
                for s in range(0, len(y), self.eval_batch_size):
                    xb = x[s:s + self.eval_batch_size].to(self.device)
                    yb = y[s:s + self.eval_batch_size].to(self.device)
                    tb = torch.full_like(yb, j)
                    out = self._forward(xb, tb, scenario.n_classes)
                    correct += int((out.argmax(1) == yb).sum())
                if w > 1:
                    correct = self.eval_shard_sum(correct)  # type: ignore[attr-defined]
                accs[j] = correct / n
        finally:
            self.model.train(was_training)
        return accs

    def _set_masks(self, scenario: Scenario) -> None:
        if scenario.mode == "task":
            m = torch.zeros(len(scenario), scenario.n_classes, dtype=torch.bool)
            for t in scenario:
                m[t.id, t.classes] = True
            self._masks = m.to(self.device)
        else:
            self._masks = None

    def _eval_hook(self, kind: str, split: str, accs: dict[int, float]) -> None:
        self.ctx.eval_kind, self.ctx.eval_split = kind, split
        self._call("after_eval", accs)

    def _eval_ids(self, scenario: Scenario, t: int, kind: str) -> list[int]:
        """The task ids evaluated after task ``t`` (``kind="task_end"``) or during it ("curve")."""
        sel, n = self.eval_tasks, len(scenario)
        if sel == "all":
            ids: Iterable[int] = range(n) if kind == "task_end" else range(t + 1)
        elif sel == "seen":
            ids = range(t + 1)
        elif sel == "current":
            ids = [t]
        elif callable(sel):
            ids = sel(t)
        else:
            ids = sel
        out = sorted({int(j) for j in ids})
        bad = [j for j in out if not 0 <= j < n]
        if bad:
            raise ValueError(f"eval_tasks: task ids must lie in [0, {n}), got {bad}")
        return out

    def _curve_point(self, scenario: Scenario, t: int) -> None:
        t0 = time.perf_counter()
        accs = self.evaluate(scenario, self._eval_ids(scenario, t, "curve"))
        c = self._p["curves"]
        c["step"].append(self._p["step"])
        c["task"].append(t)
        c["acc"].append([accs.get(j) for j in range(len(scenario))])
        self._p["timings"]["eval_s"] += time.perf_counter() - t0
        self._eval_hook("curve", "test", accs)

    def _check_scenario(self, scenario: Scenario) -> None:
        if not isinstance(scenario, Scenario):
            raise TypeError(f"scenario: expected a forgetcore.continual.Scenario, "
                            f"got {type(scenario).__name__}")
        if len(scenario) == 0:
            raise ValueError("scenario: expected at least one task, got 0")
        for t in scenario:
            if len(t.train) == 0 or len(t.test) == 0:
                raise ValueError(f"scenario: task {t.id} has an empty train or test set")
        p = self._p
        if p["started"] and (p["scenario"], p["n_tasks"]) != (scenario.name, len(scenario)):
            raise ValueError(f"scenario: this trainer's run is on {p['scenario']!r} with "
                             f"{p['n_tasks']} tasks, got {scenario.name!r} with {len(scenario)}")

    # ------------------------------------------------------------------ the loop
    def fit(self, scenario: Scenario, max_steps: int | None = None) -> dict[str, Any]:
        """Train on every task of ``scenario`` in order; return the results so far.

        ``max_steps``: pause once this many optimisation steps have run in all (the run resumes
        from ``state_dict()``, or by calling ``fit`` again). A pause that falls on a task's last
        step completes that task first (``after_task`` and its evaluation row), so its state is
        at the task boundary; only such a state may resume on another world size
        (:class:`forgetcore.distributed.ShardBatches`). Returns a dict:

        - ``R``: list of rows, ``R[i][j]`` = test accuracy on task j after training task i
          (every task, seen or not, so forward transfer can be computed); ``R_val`` the same
          on ``.val`` when ``eval_val``.
        - ``initial``: test accuracy on each task before any training (the ``b`` of
          :func:`forgetcore.evaluation.continual.forward_transfer` when the model starts
          randomly initialised); ``initial_val`` likewise.
        - ``curves``: ``step`` (optimisation steps done), ``task`` (the task being trained),
          ``acc`` (per task, None for tasks not yet seen): accuracy on each seen task before each
          task's first step, every ``eval_every`` steps and after each task's last step.
        - ``timings``: ``train_s`` per task, ``eval_s``, ``total_s`` (seconds).
        - ``steps``, ``finished``, ``scenario``, ``mode``.
        """
        self._check_scenario(scenario)
        if max_steps is not None:
            max_steps = _checks.positive_int("max_steps", max_steps)
        p, ctx = self._p, self.ctx
        t_start = time.perf_counter()
        ctx.scenario = scenario
        self._set_masks(scenario)
        if not p["started"]:
            t0 = time.perf_counter()
            ids = self._eval_ids(scenario, 0, "task_end")  # also checks the model's output
            initial = self._row(scenario, self.evaluate(scenario, ids))
            initial_val = self._row(scenario, self.evaluate(scenario, ids, split="val")) if self.eval_val else []
            p.update(started=True, scenario=scenario.name, n_tasks=len(scenario),
                     initial=initial, initial_val=initial_val)
            torch.manual_seed(self.seed)
            p["timings"]["eval_s"] += time.perf_counter() - t0
            self._eval_hook("initial", "test", {j: p["initial"][j] for j in ids})
        elif self._rng is not None:
            _set_rng(self._rng, self.device)
        if max_steps is not None and p["step"] >= max_steps:
            return self._result(scenario, finished=False)
        bar = tqdm(total=0, desc=scenario.name, unit="step", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        try:
            paused = self._run(scenario, max_steps, bar)
        finally:
            bar.close()
        self._rng = _get_rng(self.device)
        p["timings"]["total_s"] += time.perf_counter() - t_start
        return self._result(scenario, finished=not paused)

    def _run(self, scenario: Scenario, max_steps: int | None, bar: tqdm) -> bool:
        p, ctx, model = self._p, self.ctx, self.model
        while p["task"] < len(scenario):
            t = p["task"]
            task = scenario[t]
            ctx.task, ctx.task_id = task, t
            t_task, eval_before = time.perf_counter(), p["timings"]["eval_s"]
            if p["in_task"]:  # resuming a paused run inside this task
                ctx.epoch, ctx.task_step = p["epoch"], p["task_step"]
                self._call("resume_task", task)
                ctx.optimizer = self._build_optimizer()
                if self._optim_state is not None:
                    _check_optimizer_fits(ctx.optimizer, self._optim_state)
                    ctx.optimizer.load_state_dict(self._optim_state)
                    self._optim_state = None
            else:
                ctx.epoch = ctx.task_step = 0
                self._call("before_task", task)
                ctx.optimizer = self._build_optimizer()
                p.update(in_task=True, epoch=0, batch=0, task_step=0)
                p["timings"]["train_s"].append(0.0)
                self._curve_point(scenario, t)  # the pre-update point (x = -1 in De Lange et al.)
            data = self._train_data(task)
            n = len(data["y"])
            bar.set_description(f"{scenario.name} task {t + 1}/{len(scenario)}")
            model.train()
            for epoch in range(p["epoch"], self.epochs):
                ctx.epoch = p["epoch"] = epoch
                batches = self._batches(task, epoch, n)
                if p["batch"] > len(batches):  # only a resumed epoch starts past 0
                    raise ValueError(f"state['progress']['batch']: the run was paused after batch {p['batch']} "
                                     f"of task {t}, epoch {epoch}, which has {len(batches)} batches")
                bar.total += len(batches) - p["batch"]
                for b in range(p["batch"], len(batches)):
                    self._step(scenario, data, batches[b])
                    p["batch"] = b + 1
                    p["task_step"] += 1
                    ctx.task_step = p["task_step"]
                    bar.update(1)
                    last = epoch == self.epochs - 1 and b == len(batches) - 1  # the task-end row follows
                    if self.eval_every is not None and p["step"] % self.eval_every == 0 and not last:
                        self._curve_point(scenario, t)
                    # A pause on a task's last step first completes the task (after_task and its
                    # evaluation), so the saved state sits at the task boundary: no optimiser
                    # state, and it may resume on another world size (ShardBatches).
                    if max_steps is not None and p["step"] >= max_steps and not last:
                        self._add_train_time(t, t_task, eval_before)
                        self._optim_state = ctx.optimizer.state_dict()
                        return True
                p["batch"] = 0
            self._call("after_task", task)
            self._add_train_time(t, t_task, eval_before)
            self._end_task(scenario, t)
            p.update(task=t + 1, epoch=0, batch=0, task_step=0, in_task=False)
            if max_steps is not None and p["step"] >= max_steps and p["task"] < len(scenario):
                return True
        return False

    def _batches(self, task: Task, epoch: int, n: int) -> list[torch.Tensor]:
        """This epoch's mini-batches: index tensors into the task's data."""
        if not self._hooks["batch_indices"]:
            order = torch.randperm(n, generator=_epoch_generator(self.seed, task.id, epoch))
            return list(order.split(self.batch_size))
        got = self._hooks["batch_indices"][0](self.ctx, task, epoch, n)
        parts = list(got.split(self.batch_size)) if isinstance(got, torch.Tensor) else list(got)
        for i, idx in enumerate(parts):
            if (not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.numel() == 0
                    or idx.dtype not in (torch.int64, torch.int32)):
                raise ValueError(f"batch_indices: expected a 1-D integer tensor or a list of non-empty "
                                 f"1-D integer tensors, got {_checks.describe(idx)} for batch {i}")
            if int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ValueError(f"batch_indices: indices must lie in [0, {n}) (the task's data), "
                                 f"got [{int(idx.min())}, {int(idx.max())}] in batch {i}")
        if not parts:
            raise ValueError(f"batch_indices: returned no batches for task {task.id}, epoch {epoch}")
        return [idx.long() for idx in parts]

    def _add_train_time(self, t: int, since: float, eval_before: float) -> None:
        tm = self._p["timings"]  # wall time of the task minus its evaluations
        tm["train_s"][t] += time.perf_counter() - since - (tm["eval_s"] - eval_before)

    def _step(self, scenario: Scenario, data: dict[str, torch.Tensor], idx: torch.Tensor) -> None:
        p, ctx = self._p, self.ctx
        batch: Batch = {k: data[k][idx].to(self.device) for k in ("x", "y", "task")}
        batch["n_stream"] = len(idx)
        for f in self._hooks["transform_batch"]:
            batch = f(ctx, batch)
        out = self._forward(batch["x"], batch["task"], scenario.n_classes)
        if self._hooks["loss"]:
            loss = self._hooks["loss"][0](ctx, batch, out)
        else:
            loss = F.cross_entropy(out, batch["y"])
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"loss: expected a scalar tensor, got {_checks.describe(loss)}")
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"loss: expected a finite value, got {float(loss.detach())} at step "
                             f"{p['step']} (task {ctx.task_id}); lower the learning rate?")
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._call("after_backward")
        ctx.optimizer.step()
        p["step"] += 1
        ctx.step = p["step"]
        self._call("after_step", batch)

    def _end_task(self, scenario: Scenario, t: int) -> None:
        p = self._p
        t0 = time.perf_counter()
        ids = self._eval_ids(scenario, t, "task_end")
        row = self.evaluate(scenario, ids)
        p["R"].append(self._row(scenario, row))
        c = p["curves"]
        c["step"].append(p["step"])
        c["task"].append(t)
        c["acc"].append([row[j] if j <= t and j in row else None for j in range(len(scenario))])
        if self.eval_val:
            p["R_val"].append(self._row(scenario, self.evaluate(scenario, ids, split="val")))
        p["timings"]["eval_s"] += time.perf_counter() - t0
        log.info("%s: after task %d, accuracy on tasks 0..%d: %s", scenario.name, t, t,
                 " ".join(f"{a:.3f}" for a in p["R"][-1][:t + 1]))
        self._eval_hook("task_end", "test", row)
        if self.eval_val:
            self._eval_hook("task_end", "val", {j: p["R_val"][-1][j] for j in ids})

    @staticmethod
    def _row(scenario: Scenario, accs: dict[int, float]) -> list[float]:
        return [accs.get(j, float("nan")) for j in range(len(scenario))]

    def _result(self, scenario: Scenario, finished: bool) -> dict[str, Any]:
        p = self._p
        out = {
            "R": [list(r) for r in p["R"]], "initial": list(p["initial"]),
            "curves": {k: [list(v) if isinstance(v, list) else v for v in vs]
                       for k, vs in p["curves"].items()},
            "timings": {"train_s": list(p["timings"]["train_s"]),
                        "eval_s": p["timings"]["eval_s"], "total_s": p["timings"]["total_s"]},
            "steps": p["step"], "finished": finished, "scenario": scenario.name,
            "mode": scenario.mode,
        }
        if self.eval_val:
            out["R_val"] = [list(r) for r in p["R_val"]]
            out["initial_val"] = list(p["initial_val"])
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Model, optimiser (when paused inside a task), plugins, global RNG and progress.

        Call it between ``fit`` calls (after a pause or the end). Everything is tensors,
        numbers, strings, lists and dicts, so ``torch.load(..., weights_only=True)`` reads it.
        """
        opt = self._optim_state
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": opt if opt is not None else {},
            "plugins": [p.state_dict() if callable(getattr(p, "state_dict", None)) else {}
                        for p in self.plugins],
            "rng": {k: v.clone() for k, v in (self._rng or _get_rng(self.device)).items()},
            "progress": _copy(self._p),
            "config": self._config(),
        }

    def _config(self) -> dict[str, int]:
        # What the saved position means: resuming under other values would not continue the run.
        return {"seed": self.seed, "epochs": self.epochs, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the next ``fit`` continues from there.

        Transactional: what the trainer holds itself (configuration, progress, global RNG,
        every model tensor, the optimiser's per-parameter state) is validated whole before
        anything is applied, as strictly as constructor arguments. Plugins are then loaded in
        order; if one refuses its state, the plugins loaded before it get their previous state
        back (forgetcore's plugins validate their whole state before applying any of it), so a
        state that fails leaves model, plugins and trainer exactly as they were.
        """
        _checks.state_mapping("state", state, ("model", "optimizer", "plugins", "rng", "progress", "config"))
        config = state["config"]
        if not isinstance(config, dict) or dict(config) != self._config():
            raise ValueError(f"state['config']: saved by a trainer with {config}, this one has {self._config()}")
        plugin_states = state["plugins"]
        if not isinstance(plugin_states, (list, tuple)):
            raise TypeError(f"state['plugins']: expected a list, got {type(plugin_states).__name__}")
        if len(plugin_states) != len(self.plugins):
            raise ValueError(f"state['plugins']: saved with {len(plugin_states)} plugins, "
                             f"this trainer has {len(self.plugins)}")
        model_state = self._check_model_state(state["model"])
        progress = self._check_progress(state["progress"])
        optim = self._check_optim_state(state["optimizer"], progress["in_task"])
        rng = self._check_rng(state["rng"])
        loaded: list[tuple[Any, Any]] = []
        try:
            for i, (plugin, ps) in enumerate(zip(self.plugins, plugin_states)):
                if not callable(getattr(plugin, "load_state_dict", None)):
                    continue
                before = _clone(plugin.state_dict()) if callable(getattr(plugin, "state_dict", None)) else None
                try:
                    plugin.load_state_dict(ps)
                except (ValueError, TypeError) as e:
                    raise type(e)(f"state['plugins'][{i}] ({type(plugin).__name__}): {e}") from e
                except (KeyError, IndexError, AttributeError) as e:  # a third-party plugin's own check
                    raise ValueError(f"state['plugins'][{i}] ({type(plugin).__name__}): "
                                     f"{type(e).__name__}: {e}") from e
                loaded.append((plugin, before))
        except BaseException:
            for plugin, before in reversed(loaded):  # roll back the plugins already loaded
                if before is not None:
                    plugin.load_state_dict(before)
            raise
        self.model.load_state_dict(model_state)  # validated above: keys, dtypes, shapes
        self._optim_state = optim
        self._rng = rng
        self._p = progress
        self.ctx.step = self._p["step"]

    # ---- validation of a loaded state (nothing is applied here)
    def _check_model_state(self, st: Any) -> dict[str, torch.Tensor]:
        _checks.state_mapping("state['model']", st)
        own = self.model.state_dict()
        for k in own:
            if k not in st:
                raise ValueError(f"state['model'][{k!r}]: missing from the state dict")
        params = {k for k, _ in self.model.named_parameters()}
        for k, v in st.items():
            name = f"state['model'][{k!r}]"
            if k not in own:
                raise ValueError(f"{name}: not an entry of this model's state_dict")
            _checks.tensor(name, v, dtype=own[k].dtype, shape=tuple(own[k].shape))
            if k in params:  # buffers may hold inf by design (e.g. an attention mask)
                _checks.finite(name, v)
        return dict(st)

    def _check_optim_state(self, st: Any, in_task: bool) -> dict | None:
        """The saved optimiser state ({} at a task boundary): its structure, and per-parameter
        tensors whose shapes match, in order, parameters of the model (the optimiser may hold a
        subset, e.g. without frozen ones); checked exactly against the optimiser when it resumes."""
        _checks.state_mapping("state['optimizer']", st)
        if not st:
            if in_task:
                raise ValueError("state['optimizer']: empty, but the run is paused inside a task "
                                 "(state['progress']['in_task']), which needs the optimiser's state")
            return None
        _checks.state_mapping("state['optimizer']", st, ("state", "param_groups"))
        groups, per = st["param_groups"], st["state"]
        if not isinstance(groups, (list, tuple)) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups):
            raise ValueError("state['optimizer']['param_groups']: expected a list of dicts with 'params'")
        if not isinstance(per, dict):
            raise TypeError(f"state['optimizer']['state']: expected a dict, got {type(per).__name__}")
        ids = [i for g in groups for i in g["params"]]
        if len(set(ids)) != len(ids) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"state['optimizer']['param_groups']: expected distinct int parameter ids, got {ids}")
        shapes = [p.shape for p in self.model.parameters()]
        if len(ids) > len(shapes):
            raise ValueError(f"state['optimizer']['param_groups']: {len(ids)} parameters, "
                             f"the model has {len(shapes)}")
        unknown = [k for k in per if k not in set(ids)]
        if unknown:
            raise ValueError(f"state['optimizer']['state']: state for parameter ids {unknown} "
                             f"that no param group lists")
        j = 0
        for i in ids:
            entry = per.get(i, {})
            if not isinstance(entry, dict):
                raise TypeError(f"state['optimizer']['state'][{i}]: expected a dict, got {type(entry).__name__}")
            tensors = [v for v in entry.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
            for v in tensors:
                _checks.finite(f"state['optimizer']['state'][{i}]", v)
            want = tensors[0].shape if tensors else None
            if any(v.shape != want for v in tensors):
                raise ValueError(f"state['optimizer']['state'][{i}]: tensors of different shapes "
                                 f"{[tuple(v.shape) for v in tensors]}")
            while j < len(shapes) and want is not None and shapes[j] != want:
                j += 1
            if j == len(shapes):
                raise ValueError(f"state['optimizer']['state'][{i}]: shape {tuple(want)} matches no "
                                 f"parameter of the model (in order)")
            j += 1
        return _clone(dict(st))

    def _check_rng(self, st: Any) -> dict[str, torch.Tensor]:
        _checks.state_mapping("state['rng']", st, ("cpu",))
        extra = [k for k in st if k not in ("cpu", "cuda")]
        if extra:
            raise ValueError(f"state['rng'][{extra[0]!r}]: not a generator the trainer saves (cpu, cuda)")
        _checks.tensor("state['rng']['cpu']", st["cpu"], dtype=torch.uint8, shape=tuple(torch.get_rng_state().shape))
        if "cuda" in st:
            _checks.tensor("state['rng']['cuda']", st["cuda"], dtype=torch.uint8, ndim=1)
            if self.device.type == "cuda":
                want = tuple(torch.cuda.get_rng_state(self.device).shape)
                _checks.tensor("state['rng']['cuda']", st["cuda"], shape=want)
        return {k: v.clone() for k, v in st.items()}

    def _check_progress(self, st: Any) -> dict[str, Any]:
        fresh = _fresh_progress()
        _checks.state_mapping("state['progress']", st, tuple(fresh))
        extra = [k for k in st if k not in fresh]
        if extra:
            raise ValueError(f"state['progress'][{extra[0]!r}]: not a progress entry of this trainer")
        n = "state['progress']"
        started = _bool(f"{n}['started']", st["started"])
        in_task = _bool(f"{n}['in_task']", st["in_task"])
        n_tasks = _checks.state_int(f"{n}['n_tasks']", st["n_tasks"])
        task = _checks.state_int(f"{n}['task']", st["task"], high=n_tasks - 1 if in_task else n_tasks)
        _checks.state_int(f"{n}['epoch']", st["epoch"], high=self.epochs - 1)
        _checks.state_int(f"{n}['batch']", st["batch"])
        step = _checks.state_int(f"{n}['step']", st["step"])
        _checks.state_int(f"{n}['task_step']", st["task_step"], high=step)
        if not isinstance(st["scenario"], str):
            raise TypeError(f"{n}['scenario']: expected a str, got {type(st['scenario']).__name__}")
        if not started and (task or step or in_task or n_tasks):
            raise ValueError(f"{n}['started']: False, but the progress records tasks or steps")
        for key, lengths in (("R", (task,)), ("R_val", (0, task)), ("initial", (n_tasks if started else 0,)),
                             ("initial_val", (0, n_tasks))):
            rows = st[key]
            if not isinstance(rows, list) or len(rows) not in lengths:
                got = len(rows) if isinstance(rows, list) else type(rows).__name__
                raise ValueError(f"{n}[{key!r}]: expected a list of length {' or '.join(map(str, lengths))}, got {got}")
        for key in ("R", "R_val"):
            for row in st[key]:
                if not isinstance(row, list) or len(row) != n_tasks:
                    raise ValueError(f"{n}[{key!r}]: expected rows of {n_tasks} accuracies")
        curves = _checks.state_mapping(f"{n}['curves']", st["curves"], ("step", "task", "acc"))
        if not all(isinstance(curves[k], list) for k in ("step", "task", "acc")) or not (
                len(curves["step"]) == len(curves["task"]) == len(curves["acc"])):
            raise ValueError(f"{n}['curves']: expected lists 'step', 'task', 'acc' of one length")
        tm = _checks.state_mapping(f"{n}['timings']", st["timings"], ("train_s", "eval_s", "total_s"))
        if not isinstance(tm["train_s"], list) or len(tm["train_s"]) != task + int(in_task):
            raise ValueError(f"{n}['timings']['train_s']: expected one entry per task begun ({task + int(in_task)})")
        for k in ("eval_s", "total_s"):
            _checks.real(f"{n}['timings'][{k!r}]", tm[k], low=0.0)
        return _copy(dict(st))


def _check_optimizer_fits(opt: torch.optim.Optimizer, saved: dict) -> None:
    """The saved optimiser state against the optimiser it resumes into: same groups, and each
    per-parameter tensor of its parameter's shape (torch's own load checks only the counts)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if [len(g["params"]) for g in opt.param_groups] != [len(g["params"]) for g in saved["param_groups"]]:
        raise ValueError(f"state['optimizer']: saved for param groups of sizes "
                         f"{[len(g['params']) for g in saved['param_groups']]}, the optimiser has "
                         f"{[len(g['params']) for g in opt.param_groups]}")
    for p, i in zip(params, ids):
        for k, v in saved["state"].get(i, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"state['optimizer']['state'][{i}][{k!r}]: expected shape {tuple(p.shape)} "
                                 f"like its parameter, got {tuple(v.shape)}")


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


def _clone(obj: Any) -> Any:
    """Deep copy of a nested state (tensors cloned), so a snapshot never aliases live state."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _copy(obj: Any) -> Any:
    """Deep copy of nested lists/dicts of plain values (progress must not alias saved state)."""
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    return obj
