"""subspace primitives: Rust kernels against reference.py, bad input, Subspace and GradientProjector."""

import math
import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from forgetcore import reference, subspace
from forgetcore.subspace import GradientProjector, Subspace


def orth(d, r, seed):
    g = torch.Generator().manual_seed(seed)
    if r == 0:
        return torch.zeros(d, 0)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    return q.float().contiguous()


def rand(shape, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).contiguous()


layer = st.tuples(st.integers(0, 9), st.integers(1, 24), st.floats(0, 1), st.integers(0, 2**16))


@given(st.lists(layer, min_size=0, max_size=4), st.sampled_from([1.0, 1e-20, 1e20]))
def test_project_out_matches_reference(layers, scale):
    grads, bases = [], []
    for rows, cols, frac, seed in layers:
        grads.append(rand((rows, cols), seed, scale))
        bases.append(orth(cols, int(frac * cols), seed + 1))
    want = [g.clone().double() for g in grads]
    reference.project_out_(want, [u.double() for u in bases])
    subspace.project_out_(grads, bases)
    for g, w in zip(grads, want):
        assert torch.allclose(g.double(), w, atol=1e-5 * scale, rtol=1e-4)


@given(st.integers(1, 3000), st.integers(0, 4), st.integers(0, 2**16))
def test_project_out_flat_matches_reference(n, k, seed):
    k = min(k, n)
    v = orth(n, k, seed).T.contiguous()
    g = rand((n,), seed + 7)
    want = g.double().clone()
    reference.project_out_flat_(want, v.double())
    subspace.project_out_flat_(g, v)
    assert torch.allclose(g.double(), want, atol=1e-5)
    if k:
        assert (v @ g).abs().max() < 1e-4


@given(st.integers(1, 8), st.integers(1, 40), st.integers(0, 2**16), st.booleans())
def test_orthonormalize_matches_reference(k, n, seed, dup):
    v = rand((k, n), seed)
    if dup and k > 1:
        v[k - 1] = 3.0 * v[0]  # dependent: dropped
    out, kept = subspace.orthonormalize(v)
    ref, rkept = reference.orthonormalize(v, max(1e-8, 8 * torch.finfo(torch.float32).eps))
    assume(k <= n or kept == rkept)
    assert kept == rkept
    assert torch.allclose(out, ref, atol=1e-5)
    if dup and k > 1:
        assert k - 1 not in kept
    assert torch.allclose(out @ out.T, torch.eye(len(kept)), atol=1e-5)


def _energies(u, a):
    u, a = u.double(), a.double()
    res = a - u @ (u.T @ a) if u.shape[1] else a
    s = torch.linalg.svdvals(res) ** 2
    return float((a * a).sum()), float((res * res).sum()), s


def _borderline(u, a, th, criterion, ratio):
    """True when a cumulative share sits within 1e-4 of where the count would change."""
    total, res, lam = _energies(u, a)
    if total == 0 or res <= 1e-12 * total:
        return False
    if criterion == "energy":
        cums = ((total - res) + torch.cumsum(lam, 0)) / total
        edges = torch.cat([torch.tensor([(total - res) / total], dtype=torch.float64), cums])
        return bool(((edges - th).abs() < 1e-4).any()) or bool((lam / lam.max()).lt(1e-5).logical_and(lam > 0).any())
    r = ratio if ratio is not None else math.sqrt(res / total)
    eps = (r - (1 - th)) / r
    return bool(((torch.cumsum(lam, 0) / res - eps).abs() < 1e-4).any()) or bool(
        (lam / lam.max()).lt(1e-5).logical_and(lam > 0).any()
    )


@given(st.integers(1, 24), st.integers(0, 30), st.floats(0, 1), st.integers(0, 2**16),
       st.sampled_from([0.3, 0.9, 0.99, 1.0]), st.sampled_from(["energy", "norm_ratio"]),
       st.sampled_from(["official", "reach"]), st.sampled_from([None, 0.5, 0.02]), st.integers(0, 6))
def test_extend_basis_matches_reference(d, n, frac, seed, th, criterion, count, ratio, lowrank):
    u = orth(d, int(frac * d), seed)
    a = rand((d, n), seed + 1)
    if lowrank and n:
        a = (rand((d, lowrank), seed + 2) @ rand((lowrank, n), seed + 3)).contiguous()
    ratio = ratio if criterion == "norm_ratio" else None
    assume(not _borderline(u, a, th, criterion, ratio))
    got = subspace.extend_basis(u, a, th, criterion=criterion, count=count, ratio=ratio)
    want = reference.extend_basis(u, a, th, criterion=criterion, count=count, ratio=ratio)
    assert got.shape == want.shape
    assert torch.equal(got[:, : u.shape[1]], u)
    assert got.shape[1] <= d
    pg, pw = got.double() @ got.double().T, want.double() @ want.double().T
    assert torch.allclose(pg, pw, atol=1e-4)
    assert torch.allclose(got.T @ got, torch.eye(got.shape[1]), atol=1e-5)


def test_official_count_is_one_short_of_reach():
    # Energies 16, 9, 4, 1 (shares .533, .833, .967, 1): threshold .9 -> official 2, reach 3.
    a = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert subspace.extend_basis(None, a, 0.9, count="official").shape == (4, 2)
    assert subspace.extend_basis(None, a, 0.9, count="reach").shape == (4, 3)
    # FOT always adds at least one vector, even when eps' < 0.
    u = orth(4, 1, 0)
    assert subspace.extend_basis(u, a, 0.5, criterion="norm_ratio", ratio=0.1).shape == (4, 2)


def test_hundred_extensions_stay_orthonormal():
    u = None
    for t in range(100):
        a = rand((200, 6), t)
        u = subspace.extend_basis(u, a, 0.4, criterion="energy" if t % 2 else "norm_ratio", count="reach")
    assert u.shape[1] > 100
    assert (u.T.double() @ u.double() - torch.eye(u.shape[1], dtype=torch.float64)).abs().max() < 1e-5


def test_full_basis_stays_full():
    u = orth(6, 6, 1)
    out = subspace.extend_basis(u, rand((6, 10), 2), 0.99)
    assert torch.equal(out, u)


def test_matches_torch_on_cuda_reference_path(monkeypatch):
    # The reference path (taken on non-CPU devices) gives the same results as Rust.
    g = rand((5, 12), 3)
    u = orth(12, 4, 4)
    a = g.clone()
    subspace.project_out_([a], [u])
    monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    b = g.clone()
    subspace.project_out_([b], [u])
    assert torch.allclose(a, b, atol=1e-6)


# --- bad input: clear errors naming the argument, nothing modified --------------------------

BAD = [
    ("grads[0]", lambda g, u: ([g.double()], [u]), TypeError),
    ("bases[0]", lambda g, u: ([g], [u[:-1]]), ValueError),
    ("bases", lambda g, u: ([g], []), ValueError),
    ("bases[0]", lambda g, u: ([g], [u * 2]), ValueError),
    ("bases[0]", lambda g, u: ([g], [torch.ones(8, 9)]), ValueError),
    ("grads[0]", lambda g, u: ([g.flatten()], [u]), ValueError),
]


@pytest.mark.parametrize("name,make,exc", BAD)
def test_project_out_bad_input(name, make, exc):
    g = rand((3, 8), 0)
    u = orth(8, 3, 1)
    grads, bases = make(g, u)
    before = [x.clone() for x in grads]
    with pytest.raises(exc, match="^" + re.escape(name)):
        subspace.project_out_(grads, bases)
    for x, y in zip(grads, before):
        assert torch.equal(x, y)


def test_nan_gradient_leaves_everything_unchanged():
    g1, g2 = rand((3, 8), 0), rand((3, 8), 1)
    g2[1, 2] = float("nan")
    c1, c2 = g1.clone(), g2.clone()
    with pytest.raises(ValueError, match=r"^grads\[1\]: expected finite"):
        subspace.project_out_([g1, g2], [orth(8, 2, 0), orth(8, 2, 1)])
    assert torch.equal(g1, c1) and torch.equal(g2.isnan(), c2.isnan())


@pytest.mark.parametrize("th", [0.0, -0.1, 1.5, float("nan")])
def test_threshold_outside_unit_interval(th):
    with pytest.raises(ValueError, match="^threshold"):
        subspace.extend_basis(None, rand((4, 4), 0), th)


def test_extend_bad_input():
    with pytest.raises(ValueError, match="^criterion"):
        subspace.extend_basis(None, rand((4, 4), 0), 0.9, criterion="svd")
    with pytest.raises(ValueError, match="^count"):
        subspace.extend_basis(None, rand((4, 4), 0), 0.9, count="x")
    with pytest.raises(ValueError, match=r"^reps\[0\]"):
        subspace.extend_basis(orth(5, 2, 0), rand((4, 4), 0), 0.9)
    a = rand((4, 4), 0)
    a[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^reps\[0\]: expected finite"):
        subspace.extend_basis(None, a, 0.9)
    with pytest.raises(ValueError, match=r"^bases\[0\]: expected orthonormal"):
        subspace.extend_basis(torch.ones(4, 2), rand((4, 4), 0), 0.9)
    with pytest.raises(ValueError, match=r"^bases\[0\]: rank 5 exceeds"):
        subspace.extend_basis(torch.zeros(4, 5), rand((4, 4), 0), 0.9)
    with pytest.raises(ValueError, match="^ratios"):
        subspace.extend_basis(None, rand((4, 4), 0), 0.9, ratio=0.5)
    with pytest.raises(TypeError, match="^vectors"):
        subspace.orthonormalize(rand((2, 3), 0).double())
    with pytest.raises(ValueError, match="^vectors"):
        subspace.project_out_flat_(rand((5,), 0), rand((2, 5), 1))


# --- Subspace and GradientProjector ---------------------------------------------------------

def test_subspace_state_dict_roundtrip(tmp_path):
    s = Subspace()
    added = s.extend({"a": rand((6, 10), 0), "b": rand((4, 3), 1)}, 0.9)
    assert added["a"] == s.ranks()["a"] > 0
    torch.save(s.state_dict(), tmp_path / "s.pt")
    t = Subspace()
    t.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert t.ranks() == s.ranks() and torch.equal(t["a"], s["a"])
    with pytest.raises(ValueError, match="^state"):
        t.load_state_dict({"bases": {"a": torch.ones(3, 2)}})
    assert torch.equal(t["a"], s["a"])  # unchanged after the error


@pytest.mark.parametrize("stride,padding,dilation,mode", [(1, 0, 1, "zeros"), (2, 1, 1, "zeros"),
                                                          (2, 2, 2, "zeros"), (1, 1, 1, "reflect")])
def test_projected_step_keeps_outputs_on_recorded_inputs(stride, padding, dilation, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=stride, padding=padding, dilation=dilation,
                                    bias=False, padding_mode=mode),
                          nn.ReLU(), nn.Flatten(), nn.LazyLinear(3, bias=False))
    x_old = torch.randn(3, 2, 9, 9)
    model(x_old)
    sub = Subspace()
    proj = GradientProjector(model, sub)
    reps = proj.representations(x_old)
    assert reps["0"].shape[0] == 2 * 9
    sub.extend(reps, 1.0, count="reach")
    with torch.no_grad():
        before = [model[0](x_old), model(x_old)]
    x_new = torch.randn(8, 2, 9, 9)
    model(x_new).pow(2).sum().backward()
    proj.project_()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
        after = [model[0](x_old), model(x_old)]
    # Both layers' responses to the old inputs are unchanged by the projected step.
    assert torch.allclose(before[0], after[0], atol=1e-4)
    assert torch.allclose(before[1], after[1], atol=1e-3)


def test_projector_rejects_grouped_conv_and_bad_args():
    with pytest.raises(ValueError, match="^layers"):
        GradientProjector(nn.Conv2d(4, 4, 3, groups=2), Subspace())
    with pytest.raises(TypeError, match="^subspace"):
        GradientProjector(nn.Linear(2, 2), {})
    with pytest.raises(ValueError, match="^layers"):
        GradientProjector(nn.Linear(2, 2), Subspace(), layers=["nope"])


def test_flat_nan_and_overflow_leave_g_unchanged():
    v = orth(50, 2, 0).T.contiguous()
    g = rand((50,), 1)
    g[3] = float("nan")
    c = g.clone()
    with pytest.raises(ValueError, match="^g: expected finite"):
        subspace.project_out_flat_(g, v, check=False)
    assert torch.equal(g.nan_to_num(), c.nan_to_num())
    bad = v.clone()
    bad[1, 4] = float("inf")
    g = rand((50,), 1)
    c = g.clone()
    with pytest.raises(ValueError, match="^vectors: expected finite"):
        subspace.project_out_flat_(g, bad, check=False)
    ones = torch.full((1, 50), 50 ** -0.5)
    huge = torch.full((50,), 3e38)
    with pytest.raises(ValueError, match="^g: V g overflows"):
        subspace.project_out_flat_(huge, ones)
    assert torch.equal(huge, torch.full((50,), 3e38)) and torch.equal(g, c)


# --- issue 11: aliasing, all-or-nothing, NaN, None (regression tests: each failed before its fix) ---

def _basis(d: int, r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("backend", ["rust", "reference"])
@pytest.mark.parametrize("case", ["same", "rows", "transposed"])
def test_project_out_refuses_aliased_gradients(monkeypatch, backend, case):
    if backend == "reference":
        monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    u = _basis(6, 2, 0)
    big = torch.randn(8, 6)
    if case == "same":
        gs = [big, big]  # projected twice before the fix: g - 2 (gU) U^T
    elif case == "rows":
        gs = [big[:5], big[3:]]  # overlapping row views of one storage
    else:
        sq = torch.randn(6, 6)
        gs = [sq, sq.T]
    before = big.clone(), [g.clone() for g in gs]
    with pytest.raises(ValueError, match=r"^grads\[0\]: shares memory with grads\[1\]"):
        subspace.project_out_(gs, [u, u])
    assert torch.equal(big, before[0]) and all(torch.equal(g, b) for g, b in zip(gs, before[1]))


def test_project_out_takes_interleaved_views_that_do_not_overlap():
    # Columns 0:3 and 3:6 of one (4, 6) tensor interleave in memory but share no element.
    u = _basis(3, 1, 1)
    x = torch.randn(4, 6)
    want = [reference.project_out_([x[:, :3].clone()], [u]), reference.project_out_([x[:, 3:].clone()], [u])]
    a, b = x[:, :3].clone(), x[:, 3:].clone()
    reference.project_out_([a], [u])
    reference.project_out_([b], [u])
    subspace.project_out_([x[:, :3], x[:, 3:]], [u, u])
    assert want == [None, None]
    torch.testing.assert_close(x, torch.cat([a, b], 1), rtol=1e-6, atol=1e-6)


def test_project_out_refuses_a_gradient_that_is_its_basis():
    u = _basis(4, 4, 2)
    with pytest.raises(ValueError, match=r"^grads\[0\]: shares memory with bases\[0\]"):
        subspace.project_out_([u], [u])


@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_project_out_writes_nothing_when_a_later_gradient_is_bad(monkeypatch, backend):
    if backend == "reference":
        monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    u = _basis(6, 2, 3)
    a = torch.randn(4, 6)
    a0 = a.clone()
    bad = torch.randn(6, 4).T.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^grads\[1\]: expected finite"):
        subspace.project_out_([a, bad], [u, u])
    assert torch.equal(a, a0)


def test_project_out_detaches_gradients_that_require_grad():
    # Before the fix: `a` was projected, then the non-contiguous view of a leaf that requires
    # grad failed in copy_ with autograd's RuntimeError (state changed, then raised).
    u = _basis(6, 2, 4)
    a = torch.randn(4, 6)
    leaf = torch.randn(6, 4, requires_grad=True)
    b = leaf.T
    want_a = a - a @ u @ u.T
    want_b = (b - b @ u @ u.T).detach()
    subspace.project_out_([a, b], [u, u])
    torch.testing.assert_close(a, want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.detach().T, want_b, rtol=1e-5, atol=1e-5)


def test_none_for_grads_or_bases_is_a_type_error_naming_it():
    u = _basis(6, 2, 5)
    with pytest.raises(TypeError, match="^grads: expected a list of tensors, got NoneType"):
        subspace.project_out_(None, [u])
    with pytest.raises(TypeError, match="^bases: expected a list of tensors"):
        subspace.project_out_([torch.zeros(2, 6)], u)


def test_project_out_flat_refuses_g_inside_vectors():
    v = torch.eye(4)
    with pytest.raises(ValueError, match=r"^g\[0\]: shares memory with vectors\[0\]"):
        subspace.project_out_flat_(v[1], v)


def test_representations_refuse_nan_input_and_nan_produced_by_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    proj = GradientProjector(model, Subspace())
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="^x: expected finite values"):
        proj.representations(x)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="^model: produced non-finite inputs to layer '1'"):
        proj.representations(torch.randn(5, 3))


def test_wrong_types_are_type_errors_naming_the_argument():
    # Each failed before its fix with Python's or pyo3's own message (or was accepted).
    u = _basis(6, 2, 6)
    with pytest.raises(TypeError, match="^check: expected a bool, got str"):
        subspace.project_out_([torch.zeros(2, 6)], [u], check="no")
    with pytest.raises(TypeError, match="^bases: expected a list of tensors"):
        subspace.extend_bases(None, None, 0.9)
    with pytest.raises(TypeError, match="^reps: expected a mapping"):
        Subspace().extend(None, 0.9)
    with pytest.raises(TypeError, match="^grads: expected a mapping"):
        Subspace().project_(None)
    with pytest.raises(TypeError, match=r"^state\['bases'\]: expected str layer names"):
        Subspace().load_state_dict({"bases": {3: u}})
    with pytest.raises(TypeError, match="^state: expected a mapping"):
        Subspace().load_state_dict(None)
    with pytest.raises(ValueError, match="^device: expected a device"):
        Subspace(device="nope")
    with pytest.raises(ValueError, match=r"^x: the model cannot run on x"):
        GradientProjector(nn.Linear(3, 2), Subspace()).representations(torch.randn(2, 4))


def test_subspace_extend_threshold_mapping_is_checked():
    # Before: a KeyError for a layer without a threshold, float()'s unnamed ValueError for a string.
    reps = {"a": torch.randn(6, 4, generator=torch.Generator().manual_seed(7))}
    with pytest.raises(ValueError, match=r"^threshold: expected a threshold for every layer"):
        Subspace().extend(reps, {"b": 0.9})
    with pytest.raises(TypeError, match="^threshold: expected a real number, got str"):
        Subspace().extend(reps, {"a": "x"})
