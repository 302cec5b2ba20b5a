"""Thread safety: four Python threads calling the Rust kernels at once (the GIL is released
around every kernel, so they really run together, each splitting its work over the shared pool)
get exactly what the same calls return one after another, for every family. Each thread works
on its own seeded data, so results that leaked between calls would not match."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from forgetcore import importance, kvscore, spectral, subspace
from forgetcore.replay import ClassBalancedReservoir, ReservoirBuffer

THREADS = 4
ROUNDS = 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _replay(seed: int) -> list[torch.Tensor]:
    x = torch.randn(3000, 64, generator=_gen(seed))
    buf = ReservoirBuffer(1024, seed=seed)
    buf.add(x=x, y=torch.arange(3000))
    cb = ClassBalancedReservoir(512, seed=seed)
    cb.add(x=x, y=torch.arange(3000) % 7)
    return [buf.data()["x"], cb.data()["x"], buf.sample(64, generator=_gen(seed))["y"]]


def _accumulate(seed: int) -> list[torch.Tensor]:
    accs = [torch.rand(300_000, generator=_gen(seed)), torch.rand(77, 5, generator=_gen(seed + 1))]
    grads = [torch.randn(300_000, generator=_gen(seed + 2)), torch.randn(77, 5, generator=_gen(seed + 3))]
    importance.accumulate_(accs, grads, 0.5)
    return accs


def _ssd(seed: int) -> list[torch.Tensor]:
    p = [torch.randn(300_000, generator=_gen(seed))]
    full = [torch.rand(300_000, generator=_gen(seed + 1))]
    forget = [torch.rand(300_000, generator=_gen(seed + 2)) * 5]
    counts = importance.ssd_dampen_(p, full, forget, alpha=2.0, lam=1.0)
    return p + [counts]


def _project(seed: int) -> list[torch.Tensor]:
    g = [torch.randn(512, 256, generator=_gen(seed)), torch.randn(64, 32, generator=_gen(seed + 1))]
    u = [torch.linalg.qr(torch.randn(256, 16, generator=_gen(seed + 2)))[0].contiguous(),
         torch.linalg.qr(torch.randn(32, 4, generator=_gen(seed + 3)))[0].contiguous()]
    subspace.project_out_(g, u)
    flat = torch.randn(20_000, generator=_gen(seed + 4))
    v, _ = subspace.orthonormalize(torch.randn(3, 20_000, generator=_gen(seed + 5)))
    subspace.project_out_flat_(flat, v)
    return g + [flat, v]


def _basis(seed: int) -> list[torch.Tensor]:
    reps = [torch.randn(64, 200, generator=_gen(seed)), torch.randn(32, 50, generator=_gen(seed + 1))]
    return subspace.extend_bases([torch.zeros(64, 0), torch.zeros(32, 0)], reps, 0.9)


def _spectral(seed: int) -> list[torch.Tensor]:
    mats = [torch.randn(96, 64, generator=_gen(seed + i)) for i in range(6)]
    return [spectral.kappa(mats), spectral.spectral_norm(mats, seed=seed)]


def _kvscore(seed: int) -> list[torch.Tensor]:
    scores = torch.rand(2, 4, 512, generator=_gen(seed))
    attn = torch.softmax(torch.randn(2, 8, 16, 512, generator=_gen(seed + 1)), dim=-1)
    kvscore.accumulate_(scores, attn, 0.9, group=2)
    return [scores]


FAMILIES: dict[str, Callable[[int], list[torch.Tensor]]] = {
    "replay": _replay, "accumulate_": _accumulate, "ssd_dampen_": _ssd, "project_out_": _project,
    "extend_bases": _basis, "spectral": _spectral, "kvscore": _kvscore}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_four_threads_equal_the_sequential_results(family):
    fn = FAMILIES[family]
    seeds = [1000 * r + t for r in range(ROUNDS) for t in range(THREADS)]
    want = {s: fn(s) for s in seeds}
    got: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        try:
            start.wait()
            for r in range(ROUNDS):
                s = 1000 * r + t
                got[s] = fn(s)
        except BaseException as e:  # reported below, with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread did not finish"
    assert not errors, errors[0]
    for s in seeds:
        assert len(got[s]) == len(want[s])
        for a, b in zip(got[s], want[s]):
            assert torch.equal(a, b), (family, s)


def test_threads_mixing_every_family_at_once():
    # Different kernels on the pool at the same time, each thread cycling through the families.
    names = list(FAMILIES)
    want = {(n, s): FAMILIES[n](s) for n in names for s in range(THREADS)}
    got: dict[tuple[str, int], list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for k in range(len(names)):
                n = names[(t + k) % len(names)]
                got[(n, t)] = FAMILIES[n](t)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors[0]
    for key, w in want.items():
        assert all(torch.equal(a, b) for a, b in zip(got[key], w)), key
