"""GS-LoRA / GS-LoRA++ on a residual MLP over digits (4 feed-forward blocks, one LoRA group each):
the forgotten classes go to ~0 with the kept ones within a few points, a larger group weight zeroes
whole blocks' adapters, adapters merge away, and bad input leaves the model as it was."""

import copy

import pytest
import torch
from torch import nn

from forgetcore.evaluation import unlearning as ev
from forgetcore.unlearning import UnlearnData
from forgetcore.unlearning.gslora import GSLoRA, GSLoRAPlusPlus

SEEDS = (0, 1, 2)  # chosen before looking


@pytest.fixture(scope="module")
def setups():
    torch.set_num_threads(1)
    out = {}
    for s in SEEDS:
        data = ev.full_class("digits", [0, 1], s)
        out[s] = (data, ev.train_original(data, "resmlp", s, epochs=20))
    return out


def test_claim_forgets_classes_keeps_the_rest_and_group_weight_sparsifies(setups):
    """Measured (seeds 0-2): alpha 0 forgets classes 0 and 1 fully (test accuracy 0.0) with kept-class
    accuracy 0.955-0.965 (original 0.94-0.96); alpha 0.1 shrinks every block's adapter norm and
    drives three of four blocks to ~0 on 2 of 3 seeds (none on seed 0). At alpha 0.1 forgetting
    competes with sparsity (one seed keeps one of the two classes), so it is asserted at alpha 0."""
    near_zero = {0.0: 0, 0.1: 0}
    for s in SEEDS:
        data, model = setups[s]
        orig = ev.evaluate(model, data)
        norms = {}
        for a in (0.0, 0.1):
            m = copy.deepcopy(model)
            info = GSLoRA(alpha=a, seed=s).fit(m, data)
            assert all(type(mod) is nn.Linear for mod in (m.blocks[0].fc1, m.blocks[0].fc2))  # merged away
            res = ev.evaluate(m, data)
            norms[a] = info["group_norms"]
            near_zero[a] += sum(v < 0.05 for v in norms[a].values())
            print(f"\nseed {s} alpha {a}: forget {res['test_forget_acc']:.3f} kept {res['test_retain_acc']:.3f} "
                  f"norms {({k: round(v, 3) for k, v in norms[a].items()})}")
            if a == 0.0:
                assert res["test_forget_acc"] <= 0.05
                assert res["test_retain_acc"] >= orig["test_retain_acc"] - 0.03
        assert set(norms[0.0]) == {f"blocks.{i}" for i in range(4)}
        assert sum(norms[0.1].values()) < 0.9 * sum(norms[0.0].values())
    assert near_zero[0.0] == 0 and near_zero[0.1] >= 3


def test_groupings_and_prototype_term(setups):
    data, model = setups[0]
    m = copy.deepcopy(model)
    gs = GSLoRA(grouping="matrix", epochs=1)
    loras = gs._inject(m)
    assert len(gs.groups(loras)) == 16 and len(GSLoRA(grouping="lora").groups(loras)) == 8
    assert len(GSLoRA(grouping="block").groups(loras)) == 4
    gs._unwrap(m, loras)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))
    pp = GSLoRAPlusPlus(epochs=2, seed=0)
    protos = pp._prototypes(model, data)
    assert protos.shape == (10, 64) and bool((protos.abs().sum(1) > 0).all())
    m = copy.deepcopy(model)
    info = pp.fit(m, data)
    assert info["method"] == "GS-LoRA++" and info["best_epoch"] is not None  # chosen on validation
    with pytest.raises(ValueError, match="^prototype_weight: GS-LoRA\\+\\+ needs"):
        GSLoRAPlusPlus(prototype_weight=0.0)


@pytest.mark.slow
def test_sequential_forgetting_tasks(setups):
    data, model = setups[1]
    x = torch.cat([data.forget.tensors[0], data.retain.tensors[0]])
    y = torch.cat([data.forget.tensors[1], data.retain.tensors[1]])
    t1 = data
    f2, r2 = torch.isin(y, torch.tensor([2, 3])), ~torch.isin(y, torch.tensor([0, 1, 2, 3]))
    xv = torch.cat([data.forget_val.tensors[0], data.retain_val.tensors[0]])
    yv = torch.cat([data.forget_val.tensors[1], data.retain_val.tensors[1]])
    fv, rv = torch.isin(yv, torch.tensor([2, 3])), ~torch.isin(yv, torch.tensor([0, 1, 2, 3]))
    td = torch.utils.data.TensorDataset
    t2 = UnlearnData(forget=td(x[f2], y[f2]), retain=td(x[r2], y[r2]), forget_val=td(xv[fv], yv[fv]),
                     retain_val=td(xv[rv], yv[rv]), test=data.test, forget_classes=(2, 3))
    m = copy.deepcopy(model)
    infos = GSLoRA(alpha=0.0, seed=1).fit_sequence(m, [t1, t2])
    assert len(infos) == 2
    both = ev.evaluate(m, UnlearnData(forget=t2.forget, retain=t2.retain, test=data.test, forget_classes=(0, 1, 2, 3)))
    assert both["test_forget_acc"] <= 0.1 and both["test_retain_acc"] >= 0.85


def test_bad_input_leaves_the_model_unchanged(setups):
    data, model = setups[0]
    m = copy.deepcopy(model)
    before = copy.deepcopy(m.state_dict())
    for kw, msg in ((dict(grouping="x"), "^grouping: "), (dict(r=0), "^r: "), (dict(hinge="x"), "^hinge: "),
                    (dict(target_modules=()), "^target_modules: "), (dict(replay=0.0), "^replay: ")):
        with pytest.raises(ValueError, match=msg):
            GSLoRA(**kw)
    with pytest.raises(ValueError, match="^target_modules: no nn.Linear"):
        GSLoRA(target_modules=("attn",)).fit(m, data)
    x, y = data.forget.tensors
    bad = UnlearnData(forget=torch.utils.data.TensorDataset(x, y + 100), retain=data.retain)
    with pytest.raises(IndexError):  # a label outside the head fails inside training: adapters are removed
        GSLoRA(epochs=1).fit(m, bad)
    assert list(m.state_dict()) == list(before)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(TypeError, match="^data: expected an UnlearnData"):
        GSLoRA().fit(m, None)
    with pytest.raises(ValueError, match="^tasks: expected at least one"):
        GSLoRA().fit_sequence(m, [])
