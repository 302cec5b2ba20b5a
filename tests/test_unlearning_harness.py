"""Unlearning harness: scenarios, metrics (accuracies, entropy and loss MIAs), baselines, compare, demo."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from forgetcore import cli
from forgetcore.demos import DEMOS
from forgetcore.evaluation import unlearning as ev
from forgetcore.unlearning import SSD, GradientAscent, RetainFinetune, Retrain, UnlearnData


@pytest.fixture(scope="module")
def full():
    data = ev.full_class("digits", 3, 0)
    return data, ev.train_original(data, "mlp", 0)


def labels(ds):
    return ds.tensors[1]


def test_full_class_scenario_splits():
    x, y = __import__("forgetcore").datasets.load("digits")
    data = ev.full_class("digits", 3, 0)
    assert (labels(data.forget) == 3).all() and (labels(data.forget_val) == 3).all()
    assert not (labels(data.retain) == 3).any() and not (labels(data.retain_val) == 3).any()
    assert set(labels(data.test).tolist()) == set(range(10))
    n = len(data.forget) + len(data.retain) + len(data.forget_val) + len(data.retain_val) + len(data.test)
    assert n == len(y)
    assert data.forget_classes == (3,)
    assert abs(len(data.forget) - 0.6 * int((y == 3).sum())) <= 1
    two = ev.full_class("digits", [1, 7], 0)
    assert set(labels(two.forget).tolist()) == {1, 7}
    # seeded
    assert torch.equal(ev.full_class("digits", 3, 0).forget.tensors[0], data.forget.tensors[0])
    assert not torch.equal(ev.full_class("digits", 3, 1).forget.tensors[0], data.forget.tensors[0])


def test_random_subset_scenario():
    data = ev.random_subset("digits", 0.1, 0)
    n_train = len(data.forget) + len(data.retain)
    assert len(data.forget) == round(0.1 * n_train)
    assert data.forget_val is None and data.forget_classes is None
    assert len(set(labels(data.forget).tolist())) >= 8  # random, so nearly every class
    mn = ev.random_subset("mnist", 0.1, 0)
    assert mn.forget.tensors[0].shape[1:] == (1, 28, 28)


def test_scenario_and_data_bad_input():
    with pytest.raises(ValueError, match="^forget_class: expected class ids"):
        ev.full_class("digits", 11, 0)
    with pytest.raises(ValueError, match="^fraction: expected a number < 1"):
        ev.random_subset("digits", 1.0, 0)
    with pytest.raises(ValueError, match="^name: expected one of"):
        ev.full_class("cifar", 3, 0)
    with pytest.raises(ValueError, match="^arch: expected 'mlp', 'resmlp' or 'cnn'"):
        ev.make_model("vit")
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    some = TensorDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="^forget: expected a non-empty dataset"):
        UnlearnData(forget=empty, retain=some)
    with pytest.raises(ValueError, match="^retain: expected a Dataset, got None"):
        UnlearnData(forget=some, retain=None)
    with pytest.raises(TypeError, match="^test: expected a torch Dataset"):
        UnlearnData(forget=some, retain=some, test=[1, 2])


def test_full_mixes_retain_and_forget_with_a_seed():
    data = ev.full_class("digits", 3, 0)
    a, b = data.full(0), data.full(1)
    assert len(a) == len(data.forget) + len(data.retain)
    ya = torch.stack([a[i][1] for i in range(len(a))])
    assert int((ya == 3).sum()) == len(data.forget)
    # forget examples spread through the order, not bunched at the end
    pos = torch.nonzero(ya == 3).flatten().float() / len(a)
    assert 0.3 < float(pos.mean()) < 0.7
    yb = torch.stack([b[i][1] for i in range(len(b))])
    assert not torch.equal(ya, yb)
    # the same order whether the parts are TensorDatasets (gathered copy) or any Dataset (Subset)
    plain = UnlearnData(forget=torch.utils.data.Subset(data.forget, range(len(data.forget))),
                        retain=torch.utils.data.Subset(data.retain, range(len(data.retain))))
    c = plain.full(0)
    assert isinstance(c, torch.utils.data.Subset)
    assert torch.equal(torch.stack([c[i][1] for i in range(len(c))]), ya)
    assert torch.equal(torch.stack([c[i][0] for i in range(len(c))]), a.tensors[0])


def test_evaluate_original_and_retrain(full):
    data, model = full
    before = [p.clone() for p in model.parameters()]
    orig = ev.evaluate(model, data)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert set(orig) == {"forget_acc", "retain_acc", "test_acc", "test_forget_acc", "test_retain_acc",
                         "mia_entropy", "mia_loss", "mia_loss_auc"}
    assert all(0.0 <= v <= 1.0 for v in orig.values())
    assert orig["forget_acc"] > 0.9 and orig["test_acc"] > 0.85
    ref = ev.make_model("mlp", (1, 8, 8), 10, 0)
    Retrain(seed=0).fit(ref, data)
    re = ev.evaluate(ref, data)
    assert re["forget_acc"] < 0.05 and re["retain_acc"] > 0.95
    # membership inference: the original still "remembers" the forget set, the retrained model not
    assert orig["mia_entropy"] > re["mia_entropy"] + 0.3
    assert orig["mia_loss"] > re["mia_loss"] + 0.3


def test_mia_helpers():
    # AUC: identical distributions -> 0.5; separated -> 1
    assert ev._auc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5
    assert ev._auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    thr = ev._loss_threshold(np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0]))
    assert 0.3 <= thr < 1.0
    ent = ev._entropy(torch.tensor([[0.0, 0.0], [1e30, -1e30]]))
    assert ent[0] == pytest.approx(math.log(2)) and ent[1] == 0.0
    # LR attack: members with low entropy, non-members high; forget like members -> called members
    m = ev._mia_entropy(np.full(50, 0.01), np.full(50, 1.0), np.full(10, 0.02))
    assert m == 1.0


def test_evaluate_survives_a_wrecked_model(full):
    data, model = full
    broken = ev.make_model("mlp", (1, 8, 8), 10, 0)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(1e30)
    res = ev.evaluate(broken, data)
    assert all(not math.isnan(v) for k, v in res.items() if k != "mia_loss_auc")


def test_baselines_move_the_expected_way(full):
    data, model = full
    orig = ev.evaluate(model, data)
    rows = ev.compare([RetainFinetune(), GradientAscent()], data, model, include_original=False)
    assert [r["method"] for r in rows] == ["RetainFinetune", "GradientAscent"]
    for r in rows:
        assert r["fit_s"] > 0
        assert r["forget_acc"] < orig["forget_acc"] - 0.1
        assert r["test_retain_acc"] > orig["test_retain_acc"] - 0.05


def test_compare_gives_random_subset_ssd_the_retrain_target():
    data = ev.random_subset("digits", 0.1, 0)
    model = ev.train_original(data, "mlp", 0, epochs=10)
    auto = SSD(alpha="auto")
    retrain = Retrain(epochs=10)
    rows = ev.compare([auto, retrain], data, model, reference=retrain)
    assert [r["method"] for r in rows] == ["Original", "SSD", "Retrain"]
    assert rows[1]["target"] == rows[2]["forget_acc"]
    assert auto.target is None  # the caller's object is untouched
    assert "mia_loss_auc" in rows[1] and "alpha" in rows[1]
    table = ev.format_table(rows)
    assert "SSD" in table and "Retrain" in table and "alpha" in table.splitlines()[0]


def test_fit_rejects_bad_arguments(full):
    data, model = full
    for m in (Retrain(), RetainFinetune(), GradientAscent(), SSD()):
        with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
            m.fit("model", data)
    with pytest.raises(ValueError, match="^epochs: expected an int >= 1"):
        Retrain(epochs=0)
    with pytest.raises(ValueError, match="^lr: expected a number > 0"):
        GradientAscent(lr=0.0)


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    assert "unlearn" in DEMOS
    cli.main(["demo", "unlearn", "--quick", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for word in ("digits full-class", "digits random-10%", "Retrain", "RetainFinetune", "GradientAscent",
                 "SSD (auto alpha)", "LF-SSD", "mia_entropy", "mia_loss"):
        assert word in out, word
    assert (tmp_path / "unlearn.png").stat().st_size > 10_000


def _imports(path):
    import ast

    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.add(("." * node.level + (node.module or ""), tuple(a.name for a in node.names)))
        elif isinstance(node, ast.Import):
            out.update((a.name, ()) for a in node.names)
    return out


def test_layering_evaluation_takes_methods_as_arguments():
    """evaluation/unlearning.py imports no method (only the neutral data module); ssd.py no private check."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "python" / "forgetcore"
    for mod, names in _imports(root / "evaluation" / "unlearning.py"):
        if "unlearning" in mod:
            assert mod == "..unlearning.data", (mod, names)
    for path in (root / "unlearning").glob("*.py"):
        for mod, names in _imports(path):
            if mod != "..":  # package-level _checks / _backend are fine; a sibling's private name is not
                assert not any(n.startswith("_") for n in names), (path.name, mod, names)
            assert "baselines" not in mod or path.name == "__init__.py", (path.name, mod)
    # public paths still work
    from forgetcore.unlearning import TRAIN_DEFAULTS as a
    from forgetcore.unlearning.data import TRAIN_DEFAULTS as b
    assert a is b


def test_compare_needs_a_reference_for_a_random_subset_target():
    data = ev.random_subset("digits", 0.1, 0)
    model = ev.make_model("mlp", (1, 8, 8), 10, 0)
    with pytest.raises(ValueError, match="^reference: "):
        ev.compare([SSD(alpha="auto")], data, model)


def test_demo_random_subset_uses_the_official_batch():
    from forgetcore.demos import unlearning as demo

    ssd = [m for m in demo.methods(0, False, "random-10%") if isinstance(m, SSD)]
    assert ssd and all(m.batch_size == 128 for m in ssd)
    ssd = [m for m in demo.methods(0, False, "full-class") if isinstance(m, SSD)]
    assert ssd and all(m.batch_size == 64 for m in ssd)
