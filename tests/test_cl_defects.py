"""The four defects found in review of the landed continual code, one test each; each
failed before its fix."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import forgetcore.continual.fot as fot_mod
from forgetcore.continual import ER, FOT, GPM, Trainer, scenarios
from forgetcore.replay import ClassBalancedReservoir


def _rank1_task(task_id, seed):
    """Inputs on one direction (plus a little noise): the first direction holds > 99 % of the energy."""
    g = torch.Generator().manual_seed(seed)
    v = torch.tensor([1.0, 2.0, -1.0, 0.5])
    x = torch.randn(200, 1, generator=g) * v + 0.01 * torch.randn(200, 4, generator=g)
    return SimpleNamespace(id=task_id, train=TensorDataset(x, torch.zeros(200, dtype=torch.long)))


def test_gpm_first_task_rule_only_on_the_first_task():
    """threshold 0.5 < the first direction's energy share: the official first-task count keeps 0
    directions (one short). On task 1 the basis is still empty, and the official code applies the
    later-task rule there (add while the captured energy < 0.5): exactly 1 direction."""
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    gpm = GPM(0.5, n_samples=200)
    ctx = SimpleNamespace(model=model, device=torch.device("cpu"))
    gpm.before_task(ctx, None)
    gpm.after_task(ctx, _rank1_task(0, 0))
    assert gpm.subspace.ranks() == {"0": 0}
    gpm.after_task(ctx, _rank1_task(1, 1))
    assert gpm.subspace.ranks() == {"0": 1}


def test_gpm_freeze_1d_spares_the_head_bias():
    """After task 0, hidden biases (projected part) get zero gradient, the output layer's bias does not,
    so a biased head can learn new classes' biases."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.LayerNorm(20), nn.ReLU(), nn.Linear(20, 20),
                          nn.ReLU(), nn.Linear(20, 10))
    sc = scenarios.split("digits", n_tasks=5, mode="class", seed=0)
    gpm = GPM(0.9, n_samples=100)
    ctx = SimpleNamespace(model=model, device=torch.device("cpu"))
    gpm.before_task(ctx, sc[0])
    gpm.after_task(ctx, sc[0])
    x, y = sc[1].train.tensors
    nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
    gpm.after_backward(ctx)
    assert float(model[6].bias.grad.abs().sum()) > 0  # the head's bias learns
    for p in (model[1].bias, model[2].weight, model[2].bias, model[4].bias):
        assert float(p.grad.abs().sum()) == 0  # the projected part's 1-D parameters are frozen
    # through the Trainer: the head's bias moves on the new classes, the hidden bias stays put
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10))
    tr = Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), [GPM(0.9, n_samples=100)],
                 epochs=1, batch_size=32, progress=False, eval_every=None)
    first = scenarios.Scenario(sc.tasks[:1], name="t0", mode="class", n_classes=10, input_shape=(1, 8, 8), seed=0)
    tr.fit(first)
    b_hidden, b_head = model[1].bias.detach().clone(), model[3].bias.detach().clone()
    tr2 = Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), tr.plugins,
                  epochs=1, batch_size=32, progress=False, eval_every=None)
    second = scenarios.Scenario(sc.tasks[1:2], name="t1", mode="class", n_classes=10, input_shape=(1, 8, 8), seed=0)
    tr2.fit(second)
    assert torch.equal(model[1].bias, b_hidden)
    assert float((model[3].bias.detach() - b_head)[2:4].abs().sum()) > 0


def test_fot_weighted_passes_sample_fractions(monkeypatch):
    seen = []
    real = fot_mod.server_step

    def spy(g, c, b, *, client_fractions=None, **kw):
        seen.append(client_fractions)
        return real(g, c, b, client_fractions=client_fractions, **kw)

    monkeypatch.setattr(fot_mod, "server_step", spy)
    sc = scenarios.split("digits", n_tasks=5, mode="class", seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False))
    FOT(model, n_clients=3, rounds=1, iid=False, weighted=True, progress=False).fit(sc[:1])
    sizes = [len(p) for p in fot_mod.split_clients(sc[0].train.tensors[1], 3, iid=False, seed=0)]
    assert seen[0] == pytest.approx([s / sum(sizes) for s in sizes])
    FOT(model, n_clients=3, rounds=1, iid=False, progress=False).fit(sc[:1])
    assert seen[1] is None  # default: 1/#clients, as the official code
    with pytest.raises(TypeError, match="^weighted"):
        FOT(model, weighted="yes")


def test_er_takes_any_buffer():
    sc = scenarios.split("digits", n_tasks=5, mode="class", seed=0)
    buf = ClassBalancedReservoir(40, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    tr = Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.05), [ER(buffer=buf, batch_size=8)],
                 epochs=1, batch_size=16, progress=False, eval_every=None)
    tr.fit(scenarios.Scenario(sc.tasks[:2], name="2", mode="class", n_classes=10, input_shape=(1, 8, 8), seed=0))
    assert tr.plugins[0].buffer is buf and len(buf) == 40
    assert sorted(buf.class_counts().values()) == [10, 10, 10, 10]  # balanced over the 4 classes seen
    with pytest.raises(TypeError, match="^buffer"):
        ER(buffer=[1, 2])
    with pytest.raises(ValueError, match="^capacity"):
        ER(10, buffer=buf)
    with pytest.raises(ValueError, match="^capacity"):
        ER()
