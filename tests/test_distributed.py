"""forgetcore under torch.distributed (gloo, CPU): every rank against the single process on the union.

One spawned group of workers runs every check (spawning costs seconds on 2 cores) and saves its
results; the tests compare them here with single-process references. World size 2 runs in
``make test``; world size 4 is marked ``slow_ci``.
"""

from __future__ import annotations

import dataclasses
import datetime
import socket
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from forgetcore import datasets, distributed
from forgetcore.continual import ER, GPM, Scenario, Trainer, scenarios
from forgetcore.replay import ReservoirBuffer
from forgetcore.unlearning import GU, SSD
from forgetcore.unlearning.data import UnlearnData

BS = 8  # per-rank batch size; the single-process reference uses BS * world


# ------------------------------------------------------------------------------------ shared setup
def _scenario() -> Scenario:
    """Two split-digits tasks, train sets cut to a multiple of 4 (so 2 and 4 ranks divide them)."""
    sc = scenarios.split("digits", n_tasks=5, mode="class", seed=0)
    tasks = []
    for t in sc.tasks[:2]:
        x, y = t.train.tensors
        n = len(y) // 4 * 4
        tasks.append(dataclasses.replace(t, train=TensorDataset(x[:n], y[:n])))
    return Scenario(tasks, name="split-digits[:2]", mode=sc.mode, n_classes=sc.n_classes,
                    input_shape=sc.input_shape, seed=sc.seed)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _trainer(model, plugins, batch_size):
    return Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.05), plugins, epochs=1,
                   batch_size=batch_size, seed=0, progress=False, eval_every=None)


def _fit_trainer(kind: str, world: int, dist_run: bool, max_steps: int | None = None, state=None):
    sc = _scenario()
    model = _mlp()
    if kind == "gpm":
        method = GPM(threshold=0.9, n_samples=64, seed=0)
    else:
        buf = ReservoirBuffer(48, seed=5)
        method = ER(buffer=distributed.DistributedReservoir(buf) if dist_run else buf)
    plugins = [distributed.ShardBatches(), method] if dist_run else [method]
    tr = _trainer(model, plugins, BS if dist_run else BS * world)
    if state is not None:
        tr.load_state_dict(state)
    res = tr.fit(sc, max_steps=max_steps)
    assert getattr(tr, "eval_shard", (0, 1)) == ((distributed.rank(), world) if dist_run else (0, 1))
    out = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "R": torch.tensor(res["R"]),
           "steps": res["steps"]}
    if kind == "gpm":
        out["proj"] = {n: method.subspace[n] @ method.subspace[n].T for n in method.subspace.ranks()}
    else:
        out["buffer"] = (method.buffer.buffer if dist_run else method.buffer).state_dict()
    return out, tr


def _stream(world: int):
    """Ten global batches of 12 * world rows (x, y), cut into per-rank slices."""
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(12 * world, 3, generator=g), torch.randint(0, 10, (12 * world,), generator=g))
            for _ in range(10)]


def _unlearn_data(world: int, r: int | None):
    x, y = datasets.load("digits")
    x = x.reshape(len(x), -1)[:400]
    y = y[:400]
    f, k = y == 3, y != 3
    xf, yf, xr, yr = x[f][:32], y[f][:32], x[k][:96], y[k][:96]
    if r is not None:  # rank r's shard
        xf, yf, xr, yr = xf[r::world], yf[r::world], xr[r::world], yr[r::world]
    return xf, yf, xr, yr


def _trained_mlp():
    model = _mlp(1)
    x, y = datasets.load("digits")
    x = x.reshape(len(x), -1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x[:400]), y[:400]).backward()
        opt.step()
    return model


# ------------------------------------------------------------------------------------ worker checks
def check_trainer_gpm(world, r):
    out, _ = _fit_trainer("gpm", world, True)
    return out


def check_trainer_er(world, r):
    out, _ = _fit_trainer("er", world, True)
    return out


def check_trainer_resume(world, r, tmp):
    _, tr = _fit_trainer("er", world, True, max_steps=7)
    path = f"{tmp}/trainer.pt"
    distributed.save_once(tr.state_dict(), path)
    state = torch.load(path, weights_only=True)
    out, _ = _fit_trainer("er", world, True, state=state)
    return out


def check_trainer_boundary(world, r):
    """States to resume on another world size: one paused on task 0's last step (the task
    boundary) and one paused inside task 0."""
    steps0 = -(-len(_scenario()[0].train) // (BS * world))
    _, tr = _fit_trainer("er", world, True, max_steps=steps0)
    _, mid = _fit_trainer("er", world, True, max_steps=steps0 - 1)
    return {"steps": steps0, "boundary": tr.state_dict(), "midtask": mid.state_dict()}


def check_reservoir(world, r):
    buf = distributed.DistributedReservoir(ReservoirBuffer(50, seed=3))
    for x, y in _stream(world):
        k = len(y) // world
        buf.add(x=x[r * k:(r + 1) * k], y=y[r * k:(r + 1) * k])
    buf.check()
    drawn = buf.sample(5)
    return {"state": buf.state_dict(), "drawn": distributed.gather_rows(drawn["x"])}


def check_gu(world, r):
    model = _trained_mlp()
    xf, yf, xr, yr = _unlearn_data(world, r)
    gu = GU(mode="gu", geometry="euclidean", seed=0)
    opt = gu.make_optimizer(list(model.parameters()))
    diag = gu.direction(model, opt, (xf, yf), (xr, yr))
    return {"grad": torch.cat([p.grad.reshape(-1) for p in model.parameters()]), "c": diag["c"]}


def check_gu_fit_agrees(world, r):
    model = _trained_mlp()
    xf, yf, xr, yr = _unlearn_data(world, r)
    GU(mode="gu", seed=0, epochs=1, batch_size=4).fit(model, UnlearnData(TensorDataset(xf, yf),
                                                                         TensorDataset(xr, yr)))
    distributed.check_agree("model", model.state_dict())
    return {"ok": True}


def check_ssd(world, r):
    model = _trained_mlp()
    xf, yf, xr, yr = _unlearn_data(world, r)
    SSD(alpha=10.0, lam=1.0, fisher="empirical", seed=0).fit(model, UnlearnData(TensorDataset(xf, yf),
                                                                                 TensorDataset(xr, yr)))
    distributed.check_agree("model", model.state_dict())
    return {"model": model.state_dict()}


def _fsdp_problem(world):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    return model, x, y


def check_fsdp(world, r):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from forgetcore.importance import fisher_diagonal

    model, x, y = _fsdp_problem(world)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    try:
        fisher_diagonal(model, TensorDataset(x, y), mode="empirical")
        refused = None
    except ValueError as e:
        refused = str(e)
    # rank r's batches b together form the single process's batch b (sizes 4 * world and 2 * world)
    full = distributed.fsdp_fisher_diagonal(model, TensorDataset(x[r::world], y[r::world]), batch_size=4)
    forget = distributed.fsdp_fisher_diagonal(model, TensorDataset(x[:8][r::world], y[:8][r::world]),
                                              batch_size=1)
    counts = distributed.fsdp_ssd_dampen_(model, full, forget, alpha=1.0, lam=1.0)
    whole = {}
    for n, p in model.named_parameters():
        whole[n] = DTensor.from_local(full[n], p.device_mesh, p.placements, shape=p.shape,
                                      stride=p.stride()).full_tensor()
    return {"fisher": whole, "counts": counts, "params": {n: p.full_tensor().detach() for n, p in
                                                          model.named_parameters()}, "refused": refused}


def check_kappatune(world, r):
    from forgetcore.finetune import KappaTune

    model = _trained_mlp()
    if r == 1:  # a last-bit difference on one rank (as SVDs on different devices can give)
        with torch.no_grad():
            model[1].weight[0, 0] += 1e-4
    kt = KappaTune(model, k=1, progress=False)
    distributed.check_agree("kappa", kt.kappa)
    return {"selected": list(kt.selected), "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}


def check_bad_input(world, r, tmp):
    errors = {}

    def catch(name, fn):
        try:
            fn()
            errors[name] = None
        except (ValueError, TypeError) as e:
            errors[name] = f"{type(e).__name__}: {e}"

    catch("basis", lambda: distributed.check_agree("basis", torch.full((3,), float(r == 1))))
    bad = distributed.DistributedReservoir(ReservoirBuffer(4, seed=r))  # seeds differ across ranks
    for x, y in _stream(world)[:3]:
        bad.add(x=x[r::world], y=y[r::world])
    catch("buffer", bad.check)
    ctx = type("C", (), {"seed": 0, "trainer": type("T", (), {"batch_size": 4})()})()
    task = type("K", (), {"id": 0})()
    catch("indivisible", lambda: distributed.ShardBatches().batch_indices(ctx, task, 0, 4 * world + 1))
    xf, yf, xr, yr = _unlearn_data(world, r)
    model = _trained_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    catch("gu_multi", lambda: GU(mode="multi", geometry="euclidean").fit(
        model, UnlearnData(TensorDataset(xf, yf), TensorDataset(xr, yr))))
    errors["gu_multi_unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    catch("gu_steps", lambda: GU(mode="gu", batch_size=4).fit(
        model, UnlearnData(TensorDataset(xf[: 4 + 4 * r], yf[: 4 + 4 * r]), TensorDataset(xr, yr))))
    return errors


def _fot_fit(n_clients=3):
    """FOT on two permuted-digits tasks, 3 clients (so 2 ranks hold 2 and 1 of them)."""
    from forgetcore.continual import FOT

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10, bias=False))
    f = FOT(model, n_clients=n_clients, rounds=2, lr=0.1, epsilon=0.95, seed=3, progress=False)
    out = f.fit(scenarios.permuted("digits", n_tasks=2, seed=0))
    return {"R": out["R"], "model": f.model.state_dict(), "bases": f.subspace.state_dict()["bases"]}


def check_fot(world, r):
    return _fot_fit()


CHECKS = {"fot": check_fot, "trainer_gpm": check_trainer_gpm, "trainer_er": check_trainer_er,
          "trainer_resume": check_trainer_resume, "trainer_boundary": check_trainer_boundary,
          "reservoir": check_reservoir, "gu": check_gu, "gu_fit": check_gu_fit_agrees, "ssd": check_ssd,
          "fsdp": check_fsdp, "kappatune": check_kappatune, "bad_input": check_bad_input}
NEEDS_TMP = {"trainer_resume", "bad_input"}


def _worker(r, world, port, tmp):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A check that raises on one rank only would leave the others waiting in a collective: the
    # timeout turns that hang into an error.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    for name, fn in CHECKS.items():
        try:
            results[name] = fn(world, r, tmp) if name in NEEDS_TMP else fn(world, r)
        except Exception:  # reported per check by the tests
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    torch.save(results, f"{tmp}/rank{r}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, tmp):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(world, _free_port(), str(tmp)), nprocs=world, start_method="spawn")
    return [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(world)]


_CACHE: dict[int, list] = {}


@pytest.fixture(params=[2, pytest.param(4, marks=pytest.mark.slow_ci)], scope="module")
def ranks(request, tmp_path_factory):
    world = request.param
    if world not in _CACHE:
        _CACHE[world] = _spawn(world, tmp_path_factory.mktemp(f"dist{world}"))
    return world, _CACHE[world]


def _get(results, name):
    for r, res in enumerate(results):
        assert "error" not in res[name], f"rank {r}, check {name}:\n{res[name]['error']}"
    return [res[name] for res in results]


def _close(a, b, atol):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k], atol)
    else:
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", ["gpm", "er"])
def test_trainer_under_ddp_matches_one_process_with_the_global_batch(ranks, kind):
    world, results = ranks
    got = _get(results, f"trainer_{kind}")
    ref, _ = _fit_trainer(kind, world, False)
    for g in got:
        assert g["steps"] == ref["steps"]
        _close(g["model"], ref["model"], 2e-5)
        torch.testing.assert_close(g["R"], ref["R"], atol=0.0, rtol=0, equal_nan=True)
        if kind == "gpm":  # the basis from the all-reduced Gram spans the single process's basis
            _close(g["proj"], ref["proj"], 1e-4)
        else:  # the replicated reservoir holds what one process keeps from the global stream
            assert torch.equal(g["buffer"]["fields"]["x"], ref["buffer"]["fields"]["x"])
            assert g["buffer"]["seen"] == ref["buffer"]["seen"]
    for g in got[1:]:  # every rank holds bitwise the same model
        _close(g["model"], got[0]["model"], 0.0)


def test_trainer_resumes_on_another_world_size_only_at_a_task_boundary(ranks):
    """Issue 17's open item: a state saved at a task boundary by W ranks resumes in one process
    (the next task takes the new global batch); one saved inside a task is a clear ValueError
    that changes nothing."""
    from badinput import expect_clean_error

    world, results = ranks
    got = _get(results, "trainer_boundary")[0]
    sc = _scenario()

    def fresh():
        buf = distributed.DistributedReservoir(ReservoirBuffer(48, seed=5))
        return _trainer(_mlp(), [distributed.ShardBatches(), ER(buffer=buf)], BS)

    assert got["boundary"]["progress"]["in_task"] is False and got["boundary"]["optimizer"] == {}
    tr = fresh()
    tr.load_state_dict(got["boundary"])
    res = tr.fit(sc)
    assert res["finished"] and res["steps"] == got["steps"] + -(-len(sc[1].train) // BS)
    assert res["R"][0] == got["boundary"]["progress"]["R"][0]
    tr = fresh()
    expect_clean_error(lambda: tr.load_state_dict(got["midtask"]), arg="world_size",
                       state=[tr.model, tr.state_dict, tr.plugins[1].state_dict])


def test_trainer_resumes_from_a_checkpoint_saved_once(ranks):
    world, results = ranks
    got = _get(results, "trainer_resume")
    full = _get(results, "trainer_er")
    for g, f in zip(got, full):
        _close(g["model"], f["model"], 0.0)


def test_resume_on_another_world_size_is_refused():
    plugin = distributed.ShardBatches()
    with pytest.raises(ValueError, match="^world_size: the checkpoint was written by 2 ranks inside a task"):
        plugin.load_state_dict({"world_size": 2})  # no in_task: assumed inside a task
    with pytest.raises(ValueError, match="^world_size"):
        plugin.load_state_dict({"world_size": 2, "in_task": True})
    with pytest.raises(TypeError, match=r"^state\['in_task'\]"):
        plugin.load_state_dict({"world_size": 2, "in_task": 1})
    plugin.load_state_dict({"world_size": 2, "in_task": False})  # a task boundary: any world size
    assert plugin.state_dict() == {"world_size": 1, "in_task": False}


def test_replicated_reservoir_equals_one_process_on_the_global_stream(ranks):
    world, results = ranks
    got = _get(results, "reservoir")
    ref = ReservoirBuffer(50, seed=3)
    for x, y in _stream(world):
        ref.add(x=x, y=y)
    want = ref.state_dict()
    drawn = ref.sample(5 * world)["x"]
    for g in got:
        assert g["state"]["seen"] == want["seen"] == 120 * world
        assert torch.equal(g["state"]["fields"]["x"], want["fields"]["x"])
        assert torch.equal(g["state"]["fields"]["y"], want["fields"]["y"])
        assert torch.equal(g["drawn"], drawn)  # the ranks' replay slices form the single draw


def test_reservoir_invariant_over_the_global_stream():
    """Each global stream item is kept with probability capacity / seen (200 seeds, 4 sigma)."""
    n, cap, seeds = 40, 10, 200
    kept = torch.zeros(n)
    for s in range(seeds):
        buf = ReservoirBuffer(cap, seed=s)
        for b in torch.arange(n).split(8):
            buf.add(i=b)
        kept[buf.data()["i"]] += 1
    p = cap / n
    sd = (p * (1 - p) / seeds) ** 0.5
    assert float((kept / seeds - p).abs().max()) < 4 * sd


def test_gu_direction_averages_forget_and_retain_gradients(ranks):
    world, results = ranks
    got = _get(results, "gu")
    model = _trained_mlp()
    xf, yf, xr, yr = _unlearn_data(world, None)
    gu = GU(mode="gu", geometry="euclidean", seed=0)
    diag = gu.direction(model, gu.make_optimizer(list(model.parameters())), (xf, yf), (xr, yr))
    want = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    for g in got:
        torch.testing.assert_close(g["grad"], want, atol=1e-5, rtol=1e-4)
        assert abs(g["c"] - diag["c"]) < 1e-4


def test_gu_fit_keeps_the_ranks_in_step(ranks):
    _get(ranks[1], "gu_fit")  # check_agree on the model inside the worker raised nothing


def test_ssd_under_ddp_dampens_like_one_process_on_the_union(ranks):
    world, results = ranks
    got = _get(results, "ssd")
    model = _trained_mlp()
    xf, yf, xr, yr = _unlearn_data(world, None)
    SSD(alpha=10.0, lam=1.0, fisher="empirical", seed=0).fit(model, UnlearnData(TensorDataset(xf, yf),
                                                                                 TensorDataset(xr, yr)))
    for g in got:
        _close(g["model"], model.state_dict(), 1e-6)


def test_fsdp_batch_fisher_and_ssd_dampening_on_shards_equal_the_unsharded_result(ranks):
    from forgetcore.importance import fisher_diagonal, ssd_dampen_

    world, results = ranks
    got = _get(results, "fsdp")
    model, x, y = _fsdp_problem(world)
    full = fisher_diagonal(model, TensorDataset(x, y), batch_size=4 * world)
    forget = fisher_diagonal(model, TensorDataset(x[:8], y[:8]), batch_size=world)
    counts = ssd_dampen_(model, full, forget, alpha=1.0, lam=1.0)
    assert int(counts.sum()) > 0  # the check dampens something
    for g in got:
        assert g["refused"].startswith("model: its parameters are sharded"), g["refused"]
        _close(g["fisher"], full, 1e-7)
        assert torch.equal(g["counts"], counts)
        _close(g["params"], dict(model.named_parameters()), 1e-6)


def test_kappatune_selects_the_same_tensors_on_every_rank(ranks):
    got = _get(ranks[1], "kappatune")  # check_agree on kappa raised nothing in the workers
    assert all(g == got[0] for g in got)


def test_bad_input_is_refused_on_every_rank_naming_the_rank(ranks):
    world, results = ranks
    got = _get(results, "bad_input")
    for e in got:
        assert e["basis"].startswith("ValueError: basis: ranks disagree: rank(s) [1]"), e["basis"]
        assert e["buffer"].startswith("ValueError: buffer: ranks disagree: rank(s) ["), e["buffer"]
        assert e["indivisible"].startswith(f"ValueError: world_size: {world} ranks do not divide"), e["indivisible"]
        assert e["gu_multi"].startswith("ValueError: mode: 'multi'"), e["gu_multi"]
        assert e["gu_multi_unchanged"]
        assert e["gu_steps"].startswith("ValueError: data: ranks disagree"), e["gu_steps"]


def test_fot_clients_across_ranks_equal_the_single_process_run(ranks):
    """Each rank simulates the clients c with c % world == rank; with one generator per
    (seed, task, round, client) and the updates gathered in client order, every rank holds
    bitwise the single-process model and bases (3 clients: the ranks hold unequal shares)."""
    world, results = ranks
    got = _get(results, "fot")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each
    try:
        ref = _fot_fit()
    finally:
        torch.set_num_threads(threads)
    for g in got:
        _close(g["model"], ref["model"], 0.0)
        _close(g["bases"], ref["bases"], 0.0)
        assert g["R"] == ref["R"]


def test_single_process_helpers_are_the_identity():
    t = torch.arange(6.0).view(2, 3)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and not distributed.is_distributed()
    assert distributed.mean_across_ranks(t) is t and distributed.gather_rows(t) is t
    assert distributed.gram_root(t) is t
    distributed.check_agree("basis", t)
    with pytest.raises(ValueError, match="^distributed: True needs"):
        distributed.resolve_world(True)
    assert distributed.checksum({"a": t}) != distributed.checksum({"a": t + 1})


def _square(seed, power=2):
    return seed ** power


def _seeded_fit(seed, steps=20):
    """A small seeded training run: its final loss and weights."""
    torch.manual_seed(seed)
    model = _mlp(seed)
    x, y = datasets.load("digits")
    x = x.reshape(len(x), -1)[:256]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,))
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[:256][idx])
        loss.backward()
        opt.step()
    return float(loss.detach()), model.state_dict()


def test_sweep_across_processes_equals_the_sequential_run():
    seeds = [4, 0, 7]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run one thread each: compare like with like
    try:
        seq = distributed.sweep(_seeded_fit, seeds, processes=1, progress=False, steps=10)
    finally:
        torch.set_num_threads(threads)
    par = distributed.sweep(_seeded_fit, seeds, processes=2, progress=False, steps=10)
    for (la, ma), (lb, mb) in zip(seq, par):
        assert la == lb
        _close(ma, mb, 0.0)
    assert distributed.sweep(_square, [3, 1, 2], processes=1, progress=False) == [9, 1, 4]
    with pytest.raises(ValueError, match="^seeds: expected at least one"):
        distributed.sweep(_square, [], progress=False)
    with pytest.raises(ValueError, match="^processes"):
        distributed.sweep(_square, [1], processes=0, progress=False)
