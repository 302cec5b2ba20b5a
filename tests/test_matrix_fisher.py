"""Bad-input matrix for ``fisher_diagonal``, ``subspace.extend_basis`` and ``spectral.kappa``.

One assertion (``badinput.expect_clean_error``): a ``ValueError``/``TypeError`` naming the
argument, and every input and the model bit-identical after the raise. Hypothesis varies
shapes and NaN/inf positions; the rest is parametrized.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from badinput import expect_clean_error
from forgetcore import spectral, subspace
from forgetcore.fisher import fisher_diagonal

BAD_FLOATS = [float("nan"), float("inf"), float("-inf")]
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 4)).eval()


def data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


# ---------------------------------------------------------------------------------------------
# fisher_diagonal
# ---------------------------------------------------------------------------------------------

MODES = ["batch", "empirical", "mc"]


@SETTINGS
@given(n=st.integers(1, 9), pos=st.integers(0, 10_000), bad=st.sampled_from(BAD_FLOATS),
       mode=st.sampled_from(MODES), batch_size=st.integers(1, 4))
def test_fisher_non_finite_inputs(n, pos, bad, mode, batch_size):
    model = small_cnn()
    x, y = data(n)
    x.view(-1)[pos % x.numel()] = bad
    expect_clean_error(lambda: fisher_diagonal(model, TensorDataset(x, y), mode=mode, batch_size=batch_size),
                       arg=["data", "inputs"], state=[model, x, y])


@SETTINGS
@given(which=st.integers(0, 3), pos=st.integers(0, 10_000), bad=st.sampled_from(BAD_FLOATS),
       mode=st.sampled_from(MODES))
def test_fisher_non_finite_weights(which, pos, bad, mode):
    model = small_cnn()
    p = list(model.parameters())[which]
    with torch.no_grad():
        p.view(-1)[pos % p.numel()] = bad
    x, y = data()
    expect_clean_error(lambda mode=mode: fisher_diagonal(model, TensorDataset(x, y), mode=mode), arg="model",
                       state=[model, x, y])


def test_fisher_non_finite_buffer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)).eval()
    model[2].running_var[3] = float("nan")
    x, y = data()
    expect_clean_error(lambda: fisher_diagonal(model, TensorDataset(x, y), mode="empirical"), arg="model",
                       state=[model, x, y])


@SETTINGS
@given(label=st.one_of(st.integers(-(2**40), -1), st.integers(4, 2**40)), pos=st.integers(0, 5),
       mode=st.sampled_from(["batch", "empirical"]), generic=st.booleans())
def test_fisher_labels_out_of_range(label, pos, mode, generic):
    # generic: a model with no Linear/Conv layer, so only the torch.func path runs.
    model = small_cnn() if not generic else nn.Sequential(nn.Flatten(), nn.LayerNorm(64), nn.Unflatten(1, (4, 16)),
                                                          nn.LayerNorm(16), nn.Flatten(1), nn.Unflatten(1, (4, 16)),
                                                          _Mean()).eval()
    x, y = data()
    y[pos] = label
    expect_clean_error(lambda mode=mode: fisher_diagonal(model, TensorDataset(x, y), mode=mode),
                       arg=["labels", "targets"], state=[model, x, y])


class _Mean(nn.Module):
    def forward(self, h):
        return h.mean(2)  # (n, 4) logits


@pytest.mark.parametrize("y, exc", [
    (torch.zeros(6, dtype=torch.bool), TypeError),  # not class indices
    (torch.zeros(6), ValueError),  # float 1-D: neither indices nor probabilities
    (torch.zeros(6, 3), ValueError),  # probabilities of the wrong width
    (torch.zeros(5, dtype=torch.long), ValueError),  # one label short
])
def test_fisher_label_kinds(y, exc):
    model = small_cnn()
    x, _ = data()
    for mode in ("batch", "empirical"):
        expect_clean_error(lambda mode=mode: fisher_diagonal(model, [(x, y)], mode=mode), arg=["labels", "targets"],
                           state=[model, x, y], exc=(exc,))


def test_fisher_custom_loss_index_error_names_data():
    model = small_cnn()
    x, y = data()
    y[0] = 7

    def picky(out, t):  # indexes with the labels, as a custom loss may
        return -out.log_softmax(1)[torch.arange(len(t)), t]

    for mode in ("batch", "empirical"):
        expect_clean_error(lambda mode=mode: fisher_diagonal(model, TensorDataset(x, y), picky, mode=mode),
                           arg=["labels", "targets"], state=[model, x, y])


def test_fisher_model_output_not_finite_names_model():
    """Finite data, a model that overflows: the error names the model, not the data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    with torch.no_grad():
        model[1].weight.fill_(3e38)
    x, y = data()
    x = x.abs() + 1
    for mode in MODES:
        expect_clean_error(lambda mode=mode: fisher_diagonal(model, TensorDataset(x, y), mode=mode), arg="model",
                           state=[model, x, y])


@pytest.mark.parametrize("kwargs, arg, exc", [
    (dict(mode="exact"), "mode", ValueError),
    (dict(accumulate="max"), "accumulate", ValueError),
    (dict(mode="empirical", accumulate="abs"), "accumulate", ValueError),
    (dict(batch_size=0), "batch_size", ValueError),
    (dict(batch_size=-3), "batch_size", ValueError),
    (dict(batch_size=2.5), "batch_size", TypeError),
    (dict(batch_size=True), "batch_size", TypeError),
    (dict(chunk_size=0), "chunk_size", ValueError),
    (dict(chunk_size="8"), "chunk_size", TypeError),
    (dict(mode="mc", seed=1.5), "seed", TypeError),
    (dict(mode="mc", seed=-1), "seed", ValueError),
    (dict(mode="mc", seed=2**64), "seed", ValueError),
    (dict(loss_fn="ce"), "loss_fn", TypeError),
    (dict(distributed="yes"), "distributed", TypeError),
    (dict(distributed=True), "distributed", ValueError),  # no process group
])
def test_fisher_arguments(kwargs, arg, exc):
    model = small_cnn()
    x, y = data()
    expect_clean_error(lambda: fisher_diagonal(model, TensorDataset(x, y), **kwargs), arg=arg,
                       state=[model, x, y], exc=(exc,))


@pytest.mark.parametrize("make, arg, exc", [
    (lambda x, y: TensorDataset(x[:0], y[:0]), "data", ValueError),
    (lambda x, y: [], "data", ValueError),
    (lambda x, y: 5, "data", TypeError),
    (lambda x, y: [("a", "b")], "data", TypeError),
])
def test_fisher_bad_data(make, arg, exc):
    model = small_cnn()
    x, y = data()
    for mode in MODES:
        expect_clean_error(lambda mode=mode: fisher_diagonal(model, make(x, y), mode=mode), arg=arg,
                           state=[model, x, y], exc=(exc,))


def test_fisher_bad_model():
    x, y = data()
    expect_clean_error(lambda: fisher_diagonal(lambda t: t, TensorDataset(x, y)), arg="model", exc=(TypeError,))
    frozen = small_cnn().requires_grad_(False)
    expect_clean_error(lambda: fisher_diagonal(frozen, TensorDataset(x, y)), arg="model", state=[frozen])


# ---------------------------------------------------------------------------------------------
# subspace.extend_basis
# ---------------------------------------------------------------------------------------------


def basis(d: int = 12, r: int = 3) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(1)))[0].contiguous()


@SETTINGS
@given(d=st.integers(2, 16), n=st.integers(1, 12), pos=st.integers(0, 10_000), bad=st.sampled_from(BAD_FLOATS),
       with_basis=st.booleans())
def test_extend_basis_non_finite_reps(d, n, pos, bad, with_basis):
    a = torch.randn(d, n, generator=torch.Generator().manual_seed(d * 100 + n))
    a.view(-1)[pos % a.numel()] = bad
    u = basis(d, 1) if with_basis else None
    expect_clean_error(lambda: subspace.extend_basis(u, a, 0.9), arg="reps", state=[a] + ([u] if with_basis else []))


@pytest.mark.parametrize("case", ["f64 reps", "1-D reps", "rows", "f64 basis", "not orthonormal", "nan basis",
                                  "3-D basis", "threshold 0", "threshold 1.5", "threshold nan", "threshold str",
                                  "criterion", "count", "ratio with energy", "ratio 2"])
def test_extend_basis_arguments(case):
    u, a = basis(), torch.randn(12, 5, generator=torch.Generator().manual_seed(2))
    kw: dict = {}
    th = 0.9
    arg, exc = "reps", ValueError
    if case == "f64 reps":
        a, exc = a.double(), TypeError
    elif case == "1-D reps":
        a = a[:, 0].clone()
    elif case == "rows":
        a = torch.randn(11, 5)
    elif case == "f64 basis":
        u, arg, exc = u.double(), "bases", TypeError
    elif case == "not orthonormal":
        u, arg = u * 2, "bases"
    elif case == "nan basis":
        u, arg = u.clone(), "bases"
        u[0, 0] = float("nan")
    elif case == "3-D basis":
        u, arg = u[None], "bases"
    elif case.startswith("threshold"):
        arg = "threshold"
        th = {"threshold 0": 0.0, "threshold 1.5": 1.5, "threshold nan": float("nan"), "threshold str": "0.9"}[case]
        exc = TypeError if case == "threshold str" else ValueError
    elif case == "criterion":
        kw, arg = dict(criterion="svd"), "criterion"
    elif case == "count":
        kw, arg = dict(count="most"), "count"
    elif case == "ratio with energy":
        kw, arg = dict(ratio=0.5), "ratio"
    elif case == "ratio 2":
        kw, arg = dict(criterion="norm_ratio", ratio=2.0), "ratio"
    expect_clean_error(lambda: subspace.extend_basis(u, a, th, **kw), arg=arg, state=[u, a], exc=(exc,))


@pytest.mark.parametrize("scale", [1e19, 1e-20, 1e-30, 1e30, 1e-38])
def test_extend_basis_is_scale_invariant(scale):
    """Regression (issue 11 item 7): 1e19 and 1e-20 raised NoConvergence, 1e-30 gave rank 0, while the
    energy criterion is scale-invariant. Rank-2 data at every scale gives the rank-2 basis of scale 1."""
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(10, 2, generator=g) @ torch.tensor([[1.0, 0.0], [0.0, 0.5]]) @ torch.randn(2, 7, generator=g))
    want = subspace.extend_basis(None, a, 0.97, count="reach")
    assert want.shape == (10, 2)
    got = subspace.extend_basis(None, a * scale, 0.97, count="reach")
    assert got.shape == (10, 2)
    torch.testing.assert_close(got @ got.T, want @ want.T, atol=1e-5, rtol=0)
    u = basis(10, 1)
    assert subspace.extend_basis(u, a * scale, 0.999).shape == subspace.extend_basis(u, a, 0.999).shape


# ---------------------------------------------------------------------------------------------
# spectral.kappa
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(m=st.integers(1, 12), n=st.integers(1, 12), pos=st.integers(0, 10_000), bad=st.sampled_from(BAD_FLOATS),
       which=st.integers(0, 2), method=st.sampled_from(["auto", "gram", "svd"]))
def test_kappa_non_finite(m, n, pos, bad, which, method):
    g = torch.Generator().manual_seed(m * 13 + n)
    mats = [torch.randn(m, n, generator=g) for _ in range(3)]
    mats[which].view(-1)[pos % mats[which].numel()] = bad
    expect_clean_error(lambda: spectral.kappa(mats, method=method), arg="matrices", state=[mats])


@pytest.mark.parametrize("mats, kw, arg, exc", [
    ([torch.zeros(0, 3)], {}, "matrices", ValueError),
    ([torch.randn(3)], {}, "matrices", ValueError),
    ([torch.randn(2, 0, 4)], {}, "matrices", ValueError),  # >2-D is read as (out, rest): here empty
    ([torch.randn(3, 3).to(torch.int32)], {}, "matrices", TypeError),
    ([torch.randn(3, 3)], {"method": "qr"}, "method", ValueError),
    ("abc", {}, "matrices", TypeError),
    (None, {}, "matrices", TypeError),
])
def test_kappa_arguments(mats, kw, arg, exc):
    expect_clean_error(lambda: spectral.kappa(mats, **kw), arg=arg, state=[mats] if isinstance(mats, list) else [],
                       exc=(exc,))
