"""The bad-input matrix of selective fine-tuning (``forgetcore.finetune``) and of the continual
methods k-FPF, DER++/Refresh and the MoE simulation: every constructor argument and every
``load_state_dict`` field, through the one assertion ``badinput.expect_clean_error`` (error type,
the argument named, the object and the model bit-identical after the raise)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from badinput import expect_clean_error
from forgetcore.continual.kfpf import KFPF
from forgetcore.continual.moe import forgetting_generalisation, simulate
from forgetcore.continual.refresh import DERpp, Refresh
from forgetcore.finetune import HFT, FinetunePlugin, GatedMLP, GeRe, GeReCallback, GeRePlugin, KappaTune, RegLoRA
from forgetcore.finetune.asd import diversify

NAN, INF = float("nan"), float("inf")


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4))


def flags(model):
    return lambda: [p.requires_grad for p in model.parameters()]


KAPPA = {"0.weight": 3.0, "2.weight": 5.0, "4.weight": 2.0}


# --- KappaTune -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, arg", [
    ({"k": 1, "select": "bogus"}, "select"),
    ({"k": 1, "select": 3}, "select"),
    ({"k": -5}, "k"),
    ({"k": 0}, "k"),
    ({"k": 1.5}, "k"),
    ({"k": True}, "k"),
    ({"k": 4}, "k"),  # more than the 3 eligible weights
    ({"k": 1, "fraction": 0.5}, "k"),
    ({"fraction": NAN}, "fraction"),
    ({"fraction": 0.0}, "fraction"),
    ({"k": 1, "seed": -1}, "seed"),
    ({"k": 1, "seed": 1.5}, "seed"),
    ({"k": 1, "kappa": {"0.weight": 3.0, "2.weight": 5.0}}, "kappa"),  # shorter than the eligible weights
    ({"k": 1, "kappa": dict(KAPPA, **{"2.weight": NAN})}, "kappa"),
    ({"k": 1, "kappa": dict(KAPPA, **{"2.weight": -1.0})}, "kappa"),
    ({"k": 1, "kappa": dict(KAPPA, **{"2.weight": "big"})}, "kappa"),
    ({"k": 1, "kappa": [3.0, 5.0, 2.0]}, "kappa"),
    ({"k": 1, "kappa": KAPPA, "trainable_extra": [3]}, "trainable_extra"),
    ({"k": 1, "kappa": KAPPA, "trainable_extra": ["nope"]}, "trainable_extra"),
    ({"k": 1, "kappa": KAPPA, "lora": "r=8"}, "lora"),
])
def test_kappatune_constructor(kwargs, arg):
    model = mlp()
    kwargs = {"kappa": KAPPA, "progress": False, **kwargs}
    expect_clean_error(lambda: KappaTune(model, **kwargs), arg=arg, state=[model, flags(model)])


def test_kappatune_model_and_json_cache(tmp_path):
    expect_clean_error(lambda: KappaTune("model", k=1), arg="model")
    path = tmp_path / "kappa.json"
    path.write_text('{"0.weight": 3.0, "2.weight": NaN, "4.weight": 2.0}')
    model = mlp()
    expect_clean_error(lambda: KappaTune(model, k=1, kappa=path), arg="kappa", state=[model, flags(model)])


def _kappatune_states():
    kt = KappaTune(mlp(), k=2, kappa=KAPPA, select="random", seed=4, progress=False)
    good = kt.state_dict()
    return good, [
        ("not a dict", [1, 2]),
        ("missing key", {k: v for k, v in good.items() if k != "k"}),
        ("kappa shorter than names", dict(good, kappa=good["kappa"][:2])),
        ("kappa NaN", dict(good, kappa=torch.tensor([3.0, NAN, 2.0], dtype=torch.float64))),
        ("kappa negative", dict(good, kappa=torch.tensor([3.0, -5.0, 2.0], dtype=torch.float64))),
        ("kappa float32", dict(good, kappa=good["kappa"].float())),
        ("kappa a list", dict(good, kappa=[3.0, 5.0, 2.0])),
        ("duplicate names", dict(good, names=["0.weight", "0.weight", "4.weight"])),
        ("unknown name", dict(good, names=["0.weight", "9.weight", "4.weight"])),
        ("a bias as a name", dict(good, names=["0.weight", "0.bias", "4.weight"])),
        ("select bogus", dict(good, select="bogus")),
        ("k negative", dict(good, k=-5)),
        ("k zero", dict(good, k=0)),
        ("k too large", dict(good, k=4)),
        ("k float", dict(good, k=1.5)),
        ("seed negative", dict(good, seed=-1)),
        ("selected not the ranking", dict(good, selected=list(reversed(good["selected"])))),
        ("selected unknown", dict(good, selected=["nope.weight", good["selected"][1]])),
        ("selected shorter than k", dict(good, selected=good["selected"][:1])),
        ("trainable_extra unknown", dict(good, trainable_extra=["nope"])),
        ("trainable_extra not names", dict(good, trainable_extra=[1])),
    ]


@pytest.mark.parametrize("case", range(len(_kappatune_states()[1])), ids=[c for c, _ in _kappatune_states()[1]])
def test_kappatune_load_state_dict(case):
    _, cases = _kappatune_states()
    model = mlp(1)
    kt = KappaTune(model, k=1, kappa=KAPPA, progress=False)
    expect_clean_error(lambda: kt.load_state_dict(cases[case][1]), arg="state",
                       state=[kt.state_dict, model, flags(model)])


@given(n=st.integers(0, 2), pos=st.integers(0, 2), value=st.sampled_from([NAN, -INF, 0.0, -1e-300]))
def test_kappatune_load_rejects_any_bad_kappa_anywhere(n, pos, value):
    good, _ = _kappatune_states()
    model = mlp(1)
    kt = KappaTune(model, k=1, kappa=KAPPA, progress=False)
    kap = good["kappa"].clone()
    kap[pos] = value
    bad = dict(good, kappa=kap[:3 - n] if n else kap)  # a bad value, or also too few values
    expect_clean_error(lambda: kt.load_state_dict(bad), arg="state", state=[kt.state_dict, flags(model)])


# --- the finetune methods and their adapters -----------------------------------------------------

@pytest.mark.parametrize("make, arg", [
    (lambda: HFT(seed=-1), "seed"),
    (lambda: HFT(seed=0.5), "seed"),
    (lambda: HFT(layers=3), "layers"),
    (lambda: RegLoRA(target_modules=[]), "target_modules"),
    (lambda: RegLoRA(target_modules=["q"], r=0), "r"),
    (lambda: RegLoRA(target_modules=["q"], top=NAN), "top"),
    (lambda: RegLoRA(target_modules=["q"], top=1.5), "top"),
    (lambda: RegLoRA(target_modules=["q"], lam=-1.0), "lam"),
    (lambda: RegLoRA(target_modules=["q"], lora_alpha=INF), "lora_alpha"),
    (lambda: RegLoRA(target_modules=["q"], n_modules=0), "n_modules"),
    (lambda: GeRe(torch.randn(0, 8), torch.zeros(0, dtype=torch.long), features="0"), "general_x"),
    (lambda: GeRe(torch.full((3, 8), NAN), torch.zeros(3, dtype=torch.long), features="0"), "general_x"),
    (lambda: GeRe(torch.randn(3, 8).half().int(), torch.zeros(3, dtype=torch.long), features="0"), "general_x"),
    (lambda: GeRe(torch.randn(3, 8), torch.zeros(2, dtype=torch.long), features="0"), "general_y"),
    (lambda: GeRe(torch.randn(3, 8), torch.zeros(3), features="0"), "general_y"),
    (lambda: GeRe(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), features=0), "features"),
    (lambda: GeRe(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), features="0", w="fast"), "w"),
    (lambda: GeRe(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), features="0", w=-1.0), "w"),
    (lambda: GeRe(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), features="0", w=NAN), "w"),
    (lambda: GeRe(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), features="0", k=-1), "k"),
    (lambda: FinetunePlugin(object()), "method"),
    (lambda: GeRePlugin(HFT()), "method"),
    (lambda: GeReCallback(HFT()), "method"),
])
def test_finetune_constructors(make, arg):
    expect_clean_error(make, arg=arg)


def test_prepare_on_a_wrong_model_changes_nothing():
    model = mlp()
    expect_clean_error(lambda: HFT().prepare(model), arg="model", state=[model, flags(model)])
    gere = GeRe(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), features="9")
    expect_clean_error(lambda: gere.prepare(model), arg="features", state=[model, flags(model), gere.state_dict])
    expect_clean_error(lambda: HFT().prepare("llama"), arg="model")


def _gere():
    x = torch.randn(4, 8)
    gere = GeRe(x, torch.zeros(4, dtype=torch.long), features="1", w="dy", k=1, seed=2)
    gere.prepare(mlp())
    return gere


def _method_states():
    """(name, object factory, bad states) for every finetune state_dict."""
    hft = HFT(seed=1)
    hft.prepare(GatedMLP(d=8, n_layers=2))
    h = hft.state_dict()
    r = {"stage": 1, "seed": 0, "keys": {"0": torch.tensor([1, 5], dtype=torch.long)}}
    g = _gere().state_dict()
    return [
        ("hft", lambda: HFT(seed=3), [
            {"seed": 1}, dict(h, seed=-1), dict(h, seed=1.5), dict(h, stage="1"), dict(h, stage=-2),
            dict(h, trainable="layers.0.mlp.up_proj"), dict(h, trainable=[1]), dict(h, stage=-1)]),
        ("reglora", lambda: RegLoRA(target_modules=["0"]), [
            {"stage": 0}, dict(r, seed=-1), dict(r, stage=0.5), dict(r, keys=[1, 5]),
            dict(r, keys={"0": torch.tensor([1.0, 5.0])}), dict(r, keys={"0": torch.tensor([[1, 5]])}),
            dict(r, keys={"0": torch.tensor([-1, 5])})]),
        ("gere", lambda: GeRe(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), features="1"), [
            {"w": 1.0}, dict(g, w="fast"), dict(g, w=NAN), dict(g, w=-1.0), dict(g, k=-1), dict(g, seed=1.5),
            dict(g, ref=g["ref"][:3]), dict(g, ref=[t.double() for t in g["ref"]]),
            dict(g, pos_thr=torch.full_like(g["pos_thr"], NAN)), dict(g, neg_thr=g["neg_thr"][:5]),
            dict(g, ref=[]), dict(g, ref=torch.stack(g["ref"]))]),
        ("plugin", lambda: FinetunePlugin(HFT(seed=3)), [
            {"method": h}, {"prepared": "yes", "method": h}, {"prepared": True, "method": dict(h, seed=-1)}]),
        ("gere-callback", lambda: GeReCallback(GeRe(torch.randn(4, 8), torch.zeros(4, dtype=torch.long),
                                                    features="1")), [
            {"drawn": 1}, {"drawn": -1, "method": g}, {"drawn": 1.5, "method": g},
            {"drawn": 2, "method": dict(g, k=-1)}]),
    ]


_CASES = [(name, i) for name, _, bad in _method_states() for i in range(len(bad))]


@pytest.mark.parametrize("name, i", _CASES, ids=[f"{n}-{i}" for n, i in _CASES])
def test_finetune_load_state_dict(name, i):
    _, make, bad = next(m for m in _method_states() if m[0] == name)
    obj = make()
    expect_clean_error(lambda: obj.load_state_dict(bad[i]), arg="state", state=[obj.state_dict])


def test_good_states_still_load():
    for _name, make, _ in _method_states():
        src = make()
        make().load_state_dict(src.state_dict())  # the checks accept what state_dict writes
    gere = _gere()
    other = GeRe(gere.general_x, gere.general_y, features="1")
    other.load_state_dict(gere.state_dict())
    assert torch.equal(other.pos_thr, gere.pos_thr) and other.w == "dy"


@given(percent=st.sampled_from([NAN, -1.0, 100.5, INF]))
def test_asd_percent(percent):
    records = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)]
    expect_clean_error(lambda: diversify(records, percent), arg="percent", state=[lambda: records])


def test_asd_records_and_seed():
    expect_clean_error(lambda: diversify("text", 10), arg="records")
    expect_clean_error(lambda: diversify([{"question": "q"}], 10), arg="records")
    expect_clean_error(lambda: diversify([{"question": "q", "answer": "a"}], 10, seed=-1), arg="seed")


# --- continual: k-FPF, DER++, Refresh, MoE -------------------------------------------------------

@pytest.mark.parametrize("make, arg", [
    (lambda: KFPF(0), "capacity"),
    (lambda: KFPF(10, total_steps=0), "total_steps"),
    (lambda: KFPF(10, k=0), "k"),
    (lambda: KFPF(10, k=2.5), "k"),
    (lambda: KFPF(10, n_ft=-1), "n_ft"),
    (lambda: KFPF(10, lr=NAN), "lr"),
    (lambda: KFPF(10, lr=0.0), "lr"),
    (lambda: KFPF(10, batch_size=0), "batch_size"),
    (lambda: KFPF(10, n_prone=0), "n_prone"),
    (lambda: KFPF(10, prone="8"), "prone"),
    (lambda: KFPF(10, variant="mse"), "variant"),
    (lambda: KFPF(10, variant=1), "variant"),
    (lambda: KFPF(10, alpha=-0.5), "alpha"),
    (lambda: KFPF(10, seed=-1), "seed"),
    (lambda: DERpp(0), "capacity"),
    (lambda: DERpp(10, alpha=NAN), "alpha"),
    (lambda: DERpp(10, beta=-1.0), "beta"),
    (lambda: DERpp(10, batch_size=0), "batch_size"),
    (lambda: Refresh(delta=-1.0), "delta"),
    (lambda: Refresh(delta=INF), "delta"),
    (lambda: Refresh(tau=NAN), "tau"),
    (lambda: Refresh(lr_unlearn=0.0), "lr_unlearn"),
    (lambda: Refresh(seed=1.5), "seed"),
])
def test_continual_constructors(make, arg):
    expect_clean_error(make, arg=arg)


def _continual_states():
    kf = KFPF(20, seed=1)
    kf.buffer.add(x=torch.randn(5, 3), y=torch.zeros(5, dtype=torch.long), logits=torch.zeros(5, 4))
    k = kf.state_dict()
    rf = Refresh(seed=2)
    rf.fisher = {"0.weight": torch.ones(3, 3)}
    r = rf.state_dict()
    d = DERpp(20, seed=1).state_dict()
    return [
        ("kfpf", lambda: KFPF(20, seed=3), [
            {"period": 1}, dict(k, period=-1), dict(k, period=2.5), dict(k, replay_examples=-3),
            dict(k, gen=torch.zeros(3, dtype=torch.uint8)), dict(k, gen=k["gen"].long()),
            dict(k, calls=["0"]), dict(k, drift=[{"0": NAN}]), dict(k, drift=[{"0": -1.0}]),
            dict(k, last_state={"0.weight": 1.0}), dict(k, buffer={})]),
        ("refresh", lambda: Refresh(seed=4), [
            {"gen": r["gen"]}, dict(r, gen=r["gen"][:10]), dict(r, fisher={"0.weight": torch.full((3,), NAN)}),
            dict(r, fisher={"0.weight": -torch.ones(3)}), dict(r, fisher={"0.weight": torch.ones(3, dtype=torch.long)}),
            dict(r, fisher=[torch.ones(3)])]),
        ("derpp", lambda: DERpp(20, seed=2), [{}, {"buffer": {}}, [d]]),
    ]


_CCASES = [(name, i) for name, _, bad in _continual_states() for i in range(len(bad))]


@pytest.mark.parametrize("name, i", _CCASES, ids=[f"{n}-{i}" for n, i in _CCASES])
def test_continual_load_state_dict(name, i):
    _, make, bad = next(m for m in _continual_states() if m[0] == name)
    obj = make()
    expect_clean_error(lambda: obj.load_state_dict(bad[i]), arg="state", state=[obj.state_dict])


def test_continual_good_states_still_load():
    for _, make, _ in _continual_states():
        make().load_state_dict(make().state_dict())


@pytest.mark.parametrize("kwargs, arg", [
    ({"n_experts": 0}, "n_experts"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [-1]}, "seeds"),
    ({"d": 10, "s": 10}, "s"),
    ({"n_tasks": 0}, "n_tasks"),
    ({"d": 5, "s": 2, "n_tasks": 6}, "n_tasks"),
    ({"rounds": 1}, "rounds"),
    ({"lr": 0.0}, "lr"),
    ({"lr": NAN}, "lr"),
    ({"noise": -0.1}, "noise"),
    ({"beta": 0.0}, "beta"),
    ({"sigma": INF}, "sigma"),
    ({"terminate_after": 0}, "terminate_after"),
])
def test_moe_simulate(kwargs, arg):
    expect_clean_error(lambda: simulate(**{"n_experts": 2, "seeds": [0], "rounds": 4, **kwargs}), arg=arg)


def test_moe_metrics():
    import numpy as np

    end = np.ones((2, 5))
    expect_clean_error(lambda: forgetting_generalisation(np.ones((2, 4)), end), arg="err_now")
    bad = end.copy()
    bad[1, 2] = math.nan
    expect_clean_error(lambda: forgetting_generalisation(bad, end), arg="err_now",
                       state=[lambda: torch.from_numpy(bad)])
