"""Bad-input matrix for FOT (issue 11): server_step, client_sketch, split_clients, the FOT
constructor and its transactional load_state_dict, each through ``expect_clean_error``."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from badinput import expect_clean_error
from forgetcore import subspace
from forgetcore.continual.fot import FOT, client_sketch, server_step, split_clients

NAN, INF = float("nan"), float("inf")


def weights():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 6, generator=g), "b": torch.randn(4, generator=g)}


def clients(n=2):
    return [{k: v + 0.1 * (i + 1) for k, v in weights().items()} for i in range(n)]


def basis():
    return subspace.extend_basis(None, torch.randn(6, 2, generator=torch.Generator().manual_seed(1)), 1.0,
                                 count="reach")


# ------------------------------------------------------------------------------ server_step
@pytest.mark.parametrize("fractions, exc", [
    ([NAN, NAN], ValueError), ([0.5, NAN], ValueError), ([INF, -INF], ValueError), ([1.5, -0.5], ValueError),
    ([0.5, 0.25], ValueError), ([1.0], ValueError), ("ab", TypeError), ([0.5, "0.5"], TypeError), (0.5, TypeError),
])
def test_server_step_client_fractions(fractions, exc):
    g, cs, b = weights(), clients(), {"w": basis()}
    expect_clean_error(lambda: server_step(g, cs, b, client_fractions=fractions), arg="client_fractions",
                       state=[g, cs, b], exc=(exc,))


@pytest.mark.parametrize("where", ["global", "client"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_server_step_non_finite_weights(where, value):
    g, cs, b = weights(), clients(), {"w": basis()}
    target = g if where == "global" else cs[1]
    target["w"][2, 3] = value
    arg = "global_weights['w']" if where == "global" else "client_weights[1]['w']"
    expect_clean_error(lambda: server_step(g, cs, b), arg=arg, state=[g, cs, b])


def test_server_step_shapes_keys_and_bases():
    g, cs = weights(), clients()
    bad = clients()
    bad[0]["w"] = torch.zeros(4, 5)
    expect_clean_error(lambda: server_step(g, bad, {}), arg="client_weights[0]['w']", state=[g, bad])
    missing = clients()
    del missing[1]["b"]
    expect_clean_error(lambda: server_step(g, missing, {}), arg="client_weights[1]", state=[g, missing])
    expect_clean_error(lambda: server_step(g, cs, {"w": torch.zeros(5, 1)}), arg="bases['w']", state=[g, cs])
    nan_basis = basis()
    nan_basis[0, 0] = NAN
    expect_clean_error(lambda: server_step(g, cs, {"w": nan_basis}), arg="bases['w']", state=[g, cs])
    expect_clean_error(lambda: server_step(g, cs, {"nope": basis()}), arg="bases", state=[g, cs])
    expect_clean_error(lambda: server_step(g, cs[0], {}), arg="client_weights", state=[g, cs])
    expect_clean_error(lambda: server_step(g, [], {}), arg="client_weights", state=[g])
    expect_clean_error(lambda: server_step(g, cs, [basis()]), arg="bases", state=[g, cs])


# ------------------------------------------------------------------------------ client_sketch
@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 6), n=st.integers(1, 9), i=st.integers(0, 100), j=st.integers(0, 100),
       value=st.sampled_from([NAN, INF, -INF]), in_basis=st.booleans())
def test_client_sketch_non_finite(d, n, i, j, value, in_basis):
    reps = torch.randn(d, n)
    u = subspace.extend_basis(None, torch.randn(d, 1), 1.0, count="reach")
    gen = torch.Generator().manual_seed(0)
    if in_basis:
        u[i % d, 0] = value
    else:
        reps[i % d, j % n] = value
    expect_clean_error(lambda: client_sketch(reps, u, gen), arg="basis" if in_basis else "reps",
                       state=[reps, u, gen.get_state])


def test_client_sketch_types_and_shapes():
    gen = torch.Generator().manual_seed(0)
    reps = torch.randn(6, 5)
    expect_clean_error(lambda: client_sketch(reps.long(), None, gen), arg="reps", state=[gen.get_state],
                       exc=(TypeError,))
    expect_clean_error(lambda: client_sketch(reps[0], None, gen), arg="reps", state=[gen.get_state])
    expect_clean_error(lambda: client_sketch(reps.numpy(), None, gen), arg="reps", exc=(TypeError,))
    expect_clean_error(lambda: client_sketch(reps, torch.zeros(5, 1), gen), arg="basis", state=[gen.get_state])
    expect_clean_error(lambda: client_sketch(reps, None, 0), arg="generator", exc=(TypeError,))
    expect_clean_error(lambda: client_sketch(reps, None, gen, width=0), arg="width", state=[gen.get_state])
    expect_clean_error(lambda: client_sketch(reps, None, gen, width=2.0), arg="width", exc=(TypeError,))


# ------------------------------------------------------------------------------ split_clients
@pytest.mark.parametrize("n_clients, iid", [(10**12, True), (10**12, False), (101, True), (51, False)])
def test_split_clients_sizes_before_allocation(n_clients, iid):
    y = torch.arange(100) % 10
    expect_clean_error(lambda: split_clients(y, n_clients, iid=iid, seed=0), arg="n_clients", state=[y])


@pytest.mark.parametrize("kwargs, arg, exc", [
    ({"n_clients": 0}, "n_clients", ValueError), ({"n_clients": 2.0}, "n_clients", TypeError),
    ({"seed": 1.5}, "seed", TypeError), ({"seed": -1}, "seed", ValueError),
    ({"shards_per_client": 0}, "shards_per_client", ValueError),
])
def test_split_clients_arguments(kwargs, arg, exc):
    y = torch.arange(100) % 10
    kw = {"n_clients": 5, "iid": False, "seed": 0, **kwargs}
    expect_clean_error(lambda: split_clients(y, **kw), arg=arg, state=[y], exc=(exc,))


def test_split_clients_labels():
    expect_clean_error(lambda: split_clients(torch.rand(10), 2, iid=True, seed=0), arg="y", exc=(TypeError,))
    expect_clean_error(lambda: split_clients(torch.zeros(4, 2, dtype=torch.long), 2, iid=True, seed=0), arg="y")
    expect_clean_error(lambda: split_clients([0, 1, 2], 2, iid=True, seed=0), arg="y", exc=(TypeError,))


# ------------------------------------------------------------------------------ FOT
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))


@pytest.mark.parametrize("kwargs, arg, exc", [
    ({"n_clients": 0}, "n_clients", ValueError), ({"rounds": 1.0}, "rounds", TypeError),
    ({"lr": NAN}, "lr", ValueError), ({"lr": 0.0}, "lr", ValueError), ({"epsilon": 1.5}, "epsilon", ValueError),
    ({"eps_inc": INF}, "eps_inc", ValueError), ({"seed": -3}, "seed", ValueError), ({"seed": 0.5}, "seed", TypeError),
    ({"weighted": "yes"}, "weighted", TypeError), ({"distributed": True}, "distributed", ValueError),
])
def test_fot_constructor(kwargs, arg, exc):
    m = mlp()
    expect_clean_error(lambda: FOT(m, **kwargs), arg=arg, state=[m], exc=(exc,))


def fot_with_state():
    f = FOT(mlp(), progress=False)
    f.subspace.set("1", subspace.extend_basis(None, torch.randn(8, 3), 1.0, count="reach"))
    return f


def _bad_states():
    good = fot_with_state().state_dict()

    def edit(fn):
        s = {"model": {k: v.clone() for k, v in good["model"].items()},
             "subspace": {"bases": {k: v.clone() for k, v in good["subspace"]["bases"].items()}}}
        fn(s)
        return s

    nonorth = torch.ones(8, 2)
    return [
        ("state", TypeError, [1, 2]),
        ("state", ValueError, {"model": good["model"]}),
        ("state['model']", ValueError, edit(lambda s: s["model"].pop("1.weight"))),
        ("state['model']['1.weight']", ValueError,
         edit(lambda s: s["model"].__setitem__("1.weight", torch.zeros(6, 7)))),
        ("state['model']['3.weight']", ValueError, edit(lambda s: s["model"]["3.weight"].__setitem__((0, 0), NAN))),
        ("state['subspace']", ValueError, edit(lambda s: s.__setitem__("subspace", {"b": {}}))),
        ("state['subspace']", ValueError, edit(lambda s: s["subspace"]["bases"].__setitem__("9", torch.zeros(8, 0)))),
        ("state['subspace']['bases']['1']", ValueError,
         edit(lambda s: s["subspace"]["bases"].__setitem__("1", nonorth))),
        ("state['subspace']['bases']['3']", ValueError,
         edit(lambda s: s["subspace"]["bases"].__setitem__("3", torch.zeros(8, 1)))),
        ("state['subspace']['bases']['1']", TypeError,
         edit(lambda s: s["subspace"]["bases"].__setitem__("1", s["subspace"]["bases"]["1"].double()))),
    ]


@pytest.mark.parametrize("arg, exc, bad", _bad_states(), ids=lambda v: v if isinstance(v, str) else None)
def test_fot_load_state_dict_is_transactional(arg, exc, bad):
    f = FOT(mlp(), progress=False)  # a fresh FOT: its state must survive the failed load
    f.subspace.set("3", subspace.extend_basis(None, torch.randn(6, 1), 1.0, count="reach"))
    expect_clean_error(lambda: f.load_state_dict(bad), arg=arg, state=[f.state_dict], exc=(exc,))


def test_fot_state_round_trip_weights_only():
    f = fot_with_state()
    buf = io.BytesIO()
    torch.save(f.state_dict(), buf)
    buf.seek(0)
    g = FOT(mlp(), progress=False)
    with torch.no_grad():
        for p in g.model.parameters():
            p.add_(1.0)
    g.load_state_dict(torch.load(buf, weights_only=True))
    for k, v in f.state_dict()["model"].items():
        assert torch.equal(v, g.state_dict()["model"][k])
    assert torch.equal(g.subspace["1"], f.subspace["1"]) and g.subspace.names() == ["1"]
    assert g.projector.subspace is g.subspace  # the projector still sees the loaded bases
    assert not math.isnan(float(g.subspace["1"].sum()))


def test_fot_diverging_clients_name_the_model():
    """Finite data, an absurd lr: the non-finite weights come from the model's training, so the
    error names ``model`` (before the server averages them into the global model)."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
    task = SimpleNamespace(train=TensorDataset(x, y), test=TensorDataset(x, y))
    f = FOT(mlp(), n_clients=2, rounds=1, lr=1e30, progress=False)
    before = f.state_dict()
    with pytest.raises(ValueError, match="^model: client [01].s local training in task 0, round 0 made weights"):
        f.fit([task])
    assert all(torch.equal(v, f.model.state_dict()[k]) for k, v in before["model"].items())
