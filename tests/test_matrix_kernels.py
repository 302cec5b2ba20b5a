"""The bad-input matrix of the kernel primitives (issue 11, item 9): importance, subspace,
spectral and the torch ops that wrap them.

Each primitive is described once (how to build valid arguments, which tensors it writes, which
must be finite); hypothesis draws the shapes, the seed, the argument to break, the position of
a NaN/inf and the kind of aliasing, and every case goes through the one assertion,
``badinput.expect_clean_error``, with every tensor passed in as state (a call that raises must
leave all of them bit-identical). Both dispatch paths run: the Rust kernels and the torch
reference (``FORGETCORE_BACKEND=reference``), so a check that lives only in one of them shows.

What is not here and why: "empty" is a bad input only for the spectral primitives (an empty
list or a 0-row gradient is a valid no-op elsewhere); CUDA devices are covered by the GPU tests
(no device here), the wrong device being a ``meta`` tensor.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from badinput import expect_clean_error
from forgetcore import importance, ops, spectral, subspace


def _orth(d: int, r: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, max(r, 1), generator=g, dtype=torch.float64))[0][:, :r].float().contiguous()


@dataclass
class Prim:
    name: str
    build: Callable[[torch.Generator, list[tuple[int, int]]], dict[str, Any]]
    call: Callable[[dict[str, Any]], Any]
    lists: tuple[str, ...] = ()  # arguments that are lists of tensors (index-aligned with each other)
    singles: tuple[str, ...] = ()  # arguments that are one tensor
    written: tuple[str, ...] = ()  # modified in place
    finite: tuple[str, ...] = ()  # must be finite
    f32_only: tuple[str, ...] = ()  # float64 is a TypeError too
    scalars: dict[str, list[Any]] = field(default_factory=dict)  # name -> bad values
    nonneg: tuple[str, ...] = ()  # negative values are a ValueError (importances)
    none_entries_ok: tuple[str, ...] = ()  # lists whose None entries mean "skip"
    empty_bad: bool = False
    # which reshapes are wrong: "elementwise" (any change breaks the pairing), "matrix" (a 2-D
    # matrix whose rows are free), "spectral" (any tensor of >= 2 dims is a matrix)
    shape_kind: str = "elementwise"


def bad_shapes(kind: str, t: torch.Tensor) -> list[torch.Tensor]:
    if kind == "elementwise":
        return [torch.zeros(t.shape[0] + 1, *t.shape[1:]), torch.zeros(*t.shape, 2), torch.zeros(())]
    if kind == "matrix":
        return [torch.zeros(*t.shape, 2), torch.zeros(t.shape[-1]), torch.zeros(())]
    return [torch.zeros(t.shape[-1]), torch.zeros(())]


def _imp(shape, g):
    return torch.rand(shape, generator=g) * 10


PRIMS = [
    Prim("importance.accumulate_",
         lambda g, sh: {"acc": [torch.rand(s, generator=g) for s in sh],
                        "grads": [torch.randn(s, generator=g) for s in sh], "scale": 0.5},
         lambda a: importance.accumulate_(a["acc"], a["grads"], a["scale"]),
         lists=("acc", "grads"), written=("acc",), finite=("grads",), f32_only=("acc",),
         scalars={"scale": ["a", math.nan, math.inf, None]}, none_entries_ok=("grads",)),
    Prim("importance.ssd_dampen_",
         lambda g, sh: {"params": [torch.randn(s, generator=g) for s in sh], "imp_full": [_imp(s, g) for s in sh],
                        "imp_forget": [_imp(s, g) * 3 for s in sh], "alpha": 1.0, "lam": 1.0},
         lambda a: importance.ssd_dampen_(a["params"], a["imp_full"], a["imp_forget"], a["alpha"], a["lam"]),
         lists=("params", "imp_full", "imp_forget"), written=("params",), finite=("params", "imp_full", "imp_forget"),
         f32_only=("imp_full", "imp_forget"), nonneg=("imp_full", "imp_forget"),
         scalars={"alpha": ["a", math.nan, -1.0, None], "lam": [math.inf, -0.5, "x"]}),
    Prim("subspace.project_out_",
         lambda g, sh: {"grads": [torch.randn(s, generator=g) for s in sh],
                        "bases": [_orth(s[1], min(s[1], 2), g) for s in sh]},
         lambda a: subspace.project_out_(a["grads"], a["bases"]),
         lists=("grads", "bases"), written=("grads",), finite=("grads",), f32_only=("grads", "bases"),
         shape_kind="matrix"),
    Prim("subspace.project_out_flat_",
         lambda g, sh: {"g": torch.randn(sh[0][0] * sh[0][1], generator=g),
                        "vectors": _orth(sh[0][0] * sh[0][1], 1, g).T.contiguous()},
         lambda a: subspace.project_out_flat_(a["g"], a["vectors"]),
         singles=("g", "vectors"), written=("g",), finite=("g", "vectors"), f32_only=("g", "vectors")),
    Prim("subspace.orthonormalize",
         lambda g, sh: {"vectors": torch.randn(sh[0], generator=g), "tol": 1e-6},
         lambda a: subspace.orthonormalize(a["vectors"], a["tol"]),
         singles=("vectors",), finite=("vectors",), f32_only=("vectors",), scalars={"tol": ["a", math.nan, -1.0]},
         shape_kind="matrix"),
    Prim("subspace.extend_bases",
         lambda g, sh: {"bases": [_orth(s[0], 1, g) for s in sh], "reps": [torch.randn(s, generator=g) for s in sh],
                        "thresholds": 0.9},
         lambda a: subspace.extend_bases(a["bases"], a["reps"], a["thresholds"]),
         lists=("bases", "reps"), finite=("bases", "reps"), f32_only=("bases", "reps"),
         scalars={"thresholds": [math.nan, 1.5, 0.0]}),
    Prim("spectral.kappa",
         lambda g, sh: {"matrices": [torch.randn(s, generator=g) for s in sh]},
         lambda a: spectral.kappa(a["matrices"]),
         lists=("matrices",), finite=("matrices",), empty_bad=True, shape_kind="spectral"),
    Prim("spectral.spectral_norm",
         lambda g, sh: {"matrices": [torch.randn(s, generator=g) for s in sh], "seed": 3},
         lambda a: spectral.spectral_norm(a["matrices"], seed=a["seed"]),
         lists=("matrices",), finite=("matrices",), empty_bad=True, shape_kind="spectral",
         scalars={"seed": [1.5, -1, 2**70, "a"]}),
    Prim("ops.project_out_",
         lambda g, sh: {"grads": [torch.randn(s, generator=g) for s in sh],
                        "bases": [_orth(s[1], min(s[1], 2), g) for s in sh]},
         lambda a: ops.project_out_(a["grads"], a["bases"]),
         lists=("grads", "bases"), written=("grads",), finite=("grads",), f32_only=("grads", "bases"),
         shape_kind="matrix"),
    Prim("ops.accumulate_",
         lambda g, sh: {"acc": [torch.rand(s, generator=g) for s in sh],
                        "grads": [torch.randn(s, generator=g) for s in sh], "scale": 2.0},
         lambda a: ops.accumulate_(a["acc"], a["grads"], a["scale"]),
         lists=("acc", "grads"), written=("acc",), finite=("grads",), f32_only=("acc",),
         scalars={"scale": ["a", math.nan, None]}),
    Prim("ops.ssd_dampen_",
         lambda g, sh: {"params": [torch.randn(s, generator=g) for s in sh], "imp_full": [_imp(s, g) for s in sh],
                        "imp_forget": [_imp(s, g) * 3 for s in sh], "alpha": 1.0, "lam": 1.0},
         lambda a: ops.ssd_dampen_(a["params"], a["imp_full"], a["imp_forget"], a["alpha"], a["lam"]),
         lists=("params", "imp_full", "imp_forget"), written=("params",), finite=("params", "imp_full", "imp_forget"),
         f32_only=("imp_full", "imp_forget"), nonneg=("imp_full", "imp_forget"),
         scalars={"alpha": [math.nan, -1.0], "lam": ["x"]}),
]
BY_NAME = {p.name: p for p in PRIMS}

KINDS = ("nan", "inf", "negative", "dtype", "f64", "shape", "device", "none_list", "none_entry", "not_tensor",
         "alias_same", "alias_view", "alias_overlap", "alias_transposed", "alias_cross", "scalar", "empty")


def _tensors(args: dict[str, Any]) -> list[torch.Tensor]:
    out = []
    for v in args.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, list):
            out += [t for t in v if isinstance(t, torch.Tensor)]
    return [t for t in out if t.device.type != "meta"]  # meta tensors hold no values to compare


def _applicable(p: Prim, kind: str) -> bool:
    if kind in ("nan", "inf"):
        return bool(p.finite)
    if kind == "negative":
        return bool(p.nonneg)
    if kind == "f64":
        return bool(p.f32_only)
    if kind in ("none_list", "none_entry", "not_tensor"):
        return bool(p.lists) if kind != "not_tensor" else True
    if kind.startswith("alias"):
        return bool(p.written) and (kind != "alias_cross" or len(p.lists + p.singles) > 1)
    if kind == "scalar":
        return bool(p.scalars)
    if kind == "empty":
        return p.empty_bad
    return True


def _label(p: Prim, arg: str, i: int) -> str:
    return f"{arg}[{i}]" if arg in p.lists else arg


def _partners(p: Prim, arg: str, i: int) -> list[str]:
    """Names that a mismatch between aligned arguments may legitimately be attributed to."""
    if arg in p.lists:
        return [f"{a}[{i}]" for a in p.lists]
    return list(p.singles)


def corrupt(p: Prim, args: dict[str, Any], kind: str, d: st.DataObject) -> tuple[dict[str, Any], Any, tuple]:
    """Break one argument of ``args`` (a fresh copy) by ``kind``; returns (args, names, exc types)."""
    tensor_args = list(p.lists + p.singles)
    if kind in ("nan", "inf", "negative"):
        pool = p.finite if kind != "negative" else p.nonneg
        arg = d.draw(st.sampled_from(pool))
        i = d.draw(st.integers(0, len(args[arg]) - 1)) if arg in p.lists else 0
        t = args[arg][i] if arg in p.lists else args[arg]
        if t.numel() == 0:
            return args, None, ()
        pos = d.draw(st.integers(0, t.numel() - 1))
        bad = {"nan": math.nan, "inf": d.draw(st.sampled_from([math.inf, -math.inf])), "negative": -1.0}[kind]
        t = t.clone()
        t.view(-1)[pos] = bad
        if arg in p.lists:
            args[arg][i] = t
        else:
            args[arg] = t
        return args, _label(p, arg, i), (ValueError,)
    if kind in ("dtype", "f64", "shape", "device", "not_tensor", "none_entry"):
        pool = p.f32_only if kind == "f64" else (p.lists if kind == "none_entry" else tensor_args)
        arg = d.draw(st.sampled_from(pool))
        i = d.draw(st.integers(0, len(args[arg]) - 1)) if arg in p.lists else 0
        t = args[arg][i] if arg in p.lists else args[arg]
        if kind == "dtype":
            new: Any = t.to(torch.int32)
        elif kind == "f64":
            new = t.double()
        elif kind == "shape":
            new = d.draw(st.sampled_from(bad_shapes(p.shape_kind, t)))
        elif kind == "device":
            new = t.to("meta")
        elif kind == "not_tensor":
            new = d.draw(st.sampled_from([t.numpy().copy(), 1.0, "x"]))
        else:
            if arg in p.none_entries_ok:
                return args, None, ()
            new = None
        if arg in p.lists:
            args[arg][i] = new
        else:
            args[arg] = new
        exc = (TypeError,) if kind in ("dtype", "f64", "not_tensor", "none_entry") else (ValueError, TypeError)
        names = [_label(p, arg, i)] if kind in ("dtype", "f64", "not_tensor", "none_entry") else _partners(p, arg, i)
        if kind == "device" and arg in p.lists:
            # a device mismatch may be reported at the first tensor that differs from tensor 0
            names = [f"{a}[" for a in p.lists]
        return args, names, exc
    if kind == "none_list":
        arg = d.draw(st.sampled_from(p.lists))
        args[arg] = d.draw(st.sampled_from([None, 3, args[arg][0]]))
        return args, arg, (TypeError,)
    if kind == "scalar":
        name = d.draw(st.sampled_from(sorted(p.scalars)))
        args[name] = d.draw(st.sampled_from(p.scalars[name]))
        # extend_bases names one threshold of the list "threshold" (helper K's message)
        return args, [name, name.rstrip("s")], (ValueError, TypeError)
    if kind == "empty":
        arg = p.lists[0]
        i = d.draw(st.integers(0, len(args[arg]) - 1))
        args[arg][i] = torch.zeros(0, 3)
        return args, _label(p, arg, i), (ValueError,)
    # aliasing: the written argument shares memory with itself or with another argument
    w = p.written[0]
    if kind == "alias_cross":
        other = d.draw(st.sampled_from([a for a in tensor_args if a != w]))
        if w in p.lists:
            src = args[other][0]
            if src.shape != args[w][0].shape:
                return args, None, ()
            args[w][0] = src
            return args, [f"{w}[0]", f"{other}[0]"], (ValueError,)
        # a single written vector inside a read matrix: g is row 0 of vectors
        args[w] = args[other][0]
        return args, w, (ValueError,)
    if w not in p.lists or len(args[w]) < 2:
        return args, None, ()
    t0 = args[w][0]
    shape = t0.shape
    for a in p.lists:  # make entry 1 of every aligned list the shape of entry 0
        args[a][1] = args[a][0].clone()
    if kind == "alias_same":
        args[w][1] = t0
    elif kind == "alias_view":
        args[w][1] = t0.view(shape)
    elif kind == "alias_transposed":
        if t0.dim() != 2:
            return args, None, ()
        base = torch.randn(shape[1], shape[0])
        args[w][0], args[w][1] = base.T, base.T
    else:  # two row views of one storage that overlap by k rows
        if t0.dim() != 2 or shape[0] < 2:
            return args, None, ()
        k = d.draw(st.integers(1, shape[0] - 1))
        big = torch.randn(shape[0] + k, shape[1])
        args[w][0], args[w][1] = big[:shape[0]], big[k:]
    return args, [f"{w}[0]", f"{w}[1]"], (ValueError,)


shapes_2d = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 6)), min_size=2, max_size=4)


@pytest.mark.parametrize("backend", ["rust", "reference"])
@pytest.mark.parametrize("prim", [p.name for p in PRIMS])
@given(sh=shapes_2d, seed=st.integers(0, 2**31), kind=st.sampled_from(KINDS), d=st.data())
def test_bad_input_matrix(backend, prim, sh, seed, kind, d):
    p = BY_NAME[prim]
    if not _applicable(p, kind):
        return
    args = p.build(torch.Generator().manual_seed(seed), sh)
    args = {k: (list(v) if isinstance(v, list) else v) for k, v in args.items()}
    args, names, exc = corrupt(p, args, kind, d)
    if names is None:
        return
    state = _tensors(args)
    # an aliased list may hold one tensor twice: the snapshot compares each entry, which is fine
    with _backend(backend):
        expect_clean_error(lambda: p.call(args), arg=names, state=state, exc=exc)


@contextlib.contextmanager
def _backend(name: str):
    # hypothesis refuses function-scoped fixtures (monkeypatch) in @given tests
    old = os.environ.get("FORGETCORE_BACKEND")
    if name == "reference":
        os.environ["FORGETCORE_BACKEND"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FORGETCORE_BACKEND", None)
        else:
            os.environ["FORGETCORE_BACKEND"] = old


@pytest.mark.parametrize("prim", ["importance.accumulate_", "importance.ssd_dampen_", "subspace.project_out_",
                                  "subspace.project_out_flat_", "spectral.kappa", "subspace.orthonormalize"])
@given(sh=shapes_2d, seed=st.integers(0, 2**31))
def test_inputs_that_require_grad_are_detached_and_give_the_same_result(prim, sh, seed):
    p = BY_NAME[prim]
    plain = p.build(torch.Generator().manual_seed(seed), sh)
    graded = p.build(torch.Generator().manual_seed(seed), sh)

    def req(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.requires_grad_(True) if v.is_floating_point() else v
        return [req(t) for t in v] if isinstance(v, list) else v

    leaves = {k: req(v) for k, v in graded.items()}
    want = p.call(plain)
    got = p.call(leaves)
    for a, b in zip(_tensors(plain), _tensors(leaves)):
        assert torch.equal(a, b.detach())
    if isinstance(want, torch.Tensor):
        assert torch.equal(want, got.detach()) or (torch.isnan(want) == torch.isnan(got)).all()
    elif isinstance(want, tuple):
        assert torch.equal(want[0], got[0].detach()) and want[1] == got[1]


def test_tally_categories_cover_the_matrix():
    # The matrix above feeds badinput.TALLY; pytest prints the totals at the end of the run.
    assert set(KINDS) >= {"nan", "inf", "dtype", "shape", "device", "none_list", "alias_same", "alias_overlap"}
