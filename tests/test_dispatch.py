"""The primitives' layer: one dispatch helper that logs every choice and its reason, the same
behaviour on every branch, typed CUDA errors and private launchers, named FFI results, and the
power-law weight as a public function."""

from __future__ import annotations

import logging

import pytest
import torch

from forgetcore import _backend, _core, _cuda, importance, kvscore, spectral, subspace
from forgetcore.power_law import PowerLawScheduler, power_law_weight
from forgetcore.replay import ClassBalancedReservoir, ReservoirBuffer
from forgetcore.replay import PowerLawScheduler as ReExported


def _choices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "forgetcore.dispatch"]


def test_dispatch_rule_and_reason(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="forgetcore.dispatch")
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert _backend.dispatch("fam.op", cpu) == _backend.RUST
    assert _backend.dispatch("fam.op", meta) == _backend.REFERENCE
    assert _backend.dispatch("fam.op", cpu, unsupported="x is float64") == _backend.REFERENCE
    monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    assert _backend.dispatch("fam.op", cpu) == _backend.REFERENCE
    assert _choices(caplog) == [
        "fam.op -> rust: cpu tensors",
        "fam.op -> reference: no kernel for meta tensors",
        "fam.op -> reference: the rust kernel does not take these inputs: x is float64",
        "fam.op -> reference: FORGETCORE_BACKEND=reference",
    ]


def test_fallbacks_are_logged_with_their_reason(caplog):
    caplog.set_level(logging.DEBUG, logger="forgetcore.dispatch")
    acc = torch.zeros(6, 4).T  # not contiguous
    importance.accumulate_([acc], [torch.ones(4, 6)])
    assert torch.equal(acc, torch.ones(4, 6))
    scores = torch.zeros(1, 2, 8).transpose(1, 2).contiguous().transpose(1, 2)  # strided
    kvscore.accumulate_(scores, torch.full((1, 2, 1, 8), 0.125), alpha=1.0)
    spectral.kappa([torch.eye(3, dtype=torch.float64)])
    g = torch.zeros(2, 8)[:, 0]  # stride 8
    subspace.project_out_flat_(g, torch.zeros(0, 2))
    got = _choices(caplog)
    assert any(m.startswith("importance.accumulate_ -> reference:") and "acc[0] is not contiguous" in m for m in got)
    assert any(m.startswith("kvscore.accumulate_ -> reference:") and "scores is not contiguous" in m for m in got)
    assert any(m.startswith("spectral.kappa -> reference:") and "float64" in m for m in got)
    assert any(m.startswith("subspace.project_out_flat_ -> reference:") and "g is not contiguous" in m
               for m in got)


@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_accumulate_bumps_the_version_counter_on_every_branch(monkeypatch, backend):
    if backend == "reference":
        monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    acc = torch.zeros(100)
    v0 = acc._version
    importance.accumulate_([acc], [torch.ones(100)])
    assert acc._version > v0
    p = torch.ones(100)
    v0 = p._version
    importance.ssd_dampen_([p], [torch.ones(100)], [torch.full((100,), 4.0)], alpha=1.0)
    assert p._version > v0


def test_cuda_errors_are_typed_and_the_launchers_private():
    assert issubclass(_cuda.CudaUnavailableError, RuntimeError)
    assert issubclass(_cuda.CudaCompileError, RuntimeError)
    assert _cuda.CudaUnavailableError is _core.CudaUnavailableError
    raw = ["cuda_accumulate_", "cuda_ssd_dampen_", "cuda_find_invalid", "cuda_kv_accumulate_",
           "cuda_kv_select_keep", "cuda_kv_evict_one"]
    for name in raw:
        assert not hasattr(_core, name)
        assert callable(getattr(_core, "_" + name))
        assert "_" + name not in _core.__all__
    assert {"CudaUnavailableError", "CudaCompileError"} <= set(_core.__all__)


def test_compile_error_carries_the_nvrtc_log():
    try:
        _cuda.load_nvrtc()
    except _cuda.CudaUnavailableError as e:
        pytest.skip(f"no libnvrtc here: {e}")
    # An arch NVRTC rejects is an argument error, not a compile error; a bad source cannot be
    # injected from Python, so this checks the type exists with its log attribute documented.
    assert "log" in _core.CudaCompileError.__doc__


def test_named_state_across_the_ffi():
    buf = ReservoirBuffer(4, seed=1)
    buf.add(x=torch.arange(6))
    st = buf._core.get_state()
    assert set(st) == {"seen", "rng"} and st["seen"] == 6 and len(st["rng"]) == 4
    cb = ClassBalancedReservoir(4, seed=1)
    cb.add(x=torch.arange(6), y=torch.tensor([0, 0, 1, 1, 2, 2]))
    st = cb._core.get_state()
    assert set(st) == {"seen", "rng", "labels", "n_seen", "full", "offsets", "slots"}
    assert st["labels"].tolist() == [0, 1, 2] and st["n_seen"].tolist() == [2, 2, 2]


def test_reservoir_refuses_a_count_that_would_wrap():
    buf = ReservoirBuffer(10, seed=0)
    buf.add(x=torch.arange(10))
    sd = buf.state_dict()
    sd["seen"] = 2**64 - 2
    with pytest.raises(ValueError, match=r"^state_dict\['seen'\]: expected an int in \[0, 9223372036854775807\]"):
        buf.load_state_dict(sd)
    assert buf.seen == 10 and len(buf) == 10  # unchanged
    sd["seen"] = 2**63 - 3
    buf.load_state_dict(sd)
    before = buf.state_dict()
    with pytest.raises(ValueError, match="^batch: 4 more items would overflow"):
        buf.add(x=torch.arange(4))
    after = buf.state_dict()
    assert after["seen"] == before["seen"] and torch.equal(after["rng"], before["rng"])
    assert torch.equal(after["fields"]["x"], before["fields"]["x"])


def test_power_law_weight_is_public_and_checked():
    assert ReExported is PowerLawScheduler
    w = power_law_weight(torch.tensor([1.0, 3.0]), c=1.0, d=1.0)
    assert w.dtype == torch.float64 and w.tolist() == [0.5, 0.25]
    assert float(power_law_weight(2, c=0.0, d=0.5)) == pytest.approx(2**-0.5)
    assert PowerLawScheduler(10, c=2.0, d=0.5).g(3.0).item() == pytest.approx(5**-0.5)
    for bad in (-5, float("nan"), torch.tensor([1.0, float("inf")])):
        with pytest.raises(ValueError, match="^delta: expected finite ages >= 0"):
            power_law_weight(bad)
        with pytest.raises(ValueError, match="^delta: "):
            PowerLawScheduler(10).g(bad)
    with pytest.raises(ValueError, match="^delta: expected ages > 0 when c = 0"):
        power_law_weight(0.0, c=0.0, d=0.5)
    with pytest.raises(TypeError, match="^delta: "):
        power_law_weight("3")
    with pytest.raises(ValueError, match="^d: "):
        power_law_weight(1.0, d=-1.0)


def test_find_invalid_importance_returns_a_named_result():
    import numpy as np

    ok = np.ones(10, dtype=np.float32)
    bad = np.ones(10, dtype=np.float32)
    bad[7] = -2.0
    assert _core.find_invalid_importance([ok]) is None
    found = _core.find_invalid_importance([ok, bad])
    assert (found.tensor, found.index, found.value) == (1, 7, -2.0)
    with pytest.raises(ValueError, match=r"^imp_full\[1\]: expected finite non-negative importances, got -2.0"):
        importance.ssd_dampen_([torch.ones(10), torch.ones(10)], [torch.from_numpy(ok), torch.from_numpy(bad)],
                               [torch.ones(10), torch.ones(10)], alpha=1.0)


def test_cuda_launchers_share_the_importance_contract():
    # The contract runs before anything touches a device, so this holds on any machine: the
    # CUDA launchers refuse exactly what the CPU kernels refuse, with the same messages.
    with pytest.raises(ValueError, match=r"^grads: tensor 0: expected 3 elements, got 4$"):
        _core._cuda_accumulate_(0, 0, 0, [3], [4], _cuda.CHUNK, 1, 1.0, "sq")
    with pytest.raises(ValueError, match=r"^mode: expected 'sq' or 'abs', got \"SQ\"$"):
        _core._cuda_accumulate_(0, 0, 0, [3], [3], _cuda.CHUNK, 1, 1.0, "SQ")
    with pytest.raises(ValueError, match=r"^scale: expected a finite number, got NaN$"):
        _core._cuda_accumulate_(0, 0, 0, [3], [3], _cuda.CHUNK, 1, float("nan"), "sq")
    with pytest.raises(ValueError, match=r"^imp_forget: tensor 0: expected 2 elements, got 3$"):
        _core._cuda_ssd_dampen_(0, 0, 0, [[2], [2], [3]], _cuda.CHUNK, 1, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"^lam: expected a finite number >= 0, got -1$"):
        _core._cuda_ssd_dampen_(0, 0, 0, [[2], [2], [2]], _cuda.CHUNK, 1, 1.0, -1.0, 0)
    # The CPU kernels say the same.
    import numpy as np

    a, g = np.zeros(3, dtype=np.float32), np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^grads: tensor 0: expected 3 elements, got 4$"):
        _core.accumulate_([a], [g], 1.0, "sq")
    with pytest.raises(ValueError, match=r"^mode: expected 'sq' or 'abs', got \"SQ\"$"):
        _core.accumulate_([a], [a.copy()], 1.0, "SQ")
    # The same array written and read is a clear error from the binding, not numpy's panic.
    with pytest.raises(ValueError, match=r"^grads: expected arrays that share no memory"):
        _core.accumulate_([a], [a], 1.0, "sq")
    with pytest.raises(ValueError, match=r"^acc: expected writable arrays that share no memory"):
        _core.accumulate_([a, a], [a.copy(), a.copy()], 1.0, "sq")
    with pytest.raises(ValueError, match=r"^imp_forget: expected arrays that share no memory"):
        _core.ssd_dampen_([a], [a.copy()], [a], 1.0, 1.0)
    g2 = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"^bases: expected arrays that share no memory"):
        _core.project_out_([g2], [g2], False)
    assert not a.any() and not g2.any()
