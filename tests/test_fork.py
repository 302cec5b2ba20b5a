"""Fork safety: after the Rust kernels ran in the parent, a forked child that calls them must
finish (rayon's global pool has no threads in a child; the kernels run on a pool that is rebuilt
after a fork, see rust/parallel.rs). Every family is run in the parent first, then in an
``os.fork()`` child and in ``DataLoader(num_workers=2)`` workers, with timeouts so that a
regression fails instead of hanging the suite."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import torch

from forgetcore import _core, importance, kvscore, spectral, subspace
from forgetcore.replay import ClassBalancedReservoir, ReservoirBuffer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                                reason="os.fork with threads is only supported here on Linux")

N = 1 << 21  # 2M floats: large enough that every kernel below splits its work over the pool
TIMEOUT_S = 60.0


def _replay() -> float:
    # 2,048 rows of 1 KiB per field and a fresh buffer: the copy takes the parallel path.
    buf = ReservoirBuffer(4096, seed=0)
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(0))
    buf.add(x=x, y=torch.arange(2048))
    cb = ClassBalancedReservoir(4096, seed=0)
    cb.add(x=x, y=torch.arange(2048) % 10)
    assert torch.equal(buf.data()["x"], x) and len(cb) == 2048
    return float(buf.data()["x"].sum())


def _accumulate() -> float:
    acc = torch.zeros(N)
    g = torch.full((N,), 2.0)
    importance.accumulate_([acc], [g])
    assert float(acc[0]) == 4.0 and float(acc[-1]) == 4.0
    return float(acc.sum())


def _ssd() -> float:
    p = torch.ones(N)
    full, forget = torch.ones(N), torch.full((N,), 4.0)
    counts = importance.ssd_dampen_([p], [full], [forget], alpha=1.0, lam=1.0)
    assert int(counts[0]) == N and float(p[0]) == 0.25
    return float(p.sum())


def _project() -> float:
    g = torch.randn(2048, 1024, generator=torch.Generator().manual_seed(0))
    u, _ = torch.linalg.qr(torch.randn(1024, 64, generator=torch.Generator().manual_seed(1)))
    subspace.project_out_([g], [u.contiguous()])
    assert float((g @ u).abs().max()) < 1e-3
    return float(g.square().sum())


def _kappa() -> float:
    mats = [torch.eye(256) * (i + 1) + torch.diag(torch.arange(256.0)) for i in range(8)]
    k = spectral.kappa(mats)
    assert k.shape == (8,) and bool(torch.isfinite(k).all())
    return float(k.sum())


def _basis() -> float:
    # extend_bases (faer SVD across layers) and orthonormalize + project_out_flat_ (GU)
    reps = [torch.randn(128, 400, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    bases = subspace.extend_bases([torch.zeros(128, 0)] * 4, reps, 0.9)
    v, _ = subspace.orthonormalize(torch.randn(4, N // 8, generator=torch.Generator().manual_seed(5)))
    g = torch.randn(N // 8, generator=torch.Generator().manual_seed(6))
    subspace.project_out_flat_(g, v)
    assert float((v @ g).abs().max()) < 1e-2
    return float(sum(b.shape[1] for b in bases)) + float(g.square().sum())


def _spectral_norm() -> float:
    mats = [torch.randn(256, 128, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    return float(spectral.spectral_norm(mats, seed=0).sum())


def _kvscore() -> float:
    scores = torch.zeros(1, 8, 8192)
    attn = torch.full((1, 8, 32, 8192), 1.0 / 8192)
    kvscore.accumulate_(scores, attn, 1.0)
    return float(scores.sum())


FAMILIES = {"replay": _replay, "accumulate_": _accumulate, "ssd_dampen_": _ssd,
            "project_out_": _project, "kappa": _kappa, "basis": _basis, "spectral_norm": _spectral_norm,
            "kvscore": _kvscore}


def _run_in_fork(fn) -> None:
    """Run ``fn`` in an ``os.fork()`` child; fail (and kill it) if it does not exit within TIMEOUT_S."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{fn.__name__} hung in a forked child (killed after {TIMEOUT_S:.0f} s)")
        time.sleep(0.02)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"{fn.__name__} failed in the child ({status})"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kernel_in_a_forked_child_after_the_parent_used_it(family):
    fn = FAMILIES[family]
    want = fn()  # the parent runs it first: its thread pool exists when it forks
    _run_in_fork(fn)
    assert fn() == want  # and the parent still works after the fork


def test_many_threads_then_fork_then_threads_again():
    # A fork while the pool is busy from another thread must not leave the child waiting on it.
    import threading

    stop = threading.Event()

    def busy():
        while not stop.is_set():
            _accumulate()

    t = threading.Thread(target=busy)
    t.start()
    try:
        for _ in range(3):
            _run_in_fork(_accumulate)
    finally:
        stop.set()
        t.join()


class _KernelDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return len(FAMILIES) * 2

    def __getitem__(self, i: int) -> torch.Tensor:
        fn = list(FAMILIES.values())[i % len(FAMILIES)]
        return torch.tensor(fn(), dtype=torch.float64)


def test_dataloader_fork_workers_run_every_kernel():
    ds = _KernelDataset()
    want = torch.stack([ds[i] for i in range(len(ds))])  # the parent's pool is up
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context="fork",
                                         timeout=TIMEOUT_S)
    got = torch.cat([b for b in loader])
    assert torch.equal(got, want)


def _call(name: str) -> float:
    return FAMILIES[name]()


def test_multiprocessing_fork_pool_runs_every_kernel():
    import multiprocessing

    want = [fn() for fn in FAMILIES.values()]  # the parent's pool is up
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map_async(_call, list(FAMILIES)).get(timeout=TIMEOUT_S)
    assert got == want


def test_num_threads_is_the_pool_size():
    n = _core.num_threads()
    assert n >= 1
    want = int(os.environ["RAYON_NUM_THREADS"]) if os.environ.get("RAYON_NUM_THREADS") else n
    assert n == want
