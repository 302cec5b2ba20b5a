"""SafeEraser's prompt-decouple term: the spec's mechanism test on two-factor digit prompts (image x
question) with a refusal output. Without PD the model learns to refuse on the question alone (SARR
rises); with PD it refuses only the harmful image + harmful question."""

import copy

import pytest
import torch

from forgetcore.evaluation import unlearning as ev
from forgetcore.training import accuracy, fit_epochs
from forgetcore.unlearning import SafeEraser, UnlearnData

SEEDS = (0, 1, 2)  # chosen before looking


@pytest.fixture(scope="module")
def setups():
    torch.set_num_threads(1)
    out = {}
    for s in SEEDS:
        sc = ev.two_factor("digits", 3, s)
        model = ev.make_model("mlp", (66,), sc["n_outputs"], s)
        fit_epochs(model, sc["pretrain"], epochs=10, lr=1e-3, batch_size=64, seed=s)
        out[s] = (sc, model)
    return out


def test_claim_sarr_rises_without_pd_and_stays_near_zero_with_it(setups):
    """Measured (seeds 0-2): SARR 0.14-0.35 without PD, 0.02-0.04 with PD (lambda 1); harmful prompts
    refused >= 0.94 either way; utility (benign question) unchanged within a point."""
    gaps = []
    for s in SEEDS:
        sc, model = setups[s]
        assert ev.sarr(model, sc["sarr_prompts"], sc["refusal_class"]) == 0.0  # nobody refused before
        res = {}
        for lam in (0.0, 1.0):
            m = copy.deepcopy(model)
            SafeEraser(sc["refusal_class"], sc["decoupled"], lambda_pd=lam, seed=s).fit(m, sc["data"])
            res[lam] = (ev.sarr(m, sc["sarr_prompts"], 10), ev.sarr(m, sc["harmful_test"], 10),
                        accuracy(m, sc["utility_test"]))
        print(f"\nseed {s}: (SARR, harmful refusal, utility) no PD {res[0.0]}, PD {res[1.0]}")
        assert res[0.0][0] >= 0.1 and res[1.0][0] <= 0.06
        assert min(res[0.0][1], res[1.0][1]) >= 0.9
        assert res[1.0][2] >= accuracy(model, sc["utility_test"]) - 0.03
        gaps.append(res[0.0][0] - res[1.0][0])
    assert min(gaps) >= 0.08


def test_sarr_excludes_invalid_judgements(setups):
    sc, model = setups[0]
    m = copy.deepcopy(model)
    with torch.no_grad():
        m[-1].bias[10] += 100.0  # refuse everything
    assert ev.sarr(m, sc["sarr_prompts"], 10) == 1.0
    valid = torch.zeros(len(sc["sarr_prompts"]), dtype=torch.bool)
    valid[:5] = True
    assert ev.sarr(model, sc["sarr_prompts"], 10, valid) == 0.0
    with pytest.raises(ValueError, match="^valid: expected"):
        ev.sarr(model, sc["sarr_prompts"], 10, valid[:3])
    with pytest.raises(ValueError, match="^prompts: no valid judgement"):
        ev.sarr(model, sc["sarr_prompts"], 10, torch.zeros_like(valid))


def test_bad_input_leaves_the_model_unchanged(setups):
    sc, model = setups[0]
    m = copy.deepcopy(model)
    before = [p.clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="^decoupled: lambda_pd > 0 needs"):
        SafeEraser(10)
    with pytest.raises(ValueError, match="^refusal_class: "):
        SafeEraser(-1, lambda_pd=0.0)
    with pytest.raises(ValueError, match="^decoupled: expected finite"):
        SafeEraser(10, torch.full((3, 66), float("nan")))
    with pytest.raises(ValueError, match="^lambda_pd: "):
        SafeEraser(10, sc["decoupled"], lambda_pd=-1.0)
    with pytest.raises(ValueError, match="^refusal_class: 11 is not an output"):
        SafeEraser(11, sc["decoupled"]).fit(m, sc["data"])
    with pytest.raises(TypeError, match="^data: expected an UnlearnData"):
        SafeEraser(10, sc["decoupled"]).fit(m, sc["data"].forget)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert isinstance(sc["data"], UnlearnData)
