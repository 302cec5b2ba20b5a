"""GPM as a Trainer plugin: projection keeps old outputs, state round-trips, and the paper's claim
in miniature (permuted digits, 5 tasks, bias-free MLP): GPM's average forgetting is at most half
of Finetune's and its average accuracy at least Finetune's."""

import pytest
import torch
from torch import nn

import forgetcore.continual.trainer as trainer_mod
import forgetcore.evaluation.continual as metrics
from forgetcore.continual import scenarios
from forgetcore.continual.gpm import GPM


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 100, bias=False), nn.ReLU(),
                         nn.Linear(100, 100, bias=False), nn.ReLU(), nn.Linear(100, 10, bias=False))


def run(plugins, scenario):
    t = trainer_mod.Trainer(mlp(), lambda m: torch.optim.SGD(m.parameters(), lr=0.05), plugins=plugins,
                            epochs=3, batch_size=16, seed=0, progress=False, eval_every=None)
    return t.fit(scenario)["R"]


def test_gpm_halves_forgetting_of_finetune():
    sc = scenarios.permuted("digits", n_tasks=5, seed=0)
    r_ft = run([], sc)
    gpm = GPM([0.95, 0.99, 0.99])
    r_gpm = run([gpm], sc)
    f_ft, f_gpm = metrics.average_forgetting(r_ft), metrics.average_forgetting(r_gpm)
    a_ft, a_gpm = metrics.average_accuracy(r_ft), metrics.average_accuracy(r_gpm)
    print(f"Finetune ACC {a_ft:.3f} FGT {f_ft:.3f} | GPM ACC {a_gpm:.3f} FGT {f_gpm:.3f} ranks {gpm.subspace.ranks()}")
    assert f_gpm <= 0.5 * f_ft
    assert a_gpm >= a_ft
    assert all(0 < r <= d for r, d in zip(gpm.subspace.ranks().values(), gpm.subspace.dims().values()))


def test_state_dict_roundtrip_and_bad_args(tmp_path):
    sc = scenarios.permuted("digits", n_tasks=2, seed=1)
    gpm = GPM(0.9, n_samples=50)
    run([gpm], sc)
    torch.save(gpm.state_dict(), tmp_path / "g.pt")
    other = GPM(0.9)
    other.load_state_dict(torch.load(tmp_path / "g.pt", weights_only=True))
    assert other.subspace.ranks() == gpm.subspace.ranks() and other.tasks_done == 2
    with pytest.raises(ValueError, match="^threshold"):
        GPM(1.5)
    with pytest.raises(ValueError, match="^count"):
        GPM(0.9, count="x")
    with pytest.raises(ValueError, match="^threshold"):
        run([GPM([0.9, 0.9])], sc)  # three layers, two thresholds
