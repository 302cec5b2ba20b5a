"""accumulate_ and ssd_dampen_: bit-identical to reference.py, the bad-input table, no change on error."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from forgetcore import importance as imp
from forgetcore import reference as ref


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


def make(shapes, seed, *, zero_frac=0.1, huge=False, nan_params=False):
    g = torch.Generator().manual_seed(seed)
    params, full, forget = [], [], []
    for s in shapes:
        p = torch.randn(s, generator=g)
        d = torch.rand(s, generator=g)
        d[torch.rand(s, generator=g) < zero_frac] = 0.0
        f = torch.rand(s, generator=g) * 30
        f[torch.rand(s, generator=g) < zero_frac] = 0.0
        if huge:
            d = d * 3e38
            f = f.clamp(max=1) * 3e38
            p = p * 1e38
        if nan_params and p.numel():
            p.view(-1)[0] = math.nan
        params.append(p)
        full.append(d)
        forget.append(f)
    return params, full, forget


shape = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
shapes = st.lists(shape, min_size=0, max_size=5)


@given(shapes=shapes, seed=st.integers(0, 2**31), alpha=st.sampled_from([0.0, 0.3, 1.0, 10.0, 1e30]),
       lam=st.sampled_from([0.0, 0.1, 1.0, 7.5]), huge=st.booleans(), nan_params=st.booleans())
def test_ssd_dampen_bit_identical_to_reference(shapes, seed, alpha, lam, huge, nan_params):
    params, full, forget = make(shapes, seed, huge=huge, nan_params=nan_params)
    a = [p.clone() for p in params]
    b = [p.clone() for p in params]
    # validated=True: NaN/inf parameters (refused by the checked path) still go through the
    # kernel exactly as through the reference.
    got = imp.ssd_dampen_(a, full, forget, alpha, lam, validated=True)
    want = ref.ssd_dampen_(b, full, forget, alpha, lam)
    assert got.dtype == torch.int64 and got.shape == (len(shapes),)
    assert torch.equal(got, want)
    assert same(a, b)


def test_ssd_dampen_large_tensors_cross_chunks():
    # Tensors larger than the Rust chunk (32768) and a ragged tail, several threads at once.
    params, full, forget = make([(100_003,), (3, 40_000), (1,)], 7)
    a = [p.clone() for p in params]
    b = [p.clone() for p in params]
    got = imp.ssd_dampen_(a, full, forget, 10.0, 1.0)
    assert torch.equal(got, ref.ssd_dampen_(b, full, forget, 10.0, 1.0))
    assert same(a, b)
    assert int(got.sum()) > 0


def test_ssd_dampen_semantics():
    p = torch.tensor([1.0, 2.0, 3.0, 4.0])
    d = torch.tensor([1.0, 0.0, 1.0, 1.0])
    f = torch.tensor([20.0, 1.0, 5.0, 11.0])
    c = imp.ssd_dampen_([p], [d], [f], alpha=10.0, lam=1.0)
    # selected where f > 10 d; beta = min(d / f, 1); I_D = 0 and I_Df > 0 becomes exactly 0
    assert c.tolist() == [3]
    assert p.tolist() == [pytest.approx(1 / 20), 0.0, 3.0, pytest.approx(4 / 11)]
    q = torch.tensor([5.0])
    assert imp.ssd_dampen_([q], [torch.tensor([1.0])], [torch.tensor([20.0])], 10.0, lam=100.0).tolist() == [1]
    assert q.item() == 5.0  # capped at 1


def test_ssd_dampen_module_and_named_inputs():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(0)
    full = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    forget = {n: torch.rand(p.shape, generator=g) * 20 for n, p in model.named_parameters()}
    want = [p.detach().clone() for p in model.parameters()]
    ref.ssd_dampen_(want, [full[n] for n in names], [forget[n] for n in names], 2.0, 1.0)
    c = imp.ssd_dampen_(model, full, forget, 2.0)
    assert c.shape == (4,)
    assert same([p.detach() for p in model.parameters()], want)
    # requires_grad leaves are edited under no_grad and stay leaves
    assert all(p.is_leaf and p.requires_grad for p in model.parameters())
    # dict of parameters, and named pairs
    d = dict(model.named_parameters())
    imp.ssd_dampen_(d, full, forget, 2.0)
    imp.ssd_dampen_(list(model.named_parameters()), full, forget, 2.0)


def test_ssd_dampen_non_float32_and_non_contiguous_params_use_reference():
    params, full, forget = make([(6, 5)], 3)
    half = [params[0].to(torch.float64)]
    want = [half[0].clone()]
    imp.ssd_dampen_(half, full, forget, 1.0, 1.0)
    ref.ssd_dampen_(want, full, forget, 1.0, 1.0)
    assert torch.equal(half[0], want[0])
    base = torch.randn(5, 6)
    nc = base.t()
    assert not nc.is_contiguous()
    want = nc.clone()
    imp.ssd_dampen_([nc], full, forget, 1.0, 1.0)
    ref.ssd_dampen_([want], full, forget, 1.0, 1.0)
    assert torch.equal(nc, want)


def test_ssd_dampen_reference_backend_env(monkeypatch):
    monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    params, full, forget = make([(50,)], 1)
    a, b = [params[0].clone()], [params[0].clone()]
    assert torch.equal(imp.ssd_dampen_(a, full, forget, 1.0), ref.ssd_dampen_(b, full, forget, 1.0, 1.0))
    assert same(a, b)


BAD = [
    # (kwargs change, exception, message start)
    ({"alpha": -1.0}, ValueError, "alpha: expected a number >= 0"),
    ({"alpha": math.nan}, ValueError, "alpha: expected a finite number"),
    ({"lam": math.inf}, ValueError, "lam: expected a finite number"),
    ({"lam": -0.5}, ValueError, "lam: expected a number >= 0"),
    ({"alpha": "10"}, TypeError, "alpha: expected a real number"),
    ({"imp_full": "shape"}, ValueError, r"imp_full\[1\]: expected shape \(3, 4\)"),
    ({"imp_forget": "dtype"}, TypeError, r"imp_forget\[0\]: expected float32 tensor"),
    ({"imp_full": "short"}, ValueError, "imp_full: expected 2 tensors"),
    ({"imp_forget": "nan"}, ValueError, r"imp_forget\[1\]: expected finite non-negative importances, got nan"),
    ({"imp_full": "neg"}, ValueError, r"imp_full\[0\]: expected finite non-negative importances, got -1.0"),
    ({"imp_full": "inf"}, ValueError, r"imp_full\[1\]: expected finite non-negative importances, got inf"),
    ({"imp_full": "single"}, TypeError, "imp_full: expected a list or dict"),
    ({"params": "int"}, TypeError, r"params\[0\]: expected a floating-point tensor"),
]


@pytest.mark.parametrize("change,exc,msg", BAD)
@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_ssd_dampen_bad_input_leaves_params_unchanged(change, exc, msg, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    params, full, forget = make([(5,), (3, 4)], 0)
    kw = {"params": params, "imp_full": full, "imp_forget": forget, "alpha": 1.0, "lam": 1.0}
    for k, v in change.items():
        if v == "shape":
            kw[k] = [kw[k][0], torch.zeros(4, 3)]
        elif v == "dtype":
            kw[k] = [kw[k][0].double(), kw[k][1]]
        elif v == "short":
            kw[k] = kw[k][:1]
        elif v in ("nan", "neg", "inf"):
            bad = [t.clone() for t in kw[k]]
            i = 0 if v == "neg" else 1
            bad[i].view(-1)[2] = {"nan": math.nan, "neg": -1.0, "inf": math.inf}[v]
            kw[k] = bad
        elif v == "single":
            kw[k] = kw[k][0]
        elif v == "int":
            kw[k] = [torch.zeros(5, dtype=torch.int32), kw[k][1]]
        else:
            kw[k] = v
    before = [p.clone() for p in kw["params"]]
    with pytest.raises(exc, match="^" + msg):
        imp.ssd_dampen_(kw["params"], kw["imp_full"], kw["imp_forget"], kw["alpha"], kw["lam"])
    assert same(kw["params"], before)


def test_ssd_dampen_named_mismatch_and_device():
    model = nn.Linear(3, 2)
    full = {"weight": torch.rand(2, 3), "bias": torch.rand(2)}
    with pytest.raises(ValueError, match=r"^imp_forget: names do not match the parameters \(missing \['bias'\]"):
        imp.ssd_dampen_(model, full, {"weight": torch.rand(2, 3)}, 1.0)
    with pytest.raises(TypeError, match="^imp_full: got a dict but the parameters are unnamed"):
        imp.ssd_dampen_(list(model.parameters()), full, full, 1.0)
    with pytest.raises(ValueError, match=r"^imp_full\['weight'\]: expected a tensor on meta"):
        imp.ssd_dampen_({"weight": torch.zeros(2, 3, device="meta")}, {"weight": torch.zeros(2, 3)},
                        {"weight": torch.zeros(2, 3)}, 1.0)


def test_ssd_dampen_validated_skips_the_check_and_empty_list():
    p = [torch.ones(3)]
    f = [torch.tensor([1.0, math.nan, 1.0])]
    imp.ssd_dampen_(p, [torch.zeros(3)], f, 1.0, validated=True)  # no error: caller vouched
    assert imp.ssd_dampen_([], [], [], 1.0).shape == (0,)
    assert imp.ssd_dampen_([torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], 1.0).tolist() == [0]


@given(shapes=shapes, seed=st.integers(0, 2**31), scale=st.sampled_from([1.0, 0.5, 1 / 3, 1e-30, 1e30]),
       mode=st.sampled_from(["sq", "abs"]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_accumulate_bit_identical_to_reference(shapes, seed, scale, mode, dtype):
    g = torch.Generator().manual_seed(seed)
    acc = [torch.rand(s, generator=g) for s in shapes]
    grads = [(torch.randn(s, generator=g) * 10).to(dtype) for s in shapes]
    a = [t.clone() for t in acc]
    b = [t.clone() for t in acc]
    imp.accumulate_(a, grads, scale, mode)
    ref.accumulate_(b, grads, scale, mode)
    assert same(a, b)


def test_accumulate_dict_none_and_nan():
    acc = {"w": torch.zeros(2), "b": torch.ones(1)}
    imp.accumulate_(acc, {"w": torch.tensor([2.0, -3.0]), "b": None}, 0.5)
    assert acc["w"].tolist() == [2.0, 4.5] and acc["b"].tolist() == [1.0]
    acc2 = [torch.zeros(2)]
    imp.accumulate_(acc2, [torch.tensor([math.nan, 1.0])], validated=True)  # vouched for: NaN propagates
    assert math.isnan(acc2[0][0]) and acc2[0][1] == 1.0


@pytest.mark.parametrize("backend", ["rust", "reference"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulate_checks_gradients_before_writing(backend, bad, dtype, monkeypatch):
    # The update writes every element and cannot be undone in float32, so a NaN/inf gradient
    # anywhere in the list is found by a read-only pass before the first write.
    if backend == "reference":
        monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    g = torch.Generator().manual_seed(0)
    acc = {"a": torch.rand(40_000, generator=g), "b": torch.rand(3, 5, generator=g), "c": torch.rand(7, generator=g)}
    grads = {"a": torch.randn(40_000, generator=g).to(dtype), "b": None, "c": torch.randn(7, generator=g).to(dtype)}
    grads["c"][4] = bad
    before = {k: v.clone() for k, v in acc.items()}
    with pytest.raises(ValueError, match=rf"^grads\['c'\]: expected finite values, got {bad} at flat index 4"):
        imp.accumulate_(acc, grads)
    assert all(torch.equal(acc[k], before[k]) for k in acc)
    with pytest.raises(ValueError, match=r"^grads\[1\]: expected finite values"):  # unnamed: position in the list
        imp.accumulate_([acc["b"], acc["c"]], [None, grads["c"]])
    assert all(torch.equal(acc[k], before[k]) for k in acc)
    imp.accumulate_(acc, grads, validated=True)  # skipped: the caller vouched for them
    assert math.isnan(acc["c"][4]) or math.isinf(acc["c"][4])


@given(sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=4), seed=st.integers(0, 2**31),
       bad=st.lists(st.tuples(st.integers(0, 3), st.floats(0, 1), st.sampled_from([math.nan, math.inf, -math.inf])),
                    max_size=3))
def test_gradient_check_finds_the_same_first_bad_value_on_both_backends(sizes, seed, bad):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=g) * 1e30 for n in sizes]  # huge and negative values are fine
    for t, pos, v in bad:
        if t < len(grads) and grads[t].numel():
            grads[t][int(pos * (grads[t].numel() - 1))] = v
    msgs = []
    for use_rust in (True, False):
        try:
            imp._check_finite("grads", grads, list(range(len(grads))), None, use_rust)
            msgs.append(None)
        except ValueError as e:
            msgs.append(str(e))
    assert msgs[0] == msgs[1]
    assert (msgs[0] is None) == all(bool(torch.isfinite(t).all()) for t in grads)


@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4), seed=st.integers(0, 2**31),
       frac=st.sampled_from([0.0, 0.01, 0.3, 1.0]), offset=st.integers(0, 15))
def test_ssd_dampen_vector_paths_on_unaligned_views(sizes, seed, frac, offset):
    # The kernel runs 16 (AVX-512) or 8 (AVX2) lanes with masked stores and a scalar tail; views
    # that start anywhere in a buffer, every selection density, and the elements beside each
    # tensor must come out exactly as the reference leaves them.
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes) + offset + 16
    buf = torch.randn(total, generator=g)
    starts = [offset + sum(sizes[:i]) for i in range(len(sizes))]
    want = buf.clone()
    views = [buf[s:s + n] for s, n in zip(starts, sizes)]
    wviews = [want[s:s + n] for s, n in zip(starts, sizes)]
    full = [torch.rand(n, generator=g) for n in sizes]
    forget = [d * (torch.rand(n, generator=g) < frac) * 20 for d, n in zip(full, sizes)]
    counts = imp.ssd_dampen_(views, full, forget, 10.0, 0.5, validated=True)
    assert torch.equal(counts, ref.ssd_dampen_(wviews, full, forget, 10.0, 0.5))
    assert torch.equal(bits(buf), bits(want))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda a: imp.accumulate_(a, [torch.ones(3)], 1.0, "cube"), ValueError, "mode: expected 'sq' or 'abs'"),
    (lambda a: imp.accumulate_(a, [torch.ones(2)], 1.0), ValueError, r"grads\[0\]: expected shape \(3,\)"),
    (lambda a: imp.accumulate_(a, [torch.ones(3), torch.ones(3)]), ValueError, "grads: expected 1 tensors"),
    (lambda a: imp.accumulate_(a, [torch.ones(3)], math.nan), ValueError, "scale: expected a finite number"),
    (lambda a: imp.accumulate_([a[0].double()], [torch.ones(3)]), TypeError, r"acc\[0\]: expected float32"),
    (lambda a: imp.accumulate_(a, [torch.ones(3, dtype=torch.int64)]), TypeError, r"grads\[0\]: expected a floating"),
])
def test_accumulate_bad_input(call, exc, msg):
    acc = [torch.full((3,), 2.0)]
    with pytest.raises(exc, match="^" + msg):
        call(acc)
    assert acc[0].tolist() == [2.0, 2.0, 2.0]


def test_aliasing_is_refused_not_raced():
    # The kernels write chunks in parallel: a parameter listed twice, or one that overlaps an
    # importance, would be a data race; it is refused and nothing changes.
    p = torch.rand(10)
    before = p.clone()
    with pytest.raises(ValueError, match=r"^params\[0\]: shares memory with params\[1\]"):
        imp.ssd_dampen_([p, p], [torch.rand(10)] * 2, [torch.rand(10)] * 2, 0.0)
    with pytest.raises(ValueError, match=r"^params\[0\]: shares memory with imp_forget\[0\]"):
        imp.ssd_dampen_([p], [torch.rand(10)], [p.view(10)], 0.0)
    big = torch.rand(20)
    with pytest.raises(ValueError, match=r"^params\[0\]: shares memory with params\[1\]"):
        imp.ssd_dampen_([big[:12], big[10:]], [torch.rand(12), torch.rand(10)], [torch.rand(12), torch.rand(10)], 0.0)
    assert torch.equal(p, before)
    with pytest.raises(ValueError, match=r"^acc\[0\]: shares memory with acc\[1\]"):
        imp.accumulate_([p, p], [torch.rand(10)] * 2)
    assert torch.equal(p, before)
    # disjoint views of one buffer are fine
    imp.ssd_dampen_([big[:10], big[10:]], [torch.rand(10)] * 2, [torch.rand(10)] * 2, 0.0)
    assert np.isfinite(big.numpy()).all()


@given(sizes=st.lists(st.integers(0, 40_000), min_size=1, max_size=4), seed=st.integers(0, 2**31),
       bad=st.lists(st.tuples(st.integers(0, 3), st.floats(0, 1), st.sampled_from([math.nan, -1.0, math.inf,
                                                                                   -math.inf, -1e-45])),
                    max_size=3))
def test_validation_finds_the_same_first_bad_value_on_both_backends(sizes, seed, bad):
    g = torch.Generator().manual_seed(seed)
    imps = [torch.rand(n, generator=g) for n in sizes]
    if imps[0].numel():
        imps[0][0] = -0.0  # allowed
    for t, pos, v in bad:
        if t < len(imps) and imps[t].numel():
            imps[t][int(pos * (imps[t].numel() - 1))] = v
    msgs = []
    for use_rust in (True, False):
        try:
            imp._validate("imp_full", imps, None, use_rust)
            msgs.append(None)
        except ValueError as e:
            msgs.append(str(e))
    assert msgs[0] == msgs[1]
    assert (msgs[0] is None) == all(bool(((t >= 0) & (t < math.inf)).all()) for t in imps)


# --- issue 11: aliasing on every path, NaN parameters, None (each failed before its fix) ---


@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_ssd_dampen_refuses_the_same_parameter_twice_on_every_path(monkeypatch, backend):
    if backend == "reference":
        monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    q = torch.rand(6, 4) + 0.5
    q0 = q.clone()
    full, forget = [torch.ones(4, 6)] * 2, [torch.full((4, 6), 100.0)] * 2
    # q.T is non-contiguous: before the fix that path dampened it twice.
    with pytest.raises(ValueError, match=r"^params\[0\]: shares memory with params\[1\]"):
        imp.ssd_dampen_([q.T, q.T], full, forget, 1.0)
    with pytest.raises(ValueError, match=r"^params\[0\]: shares memory with params\[1\]"):
        imp.ssd_dampen_([q[:4], q[2:]], [torch.ones(4, 4)] * 2, [torch.full((4, 4), 100.0)] * 2, 1.0)
    assert torch.equal(q, q0)


@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_accumulate_refuses_aliased_accumulators_on_every_path(monkeypatch, backend):
    if backend == "reference":
        monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    acc = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"^acc\[0\]: shares memory with acc\[1\]"):
        imp.accumulate_([acc.T, acc.T], [torch.ones(6, 4)] * 2)
    with pytest.raises(ValueError, match=r"^acc\[0\]: shares memory with grads\[0\]"):
        imp.accumulate_([acc.T], [acc.T])
    assert torch.equal(acc, torch.zeros(4, 6))


def test_accumulate_takes_disjoint_interleaved_views():
    acc = torch.zeros(4, 6)
    imp.accumulate_([acc[:, 0::2], acc[:, 1::2]], [torch.ones(4, 3), torch.full((4, 3), 2.0)])
    assert torch.equal(acc[:, 0::2], torch.ones(4, 3)) and torch.equal(acc[:, 1::2], torch.full((4, 3), 4.0))


def test_accumulate_refuses_an_expanded_accumulator():
    acc = torch.zeros(1).expand(5)
    with pytest.raises(ValueError, match=r"^acc\[0\]: its elements share memory"):
        imp.accumulate_([acc], [torch.ones(5)])


@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_ssd_dampen_refuses_nan_parameters_unless_validated(monkeypatch, backend):
    if backend == "reference":
        monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    ok = torch.ones(3)
    p = torch.tensor([float("nan"), 1.0])
    full, forget = [torch.ones(3), torch.ones(2)], [torch.full((3,), 100.0), torch.full((2,), 100.0)]
    with pytest.raises(ValueError, match=r"^params\[1\]: expected finite values, got nan at flat index 0"):
        imp.ssd_dampen_([ok, p], full, forget, 1.0)
    assert torch.equal(ok, torch.ones(3))
    # validated=True: the caller vouches for its inputs; the pass is skipped (the fast path)
    imp.ssd_dampen_([ok, p], full, forget, 1.0, validated=True)
    assert torch.equal(ok, torch.full((3,), 0.01))


@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_accumulate_refuses_nan_and_inf_gradients_before_writing(monkeypatch, backend):
    if backend == "reference":
        monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    accs = [torch.zeros(3), torch.zeros(2)]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^grads\[1\]: expected finite values"):
            imp.accumulate_(accs, [torch.ones(3), torch.tensor([1.0, bad])])
        assert all(torch.equal(a, torch.zeros_like(a)) for a in accs)


def test_none_for_grads_or_importances_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="^grads: expected a list of tensors, got NoneType"):
        imp.accumulate_([torch.zeros(3)], None)
    with pytest.raises(TypeError, match="^imp_full: expected a list of tensors, got NoneType"):
        imp.ssd_dampen_([torch.zeros(3)], None, [torch.zeros(3)], 1.0)
    with pytest.raises(TypeError, match="^imp_forget: expected a list of tensors, got int"):
        imp.ssd_dampen_([torch.zeros(3)], [torch.zeros(3)], 3, 1.0)


def test_validated_must_be_a_bool():
    # Before: validated="no" was truthy and skipped the NaN pass.
    with pytest.raises(TypeError, match="^validated: expected a bool, got str"):
        imp.accumulate_([torch.zeros(3)], [torch.tensor([math.nan, 0.0, 0.0])], validated="no")
    with pytest.raises(TypeError, match="^validated: expected a bool, got int"):
        imp.ssd_dampen_([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], 1.0, validated=1)
