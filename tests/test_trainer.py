"""Trainer: hook order and contracts, task-IL masking, exact resume, results, bad input."""

import io
import math

import pytest
import torch

from forgetcore.continual import ER, Finetune, Joint, Plugin, Scenario, Trainer, scenarios


@pytest.fixture(scope="module")
def split5():
    return scenarios.split("digits", n_tasks=5, mode="class", seed=0)


def first(scenario, k):
    """The first k tasks of a scenario, as a scenario (short runs)."""
    return Scenario(scenario.tasks[:k], name=f"{scenario.name}[:{k}]", mode=scenario.mode,
                    n_classes=scenario.n_classes, input_shape=scenario.input_shape, seed=scenario.seed)


def mlp(hidden=32, dropout=0.0, seed=0, out=10):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Dropout(dropout), torch.nn.Linear(hidden, out))


def sgd(lr=0.05, momentum=0.0):
    return lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr, momentum=momentum)


def trainer(model, plugins=(), **kw):
    kw = {"epochs": 1, "batch_size": 32, "seed": 0, "progress": False, "eval_every": None, **kw}
    return Trainer(model, kw.pop("make_optimizer", sgd()), list(plugins), **kw)


class Recorder(Plugin):
    def __init__(self):
        self.log = []

    def before_task(self, ctx, task):
        self.log.append(("before_task", task.id))

    def transform_batch(self, ctx, batch):
        self.log.append(("transform_batch", ctx.task_id))
        return batch

    def after_backward(self, ctx):
        assert all(p.grad is not None for p in ctx.model.parameters())
        self.log.append(("after_backward", ctx.task_id))

    def after_step(self, ctx, batch):
        self.log.append(("after_step", ctx.step))

    def after_task(self, ctx, task):
        self.log.append(("after_task", task.id))

    def after_eval(self, ctx, accuracies):
        self.log.append(("after_eval", ctx.eval_kind, tuple(sorted(accuracies))))


def test_hook_order(split5):
    s = first(split5, 2)  # 252 and 252 training images: 2 batches of 128 per task
    rec = Recorder()
    r = trainer(mlp(), [rec], batch_size=128, eval_every=1).fit(s)
    step = [("transform_batch", 0), ("after_backward", 0)]
    want = [("after_eval", "initial", (0, 1)),
            ("before_task", 0), ("after_eval", "curve", (0,)),
            *step, ("after_step", 1), ("after_eval", "curve", (0,)), *step, ("after_step", 2),
            ("after_task", 0), ("after_eval", "task_end", (0, 1)),
            ("before_task", 1), ("after_eval", "curve", (0, 1))]
    assert rec.log[:len(want)] == want
    assert rec.log[-2:] == [("after_task", 1), ("after_eval", "task_end", (0, 1))]
    assert r["steps"] == 4 and r["curves"]["step"] == [0, 1, 2, 2, 3, 4]
    assert r["curves"]["task"] == [0, 0, 0, 1, 1, 1]
    assert r["curves"]["acc"][0][1] is None and r["curves"]["acc"][-1][1] is not None


def test_optimizer_is_built_after_before_task(split5):
    seen = []

    class Freeze(Plugin):
        def before_task(self, ctx, task):
            ctx.model[1].weight.requires_grad_(task.id == 0)  # freeze the first layer from task 1
            self.w = ctx.model[1].weight.detach().clone()

    def make(model):
        seen.append(model[1].weight.requires_grad)
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)

    model = mlp()
    w0 = model[1].weight.detach().clone()
    freeze = Freeze()
    trainer(model, [freeze], make_optimizer=make).fit(first(split5, 2))
    assert seen == [True, False]
    assert torch.equal(model[1].weight, freeze.w) and not torch.equal(freeze.w, w0)


def test_after_backward_can_project_gradients(split5):
    class NoLast(Plugin):  # project the last layer's gradient to zero
        def after_backward(self, ctx):
            for p in ctx.model[4].parameters():
                p.grad.zero_()

    model = mlp()
    last = [p.detach().clone() for p in model[4].parameters()]
    first_w = model[1].weight.detach().clone()
    trainer(model, [NoLast()]).fit(first(split5, 2))
    assert all(torch.equal(p, q) for p, q in zip(model[4].parameters(), last))
    assert not torch.equal(model[1].weight, first_w)


def test_transform_batch_fields_reach_the_loss_and_task_mode_masks(split5):
    s = scenarios.split("digits", n_tasks=5, mode="task", seed=0)
    calls = []

    class Weighted(Plugin):
        def transform_batch(self, ctx, batch):
            return {**batch, "w": torch.full_like(batch["y"], 2.0, dtype=torch.float32)}

    class Loss:
        def loss(self, ctx, batch, output):
            lo = torch.finfo(output.dtype).min
            allowed = torch.zeros(10, dtype=torch.bool)
            allowed[ctx.task.classes] = True
            calls.append(bool((output[:, ~allowed] == lo).all()) and bool((output[:, allowed] > lo).all()))
            ce = torch.nn.functional.cross_entropy(output, batch["y"], reduction="none")
            return (batch["w"] * ce).mean()

    model = mlp()
    tr = trainer(model, [Weighted(), Loss()])
    r = tr.fit(first(s, 2))
    assert calls and all(calls)
    # evaluation masks too: accuracy = argmax over the task's own classes
    x, y = s[1].test.tensors
    with torch.no_grad():
        pred = torch.tensor(s[1].classes)[model(x)[:, s[1].classes].argmax(1)]
    assert r["R"][1][1] == pytest.approx(float((pred == y).float().mean()))


def test_finetune_is_the_plain_loop_and_results_are_complete(split5):
    a = trainer(mlp(), [Finetune()], eval_every=5, eval_val=True).fit(split5)
    b = trainer(mlp(), [], eval_every=5, eval_val=True).fit(split5)
    assert a["R"] == b["R"] and a["curves"] == b["curves"]
    T = len(split5)
    assert len(a["R"]) == T and all(len(row) == T for row in a["R"])
    assert len(a["R_val"]) == T and len(a["initial"]) == T and len(a["initial_val"]) == T
    assert all(0.0 <= v <= 1.0 for row in a["R"] for v in row)
    assert a["steps"] == sum(math.ceil(len(t.train) / 32) for t in split5)
    assert a["finished"] and a["scenario"] == "split-digits-class" and a["mode"] == "class"
    assert len(a["timings"]["train_s"]) == T and a["timings"]["total_s"] > 0
    assert a["R"][0][0] > 0.9 and a["R"][-1][0] < 0.2  # learned task 0, then forgot it


def test_joint_trains_on_every_task_seen_so_far(split5):
    s = first(split5, 3)
    r = trainer(mlp(), [Joint()], epochs=3).fit(s)
    sizes = [len(t.train) for t in s]
    assert r["steps"] == 3 * sum(math.ceil(sum(sizes[: t + 1]) / 32) for t in range(3))
    assert min(r["R"][-1]) > 0.5  # kept the old classes


def test_evaluate_restores_mode(split5):
    model = mlp(dropout=0.5)
    tr = trainer(model)
    model.train()
    a = tr.evaluate(split5, [0, 1])
    assert model.training and set(a) == {0, 1}
    model.eval()
    assert tr.evaluate(split5, [0], split="val") and not model.training
    with pytest.raises(ValueError, match="^split: expected 'test' or 'val'"):
        tr.evaluate(split5, split="train")


class Counter(Plugin):
    """A stateful plugin that also uses the global RNG, to test that resume restores both."""

    def __init__(self):
        self.n, self.acc = 0, torch.zeros(3)

    def after_step(self, ctx, batch):
        self.n += len(batch["y"])
        self.acc += torch.rand(3)

    def state_dict(self):
        return {"n": self.n, "acc": self.acc.clone()}

    def load_state_dict(self, state):
        self.n, self.acc = state["n"], state["acc"].clone()


def _resume_case(split5, plugin, pause):
    s = first(split5, 3)

    def make(seed):
        model = mlp(dropout=0.3, seed=seed)  # dropout draws from the global RNG
        return model, trainer(model, [plugin()], epochs=2, seed=7, eval_every=5,
                              make_optimizer=sgd(momentum=0.9))

    model_a, full = make(0)
    ra = full.fit(s)
    model_b, part = make(0)
    rb = part.fit(s, max_steps=pause)
    assert not rb["finished"] and rb["steps"] == pause
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.rand(100)  # disturb the global RNG: the resumed run must not depend on it
    model_c, resumed = make(1)  # a different initialisation, overwritten by the state
    resumed.load_state_dict(state)
    rc = resumed.fit(s)
    assert rc["finished"] and rc["R"] == ra["R"] and rc["curves"] == ra["curves"]
    assert rc["steps"] == ra["steps"]
    for p, q in zip(model_a.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(p, q)
    return full.plugins[0], resumed.plugins[0], ra, part, s


@pytest.mark.parametrize("pause", [5, 16, 17])  # mid-epoch; last step of task 0; first of task 1
def test_resume_is_bit_identical(split5, pause):
    a, c, ra, part, s = _resume_case(split5, Counter, pause)
    assert a.n == c.n and torch.equal(a.acc, c.acc)
    # the paused trainer itself also continues exactly
    assert part.fit(s)["R"] == ra["R"]


def test_resume_with_er_is_bit_identical(split5):
    a, c, *_ = _resume_case(split5, lambda: ER(50, seed=3), 21)
    assert a.buffer.seen == c.buffer.seen and len(a.buffer) == len(c.buffer) == 50
    sa, sc = a.buffer.sample(50), c.buffer.sample(50)  # same contents, same sampler state
    assert all(torch.equal(sa[k], sc[k]) for k in ("x", "y", "task"))


def test_er_replays_and_stores_only_the_stream(split5):
    s = first(split5, 2)
    sizes = []

    class Probe(Plugin):
        def after_step(self, ctx, batch):
            sizes.append((batch["n_stream"], len(batch["y"])))

    er = ER(100, batch_size=5, seed=0)
    trainer(mlp(), [er, Probe()], epochs=2).fit(s)
    assert sizes[0] == (32, 32)  # empty memory: the stream batch alone
    assert all(total == n + 5 for n, total in sizes[1:])
    assert er.buffer.seen == 2 * sum(len(t.train) for t in s) and len(er.buffer) == 100
    with pytest.raises(ValueError, match="^capacity:"):
        ER(0)
    with pytest.raises(ValueError, match="^batch_size:"):
        ER(10, batch_size=0)


def test_er_task_mode_keeps_each_example_task(split5):
    s = first(scenarios.split("digits", n_tasks=5, mode="task", seed=0), 2)
    er = ER(64, seed=0)
    r = trainer(mlp(), [er]).fit(s)
    mem = er.buffer.sample(64)
    assert set(mem["task"].tolist()) == {0, 1}
    for t in (0, 1):  # every stored example's label belongs to its stored task
        assert set(mem["y"][mem["task"] == t].tolist()) <= set(s[t].classes)
    assert r["R"][-1][0] > 0.8


class L1:
    def loss(self, ctx, batch, output):
        return output.abs().mean()


class L2(L1):
    pass


@pytest.mark.parametrize("make,match,exc", [
    (lambda: Trainer("mlp", sgd()), "^model: expected a torch.nn.Module, got str", TypeError),
    (lambda: Trainer(mlp(), "sgd"), "^make_optimizer: expected a callable", TypeError),
    (lambda: Trainer(mlp(), sgd(), Finetune()), "^plugins: expected a list", TypeError),
    (lambda: Trainer(mlp(), sgd(), [L1(), L2()]), r"^plugins: at most one plugin may define loss\(\), got 2: L1, L2",
     ValueError),
    (lambda: Trainer(mlp(), sgd(), [Joint(), Joint()]), r"^plugins: at most one plugin may define train_data\(\)",
     ValueError),
    (lambda: Trainer(mlp(), sgd(), epochs=0), "^epochs: expected an int >= 1, got 0", ValueError),
    (lambda: Trainer(mlp(), sgd(), epochs=2.5), "^epochs: expected an int", TypeError),
    (lambda: Trainer(mlp(), sgd(), batch_size=0), "^batch_size: expected an int >= 1", ValueError),
    (lambda: Trainer(mlp(), sgd(), batch_size=True), "^batch_size: expected an int, got bool", TypeError),
    (lambda: Trainer(mlp(), sgd(), eval_every=0), "^eval_every:", ValueError),
    (lambda: Trainer(mlp(), sgd(), seed=1.0), "^seed: expected an int", TypeError),
])
def test_bad_construction(make, match, exc):
    with pytest.raises(exc, match=match):
        make()


def test_bad_fit(split5):
    s = first(split5, 2)
    with pytest.raises(ValueError, match=r"^model: expected output of shape \(batch, n_classes\) = "
                                         r"\(\d+, 10\), got float32 \(\d+, 5\)"):
        trainer(mlp(out=5)).fit(s)
    with pytest.raises(TypeError,
                       match="^make_optimizer: expected a function returning a torch.optim.Optimizer, got list"):
        trainer(mlp(), make_optimizer=lambda m: list(m.parameters())).fit(s)
    with pytest.raises(TypeError, match="^scenario: expected a forgetcore.continual.Scenario, got list"):
        trainer(mlp()).fit(list(s))
    with pytest.raises(ValueError, match="^max_steps: expected an int >= 1"):
        trainer(mlp()).fit(s, max_steps=0)

    class NaNLoss:
        def loss(self, ctx, batch, output):
            return output.sum() * float("nan")

    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="^loss: expected a finite value, got nan at step 0"):
        trainer(model, [NaNLoss()]).fit(s)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # no step was taken

    class VectorLoss:
        def loss(self, ctx, batch, output):
            return output.sum(1)

    with pytest.raises(ValueError, match=r"^loss: expected a scalar tensor, got float32 \(32,\)"):
        trainer(mlp(), [VectorLoss()]).fit(s)

    tr = trainer(mlp())
    tr.fit(s, max_steps=3)
    with pytest.raises(ValueError, match="^scenario: this trainer's run is on 'split-digits-class\\[:2\\]'"):
        tr.fit(first(split5, 3))
    with pytest.raises(ValueError, match=r"^state\[.plugins.\]: saved with 0 plugins, this trainer has 1"):
        trainer(mlp(), [Finetune()]).load_state_dict(tr.state_dict())
    with pytest.raises(ValueError, match=r"^state\['config'\]: saved by a trainer with \{'seed': 0, 'epochs': 1, "
                                         r"'batch_size': 32\}, this one has \{'seed': 1,"):
        trainer(mlp(), seed=1).load_state_dict(tr.state_dict())
    assert tr.fit(s, max_steps=2)["steps"] == 3  # already past the pause point: nothing runs
    with pytest.raises(ValueError, match=r"^state\['rng'\]: missing"):
        trainer(mlp()).load_state_dict({k: v for k, v in tr.state_dict().items() if k != "rng"})


def test_resume_calls_resume_task_not_before_task(split5):
    class Calls(Plugin):
        def __init__(self):
            self.calls = []

        def before_task(self, ctx, task):
            self.calls.append(("before_task", task.id))

        def resume_task(self, ctx, task):
            self.calls.append(("resume_task", task.id, ctx.task_step))

    s = first(split5, 2)
    a = trainer(mlp(), [Calls()])
    a.fit(s, max_steps=10)  # task 0 has 8 steps: pause at step 2 of task 1
    b = trainer(mlp(), [Calls()])
    b.load_state_dict(a.state_dict())
    b.fit(s)
    assert a.plugins[0].calls == [("before_task", 0), ("before_task", 1)]
    assert b.plugins[0].calls == [("resume_task", 1, 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_and_resume(split5):
    # Everything on the GPU: model, batches, task-IL masks, ER memory; resume restores the CUDA RNG.
    s = first(scenarios.split("digits", n_tasks=5, mode="task", seed=0), 3)
    def make():
        model = mlp(dropout=0.3)
        return model, trainer(model, [ER(64, seed=0)], device="cuda", epochs=2, eval_every=5)

    model_a, full = make()
    ra = full.fit(s)
    assert next(model_a.parameters()).is_cuda and min(ra["R"][-1]) > 0.8
    _, part = make()
    part.fit(s, max_steps=20)
    model_c, resumed = make()
    resumed.load_state_dict(part.state_dict())
    assert resumed.fit(s)["R"] == ra["R"]
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_c.parameters()))


class RepeatEach(Plugin):
    """A batch_indices plugin: every example twice in a row, in a seeded order (View-Batch-like)."""

    def __init__(self):
        self.calls = []

    def batch_indices(self, ctx, task, epoch, n):
        self.calls.append((task.id, epoch, n))
        g = torch.Generator().manual_seed(1000 * ctx.seed + 10 * task.id + epoch)
        return torch.randperm(n, generator=g).repeat_interleave(2)


def test_batch_indices_decides_the_batches(split5):
    s = first(split5, 2)
    seen = []

    class Spy(Plugin):
        def transform_batch(self, ctx, batch):
            seen.append(batch["y"].clone())
            return batch

    rep = RepeatEach()
    r = trainer(mlp(), [rep, Spy()], batch_size=8, epochs=2).fit(s)
    n0, n1 = len(s[0].train), len(s[1].train)
    assert rep.calls == [(0, 0, n0), (0, 1, n0), (1, 0, n1), (1, 1, n1)]
    assert r["steps"] == 2 * (math.ceil(2 * n0 / 8) + math.ceil(2 * n1 / 8))
    assert all(torch.equal(y[0::2], y[1::2]) for y in seen)  # each example twice in its batch


def test_batch_indices_explicit_batches_and_bad_output(split5):
    s = first(split5, 1)

    class Fixed(Plugin):
        def batch_indices(self, ctx, task, epoch, n):
            return [torch.arange(0, 5), torch.arange(5, n)]

    assert trainer(mlp(), [Fixed()]).fit(s)["steps"] == 2

    class Bad(Plugin):
        def batch_indices(self, ctx, task, epoch, n):
            return torch.tensor([0, n])

    with pytest.raises(ValueError, match=r"batch_indices: indices must lie in \[0, "):
        trainer(mlp(), [Bad()]).fit(s)

    with pytest.raises(ValueError, match="at most one plugin may define batch_indices"):
        trainer(mlp(), [RepeatEach(), RepeatEach()])


def test_batch_indices_resume_is_bit_identical(split5):
    s = first(split5, 2)
    full = trainer(mlp(), [RepeatEach()], batch_size=8, epochs=2)
    ref = full.fit(s)
    a = trainer(mlp(), [RepeatEach()], batch_size=8, epochs=2)
    a.fit(s, max_steps=ref["steps"] // 2 + 3)  # pause inside an epoch of task 1
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = trainer(mlp(seed=5), [RepeatEach()], batch_size=8, epochs=2)
    b.load_state_dict(torch.load(buf, weights_only=True))
    out = b.fit(s)
    assert out["steps"] == ref["steps"] and out["R"] == ref["R"]
    assert all(torch.equal(p, q) for p, q in zip(full.model.state_dict().values(), b.model.state_dict().values()))


@pytest.mark.parametrize(("eval_tasks", "expected"), [
    ("seen", [[0], [0, 1], [0, 1, 2]]),
    ("current", [[0], [1], [2]]),
    ([2], [[2], [2], [2]]),
    (lambda t: range(0, t + 1, 2), [[0], [0], [0, 2]]),
])
def test_eval_tasks_limits_evaluation(split5, eval_tasks, expected):
    s = first(split5, 3)
    r = trainer(mlp(), eval_tasks=eval_tasks, eval_every=5).fit(s)
    evaluated = [[j for j, a in enumerate(row) if not math.isnan(a)] for row in r["R"]]
    assert evaluated == expected
    for acc, t in zip(r["curves"]["acc"], r["curves"]["task"]):  # curve points: the same selection
        got = [j for j, a in enumerate(acc) if a is not None]
        assert set(got) <= set(expected[t])


def test_eval_tasks_default_evaluates_every_task(split5):
    r = trainer(mlp()).fit(first(split5, 2))
    assert all(not math.isnan(a) for row in r["R"] for a in row)


def test_eval_tasks_bad_values(split5):
    with pytest.raises(ValueError, match="eval_tasks: expected 'all'"):
        trainer(mlp(), eval_tasks="some")
    with pytest.raises(TypeError, match="eval_tasks"):
        trainer(mlp(), eval_tasks=3.5)
    with pytest.raises(ValueError, match=r"eval_tasks: task ids must lie in \[0, 2\)"):
        trainer(mlp(), eval_tasks=[5]).fit(first(split5, 2))


# ---------------------------------------------------------------------------------------------
# issue 11: transactional, strict Trainer.load_state_dict (regressions: each was accepted, or
# changed the model and earlier plugins before a later part failed)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paused(split5):
    """A run of Trainer(model, [GPM, ER]) paused inside task 1 (GPM has a basis, ER a memory)."""
    from forgetcore.continual import GPM

    tr = trainer(mlp(), [GPM(0.9, n_samples=50), ER(capacity=40, seed=1)],
                 make_optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    tr.fit(first(split5, 2), max_steps=10)
    return tr.state_dict()


def _fresh():
    from forgetcore.continual import GPM

    return trainer(mlp(seed=5), [GPM(0.9, n_samples=50), ER(capacity=40, seed=1)],
                   make_optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))


def _corrupt(sd, path, value):
    import copy

    sd = copy.deepcopy(sd)
    d = sd
    for k in path[:-1]:
        d = d[k]
    if value is KeyError:
        del d[path[-1]]
    else:
        d[path[-1]] = value(d[path[-1]]) if callable(value) else value
    return sd


def _er_of_capacity(sd, cap):
    from forgetcore.replay import ReservoirBuffer

    buf = ReservoirBuffer(cap, seed=1)
    buf.add(x=torch.zeros(3, 8, 8), y=torch.zeros(3, dtype=torch.int64), task=torch.zeros(3, dtype=torch.int64))
    return {"buffer": buf.state_dict()}


def _not_orthonormal(bases):
    return {k: v * 2.0 for k, v in bases.items()}


CORRUPT = [
    ("ER state of another capacity", ("plugins", 1), lambda er: _er_of_capacity(er, 7), ValueError, "capacity"),
    ("GPM basis not orthonormal", ("plugins", 0, "subspace", "bases"), _not_orthonormal, ValueError, "orthonormal"),
    ("model tensor of another shape", ("model", "1.weight"), lambda w: w[:, :10].clone(), ValueError, "1.weight"),
    ("model tensor of another dtype", ("model", "1.weight"), lambda w: w.double(), TypeError, "1.weight"),
    ("model tensor NaN", ("model", "4.bias"), lambda b: b * float("nan"), ValueError, "4.bias"),
    ("missing model key", ("model", "4.bias"), KeyError, ValueError, "4.bias"),
    ("missing plugin key", ("plugins", 1, "buffer"), KeyError, ValueError, "buffer"),
    ("GPM tasks_done = -3", ("plugins", 0, "tasks_done"), -3, ValueError, "tasks_done"),
    ("GPM tasks_done = 1.7", ("plugins", 0, "tasks_done"), 1.7, TypeError, "tasks_done"),
    ("RNG state of the wrong size", ("rng", "cpu"), lambda r: r[:100].clone(), ValueError, "rng"),
    ("progress task 99", ("progress", "task"), 99, ValueError, "task"),
    ("progress step negative", ("progress", "step"), -1, ValueError, "step"),
    ("progress in_task not a bool", ("progress", "in_task"), "yes", TypeError, "in_task"),
    ("optimizer state of another shape", ("optimizer", "state", 0, "exp_avg"), lambda t: t[:5].clone(),
     ValueError, "optimizer"),
    ("optimizer state dropped mid-task", ("optimizer",), lambda o: {}, ValueError, "optimizer"),
]


@pytest.mark.parametrize("what, path, value, exc, name", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_trainer_state_is_refused_and_changes_nothing(paused, what, path, value, exc, name):
    from badinput import expect_clean_error

    tr = _fresh()
    bad = _corrupt(paused, path, value)
    expect_clean_error(lambda: tr.load_state_dict(bad), arg=name, exc=(exc,),
                       state=[tr.model, tr.plugins[0].state_dict, tr.plugins[1].state_dict, tr.state_dict])


def test_resume_after_refused_state_is_still_bit_identical(paused, split5):
    """A refused load followed by the good one resumes exactly like loading the good one alone."""
    a, b = _fresh(), _fresh()
    with pytest.raises(ValueError):
        a.load_state_dict(_corrupt(paused, ("plugins", 1), lambda er: _er_of_capacity(er, 7)))
    a.load_state_dict(paused)
    b.load_state_dict(paused)
    ra, rb = a.fit(first(split5, 2)), b.fit(first(split5, 2))
    assert ra["R"] == rb["R"]
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_trainer_constructor_names_bad_arguments():
    from badinput import expect_clean_error

    m = mlp()
    expect_clean_error(lambda: trainer(m, device="nope"), arg="device", state=[m])
    expect_clean_error(lambda: trainer(m, seed=1.5), arg="seed", exc=(TypeError,))
    expect_clean_error(lambda: trainer(m, seed=-1), arg="seed", exc=(ValueError,))
    expect_clean_error(lambda: trainer(m, progress="no"), arg="progress", exc=(TypeError,))


def test_resume_past_the_epochs_last_batch_is_refused(paused, split5):
    """A progress whose batch lies past the epoch's batches skipped the rest of the epoch silently;
    the number of batches is known only once the scenario is, so fit refuses it."""
    tr = _fresh()
    tr.load_state_dict(_corrupt(paused, ("progress", "batch"), 10**6))
    with pytest.raises(ValueError, match=r"^state\['progress'\]\['batch'\]"):
        tr.fit(first(split5, 2))


def test_a_buffer_holding_inf_by_design_still_loads():
    """Finiteness is required of parameters only: a mask buffer of -inf is a legitimate state."""
    m = mlp()
    m.register_buffer("mask", torch.tensor([0.0, -math.inf]))
    a = trainer(m)
    b_model = mlp(seed=3)
    b_model.register_buffer("mask", torch.zeros(2))
    b = trainer(b_model)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b_model.mask, m.mask)
