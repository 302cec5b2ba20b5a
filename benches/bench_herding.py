"""Herding exemplar selection: PyCIL's way against ``forgetcore.replay_samplers.herding``.

PyCIL (``models/base.py::_construct_exemplar``, the memory of its WA, iCaRL, ... models)
normalises the class's feature rows, then for each of the ``m`` exemplars builds the (N, d)
array ``(vectors + S) / k``, takes the row nearest to the class mean, and ``np.delete`` s that row
from the feature array and from the data array (the class's images), copying both every time.
forgetcore keeps the arrays, masks the selected rows, and scores every candidate with one
matrix-vector product per exemplar (``||mu - (S + f)/k||^2`` expanded).

Both sides are timed in turns in the same run (the machine is shared and noisy; the median of
``--repeats`` turns is reported) and their selections are checked to be identical.

    PYTHONPATH=python python benches/bench_herding.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from forgetcore.replay import herding

EPSILON = 1e-8


def pycil_herding(vectors: np.ndarray, data: np.ndarray, m: int) -> list[int]:
    """PyCIL's selection loop (rewritten here as the baseline; returns original row indices)."""
    vectors = (vectors.T / (np.linalg.norm(vectors.T, axis=0) + EPSILON)).T
    class_mean = np.mean(vectors, axis=0)
    index = np.arange(len(vectors))
    selected, exemplar_vectors = [], []
    for k in range(1, m + 1):
        S = np.sum(exemplar_vectors, axis=0)
        mu_p = (vectors + S) / k
        i = np.argmin(np.sqrt(np.sum((class_mean - mu_p) ** 2, axis=1)))
        selected.append(int(index[i]))
        exemplar_vectors.append(np.array(vectors[i]))
        vectors = np.delete(vectors, i, axis=0)
        data = np.delete(data, i, axis=0)  # PyCIL keeps the images in step with the features
        index = np.delete(index, i)
    return selected


def bench(n: int, d: int, m: int, image: tuple[int, ...], repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    feats = np.maximum(rng.standard_normal((n, d)), 0).astype(np.float32)  # post-ReLU features
    data = rng.integers(0, 255, size=(n, *image), dtype=np.uint8)
    ft = torch.from_numpy(feats)
    a = pycil_herding(feats.copy(), data, m)
    b = herding(ft, m).tolist()
    same = a == b
    t_base, t_ours = [], []
    for _ in range(repeats):  # in turns
        t0 = time.perf_counter()
        pycil_herding(feats.copy(), data, m)
        t_base.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        herding(ft, m)
        t_ours.append(time.perf_counter() - t0)
    base, ours = statistics.median(t_base), statistics.median(t_ours)
    return {"n": n, "d": d, "m": m, "baseline_ms": 1e3 * base, "forgetcore_ms": 1e3 * ours,
            "speedup": base / ours, "same": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(200, 100, 20, (1, 8, 8)), (500, 64, 20, (32, 32, 3))]  # digits-like; CIFAR-100 class, ResNet-32
    if not args.quick:
        cases += [(1300, 512, 20, (224, 224, 3)), (5000, 512, 200, (32, 32, 3))]  # ImageNet class; CIFAR-10 class
    repeats = 3 if args.quick else 7
    print(f"{'N':>6} {'d':>5} {'m':>5} | {'PyCIL way ms':>12} {'forgetcore ms':>13} {'speedup':>8} | same selection")
    for n, d, m, img in cases:
        r = bench(n, d, m, img, repeats)
        print(f"{r['n']:>6} {r['d']:>5} {r['m']:>5} | {r['baseline_ms']:12.2f} {r['forgetcore_ms']:13.2f} "
              f"{r['speedup']:8.1f} | {r['same']}")
    print(f"(median of {repeats} turns, {args.threads} thread(s); PyCIL's loop copies the features and the "
          "images once per selected exemplar)")


if __name__ == "__main__":
    main()
