"""CUPID on the spec's biased digits (a spurious class code appended to the pixels; 5 % of the
training examples carry a wrong code): the sharpness partition, the shortcut that plain gradient
ascent leaves behind, and CUPID's routed ascent."""

import copy
import statistics

import pytest
import torch

from forgetcore.evaluation import unlearning as ev
from forgetcore.training import fit_epochs
from forgetcore.unlearning import CUPID, UnlearnData
from forgetcore.unlearning.cupid import sharpness

SEEDS = (0, 1, 2, 3, 4)  # chosen before looking; the effect is noisy


@pytest.fixture(scope="module")
def setups():
    torch.set_num_threads(1)
    out = {}
    for s in SEEDS:
        sc = ev.biased("digits", 3, s)
        model = ev.make_model("mlp", (sc["n_features"],), 10, s)
        fit_epochs(model, sc["data"].full(s), epochs=20, lr=1e-3, batch_size=64, seed=s)
        out[s] = (sc, model)
    return out


def test_sharp_forget_examples_are_the_bias_conflicting_ones(setups):
    """Measured: the sharpest 10 % hold 31-54 % bias-conflicting examples against a base rate of 3-9 %."""
    for s in SEEDS:
        sc, model = setups[s]
        x, y = sc["data"].forget.tensors
        idx, w = CUPID(eta=0.05, k=0.1).partition(model, x, y)
        conf = ~sc["forget_aligned"]
        assert float(conf[idx].float().mean()) >= 4 * float(conf.float().mean())
        assert float(w[conf].mean()) > 5 * float(w[~conf].mean())
    before = [p.clone() for p in model.parameters()]
    sharpness(model, x, y, 0.05)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched


def test_claim_routed_ascent_forgets_both_groups_and_ga_leaves_the_shortcut(setups):
    """Kwon et al. 2026, in miniature, at matched forgetting (ascent until half the forget set is wrong).

    Holds on every seed: plain GA leaves the bias-aligned test examples of the class far more
    recognised than the conflicting ones (the shortcut is "easy to learn, hard to forget"), and CUPID
    lowers forget accuracy on both groups. Does NOT hold robustly at this scale: that CUPID's
    aligned/conflicting gap is smaller than GA's (measured mean 0.34 vs 0.39 over these seeds, CUPID
    smaller on 3 of 5), so the gap is printed, not asserted."""
    gaps = {"ga": [], "cupid": []}
    for s in SEEDS:
        sc, model = setups[s]
        orig = ev.group_accuracy(model, sc)
        for mode in ("ga", "cupid"):
            m = copy.deepcopy(model)
            info = CUPID(mode=mode, lr=0.003, steps=300, target_forget_acc=0.5).fit(m, sc["data"])
            g = ev.group_accuracy(m, sc)
            assert info["steps"] < 300  # reached the matched forget accuracy
            assert g["kept_test_acc"] >= orig["kept_test_acc"] - 0.05
            gaps[mode].append(g["gap_test"])
            if mode == "ga":
                assert g["fa_test_aligned"] > g["fa_test_conflicting"] + 0.1
            else:
                assert g["fa_test_aligned"] < orig["fa_test_aligned"] - 0.3
                assert g["fa_test_conflicting"] < orig["fa_test_conflicting"] - 0.5
                assert 0.3 < info["mask_fraction"] < 0.7
    print(f"\naligned/conflicting test gap: GA {gaps['ga']} (mean {statistics.mean(gaps['ga']):.3f}), "
          f"CUPID {gaps['cupid']} (mean {statistics.mean(gaps['cupid']):.3f})")


def test_bad_input_leaves_the_model_unchanged(setups):
    sc, model = setups[0]
    m = copy.deepcopy(model)
    before = [p.clone() for p in m.parameters()]
    for kw, msg in ((dict(eta=0.0), "^eta: "), (dict(k=0.0), "^k: "), (dict(mode="x"), "^mode: "),
                    (dict(omega="x"), "^omega: "), (dict(mask_fraction=2.0), "^mask_fraction: ")):
        with pytest.raises(ValueError, match=msg):
            CUPID(**kw)
    x, y = sc["data"].forget.tensors
    bad = UnlearnData(forget=torch.utils.data.TensorDataset(torch.full_like(x, float("nan")), y),
                      retain=sc["data"].retain)
    with pytest.raises(ValueError, match="^data: the forget set has non-finite"):
        CUPID().fit(m, bad)
    with pytest.raises(TypeError, match="^model: "):
        CUPID().fit(None, sc["data"])
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
