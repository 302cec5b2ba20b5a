"""The bad-input matrix's one assertion, shared by every family's matrix file.

A bad input must give a ``ValueError`` or ``TypeError`` whose message names the argument, and
leave every state it could have touched exactly as it was. :func:`expect_clean_error` checks all
three and tallies the outcome per category, so ``pytest`` prints the matrix's totals at the end
of a run (see ``pytest_terminal_summary`` in ``conftest.py``) in the categories of the note.

    expect_clean_error(lambda: buf.add(x=torch.full((2, 3), float("nan"))),
                       arg="x", state=[buf.state_dict(), x_before])

``state`` takes anything :func:`snapshot` understands: tensors, state dicts, lists, modules
(their ``state_dict``), or zero-argument callables returning one of those (evaluated before
and after, for states a call could replace rather than mutate).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import torch

# category -> count, for the terminal summary: "clean" or one failure category.
TALLY: collections.Counter[str] = collections.Counter()
CATEGORIES = ("clean", "accepted", "wrong type", "unnamed argument", "state changed")


def snapshot(obj: Any) -> Any:
    """A deep, detached copy of ``obj`` that :func:`same` can compare later."""
    if callable(obj) and not isinstance(obj, torch.nn.Module):
        obj = obj()
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [snapshot(v) for v in obj]
    return obj


def same(a: Any, b: Any) -> bool:
    """Bit-identical (NaN equal to NaN), recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        # Compare bytes, so NaN equals NaN and -0.0 differs from 0.0.
        return bool(torch.equal(a.contiguous().view(-1).view(torch.uint8),
                                b.contiguous().view(-1).view(torch.uint8)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN == NaN for plain floats


def expect_clean_error(fn: Callable[[], Any], *, arg: str | Iterable[str],
                       state: Iterable[Any] = (),
                       exc: tuple[type[BaseException], ...] = (ValueError, TypeError)) -> BaseException:
    """Call ``fn``; assert it raises one of ``exc`` naming ``arg`` (any of several names) and that
    every entry of ``state`` is bit-identical afterwards. Returns the exception."""
    names = [arg] if isinstance(arg, str) else list(arg)
    state = list(state)
    before = [snapshot(s) for s in state]
    try:
        fn()
    except exc as e:
        err: BaseException = e
    except Exception as e:  # classify whatever else came out
        TALLY["wrong type"] += 1
        raise AssertionError(f"expected {[t.__name__ for t in exc]} naming {names}, "
                             f"got {type(e).__name__}: {e}") from e
    else:
        TALLY["accepted"] += 1
        raise AssertionError(f"bad input accepted: expected {[t.__name__ for t in exc]} naming {names}")
    if not any(n in str(err) for n in names):
        TALLY["unnamed argument"] += 1
        raise AssertionError(f"message does not name {names}: {type(err).__name__}: {err}")
    changed = [i for i, (s, b) in enumerate(zip(state, before)) if not same(snapshot(s), b)]
    if changed:
        TALLY["state changed"] += 1
        raise AssertionError(f"state {changed} changed although the call raised {type(err).__name__}: {err}")
    TALLY["clean"] += 1
    return err
