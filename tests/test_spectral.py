"""Spectral primitives: Rust (faer) against reference.py, edge cases, the model-level helper."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from forgetcore import _core, reference, spectral


def with_spectrum(m, n, s, seed):
    """float32 A = U diag(s) V^T with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((u * torch.as_tensor(s, dtype=torch.float64)) @ v.T).float()


def close(a, b, rtol):
    a, b = float(a), float(b)
    return (math.isinf(a) and math.isinf(b)) or abs(a - b) <= rtol * abs(b)


@given(m=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 10_000),
       decades=st.floats(0.0, 7.0), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e20]))
def test_kappa_and_singular_values_match_reference(m, n, seed, decades, scale):
    k = min(m, n)
    s = [scale * 10 ** (-decades * i / max(k - 1, 1)) for i in range(k)]
    a = with_spectrum(m, n, s, seed)
    got = spectral.kappa([a])[0]
    want = reference.kappa([a])[0]
    assert close(got, want, 1e-6), (got, want)
    sv, ref = spectral.singular_values([a])[0], reference.singular_values([a])[0]
    assert sv.dtype == torch.float64 and sv.shape == (k,)
    # Every singular value to 1e-6 relative: Auto only keeps Gram results when kappa <= 5e4.
    assert torch.allclose(sv, ref, rtol=1e-6, atol=1e-12 * float(ref[0]))


@given(shapes=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=12),
       seed=st.integers(0, 1000))
def test_many_matrices_keep_their_order(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(m, n, generator=g) for m, n in shapes]
    got, want = spectral.kappa(mats), reference.kappa(mats)
    assert all(close(x, y, 1e-6) for x, y in zip(got.tolist(), want.tolist()))


@pytest.mark.parametrize("method", ["auto", "gram", "svd"])
def test_methods_agree_on_well_conditioned(method):
    a = with_spectrum(50, 30, np.linspace(5.0, 1.0, 30), 0)
    assert close(spectral.kappa([a], method=method)[0], 5.0, 1e-6)


def test_singular_and_degenerate_matrices():
    zero, rank1 = torch.zeros(3, 4), torch.outer(torch.arange(1.0, 4.0), torch.ones(4))
    for method in ("auto", "gram", "svd"):
        assert torch.isinf(spectral.kappa([zero, rank1], method=method)).all()
    assert torch.isinf(reference.kappa([zero, rank1])).all()
    assert spectral.kappa([torch.tensor([[-2.0]])]).item() == 1.0
    assert spectral.kappa([torch.ones(1, 7)]).item() == 1.0  # one row: a single singular value
    assert spectral.singular_values([torch.zeros(0, 5)])[0].numel() == 0
    huge = torch.tensor([[3e38, 0.0], [0.0, 1e38]])
    assert close(spectral.kappa([huge])[0], 3.0, 1e-6)
    tiny = torch.tensor([[1e-44, 0.0], [0.0, 4e-44]])  # float32 subnormals
    assert close(spectral.kappa([tiny])[0], reference.kappa([tiny])[0], 1e-6)


def test_conv_kernels_are_read_as_out_by_rest():
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    want = torch.linalg.svdvals(w.reshape(8, 27).double())
    assert close(spectral.kappa([w])[0], want[0] / want[-1], 1e-6)


def test_half_and_double_inputs():
    a = with_spectrum(20, 10, np.linspace(4.0, 1.0, 10), 1)
    assert close(spectral.kappa([a.bfloat16()])[0], reference.kappa([a.bfloat16().float()])[0], 1e-6)
    assert close(spectral.kappa([a.double()])[0], 4.0, 1e-6)  # float64 goes to the reference


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"^matrices\[1\]: expected a tensor with at least 2 dimensions"):
        spectral.kappa([torch.ones(2, 2), torch.ones(3)])
    with pytest.raises(ValueError, match=r"^matrices\[0\]: expected finite values, got 1 NaN/inf"):
        spectral.kappa([torch.tensor([[1.0, math.nan]])])
    with pytest.raises(ValueError, match=r"^matrices\[0\]: expected finite values"):
        spectral.singular_values([torch.tensor([[math.inf]])])
    with pytest.raises(ValueError, match=r"^matrices\[0\]: expected a non-empty matrix"):
        spectral.kappa([torch.zeros(0, 3)])
    with pytest.raises(TypeError, match=r"^matrices\[0\]: expected float32 or float64"):
        spectral.kappa([torch.ones(2, 2, dtype=torch.int64)])
    with pytest.raises(TypeError, match="^matrices: expected a sequence of tensors"):
        spectral.kappa(torch.ones(2, 2))
    with pytest.raises(ValueError, match="^method: expected one of"):
        spectral.kappa([torch.ones(2, 2)], method="qr")
    with pytest.raises(ValueError, match="^method"):
        _core.spectral_condition_numbers([np.ones((2, 2), np.float32)], "qr")
    with pytest.raises(ValueError, match=r"^matrices\[0\]: expected a C-contiguous array"):
        _core.spectral_condition_numbers([np.ones((4, 4), np.float32)[:, ::2]], "auto")
    with pytest.raises(ValueError, match="^tol"):
        spectral.spectral_norm([torch.ones(2, 2)], tol=0.0)
    with pytest.raises(ValueError, match="^max_iter"):
        spectral.spectral_norm([torch.ones(2, 2)], max_iter=0)


@given(m=st.integers(1, 30), n=st.integers(1, 30), seed=st.integers(0, 1000))
def test_spectral_norm_estimate(m, n, seed):
    # A clear gap (sigma_2 / sigma_1 = 0.5) so tol bounds the error; both paths, against the exact norm.
    k = min(m, n)
    a = with_spectrum(m, n, [2.0] + [1.0] * (k - 1), seed)
    exact = float(torch.linalg.matrix_norm(a.double(), ord=2))
    est = spectral.spectral_norm([a], tol=1e-10, max_iter=500, seed=seed)[0]
    ref = reference.spectral_norm([a], tol=1e-10, max_iter=500, seed=seed)[0][0]
    for x in (est, ref):
        assert abs(float(x) - exact) <= 1e-7 * exact
        assert float(x) <= exact * (1 + 1e-9)  # a lower bound


def test_spectral_norm_reports_nonconvergence(caplog):
    a = with_spectrum(30, 30, np.linspace(1.0, 0.999, 30), 0)  # no gap: slow convergence
    with caplog.at_level("WARNING"):
        spectral.spectral_norm([a], tol=1e-14, max_iter=3)
    assert "did not converge" in caplog.text
    vals, iters, conv = _core.spectral_norm_estimates([a.numpy()], 1e-14, 3, 0)
    assert iters[0] == 3 and not conv[0] and 0.999 * 0.99 < vals[0] <= 1.0 + 1e-6


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.emb = torch.nn.Embedding(100, 16)
        self.fc = torch.nn.Linear(16, 4)
        self.norm = torch.nn.LayerNorm(4)


def test_condition_numbers_of_a_model():
    torch.manual_seed(0)
    net = Net()
    kap = spectral.condition_numbers(net, progress=False)
    assert list(kap) == ["conv.weight", "emb.weight", "fc.weight"]  # 1-D params skipped
    want = reference.kappa([net.conv.weight, net.emb.weight, net.fc.weight]).tolist()
    assert all(close(kap[n], w, 1e-6) for n, w in zip(kap, want))
    assert list(spectral.condition_numbers(net, max_dim=50, progress=False)) == ["conv.weight", "fc.weight"]
    assert list(spectral.condition_numbers(net, include=r"^fc\.", progress=False)) == ["fc.weight"]
    assert list(spectral.condition_numbers(net, include=["emb.weight"], progress=False)) == ["emb.weight"]
    assert list(spectral.condition_numbers(net, include=lambda n: "conv" in n, progress=False)) == ["conv.weight"]
    assert list(spectral.condition_numbers([torch.ones(2, 3), torch.eye(3)], progress=False)) == ["0", "1"]
    assert spectral.condition_numbers({"w": torch.eye(3)}, progress=False) == {"w": 1.0}


def test_condition_numbers_many_batches_match():
    g = torch.Generator().manual_seed(3)
    mats = {f"w{i}": torch.randn(5 + i % 7, 4 + i % 5, generator=g) for i in range(45)}
    got = spectral.condition_numbers(mats, progress=False)
    want = reference.kappa(list(mats.values())).tolist()
    assert list(got) == list(mats) and all(close(got[n], w, 1e-6) for n, w in zip(mats, want))


def test_condition_numbers_bad_input():
    with pytest.raises(ValueError, match=r"^include: \['norm.weight'\] have fewer than 2 dimensions"):
        spectral.condition_numbers(Net(), include=["norm.weight"])
    with pytest.raises(ValueError, match=r"^include: no tensor named \['nope'\]"):
        spectral.condition_numbers(Net(), include=["nope"])
    with pytest.raises(ValueError, match="^model_or_tensors: expected at least one tensor with 2 or more"):
        spectral.condition_numbers(torch.nn.Sequential())
    with pytest.raises(ValueError, match="^model_or_tensors: expected at least one"):
        spectral.condition_numbers(torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"^model_or_tensors\['w'\]: expected finite values"):
        spectral.condition_numbers({"w": torch.tensor([[1.0, math.nan]])})
    with pytest.raises(TypeError, match="^model_or_tensors: expected an nn.Module"):
        spectral.condition_numbers(42)
    with pytest.raises(ValueError, match="^max_dim"):
        spectral.condition_numbers(Net(), max_dim=0)
    with pytest.raises(ValueError, match="^include: expected a regular expression"):
        spectral.condition_numbers(Net(), include="(")


def test_reference_backend_is_forced_by_env(monkeypatch):
    a = with_spectrum(12, 9, np.linspace(7.0, 1.0, 9), 2)
    monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    assert close(spectral.kappa([a])[0], 7.0, 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stay_on_device():
    a = with_spectrum(64, 48, np.linspace(9.0, 1.0, 48), 4)
    got = spectral.condition_numbers({"w": a.cuda()}, progress=False)
    assert close(got["w"], 9.0, 1e-6)
    assert spectral.singular_values([a.cuda()])[0].device.type == "cuda"


def test_large_square_matrices_take_the_lu_path_at_svd_accuracy():
    """Square matrices from 2048 get kappa from LU + Lanczos under "auto": it must agree with
    the float64 Gram path where that one is exact (random Gaussian, kappa ~ 1e3-1e4) and give
    +inf for a matrix with two equal rows."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(2048, 2048, generator=g)
    auto, gram = spectral.kappa([a]).item(), spectral.kappa([a], method="gram").item()
    assert 1e2 < gram < 5e4
    assert close(auto, gram, 1e-5)
    a[1] = a[0]
    assert math.isinf(spectral.kappa([a]).item())
