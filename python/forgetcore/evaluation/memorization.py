"""Memorisation and influence scores by subsampled leave-out (Feldman 2019; Feldman & Zhang 2020).

Feldman, "Does Learning Require Memorization? A Short Tale about a Long Tail" (STOC 2020,
arXiv 2019) defines, for a learning algorithm A and training set S,

    mem(A, S, i)     = Pr_{h ~ A(S)}[h(x_i) = y_i] - Pr_{h ~ A(S \\ i)}[h(x_i) = y_i]
    infl(A, S, i, z) = Pr_{h ~ A(S)}[h(x) = y]     - Pr_{h ~ A(S \\ i)}[h(x) = y]

and Feldman & Zhang, "What Neural Networks Memorize and Why" (NeurIPS 2020) estimate both from
``m`` models trained on random subsets of a fixed fraction (official code:
``google-research/heldout-influence-estimation``, ``mnist-example/mnist_infl_mem.py``): with
``M[j, i] = 1`` if example i was in run j's subset, ``C[j, i]`` run j's correctness on training
example i and ``T[j, z]`` on test example z,

    mem_i      = mean_{j: M_ji = 1} C_ji - mean_{j: M_ji = 0} C_ji
    infl[z, i] = mean_{j: M_ji = 1} T_jz - mean_{j: M_ji = 0} T_jz

(denominators clamped at 1e-10, as there). Official defaults: ratio 0.7, 2000 runs; each run's
subset drawn without replacement from a generator seeded with the run index. Here each run's
subset and its training randomness (initialisation, batch order) derive from ``(seed, run)``, so
runs are independent of each other and of how they are spread over processes: a pool of
``workers`` processes (torch.multiprocessing, ``spawn`` start method) gives bit-identical results
to the sequential loop. Memorisation is scored against the labels given (noisy ones included).

Two training paths: a scikit-learn estimator (cloned per run; fast, e.g. 1-NN, for which
``mem_i = 1 - Pr[correct | i held out]`` on a clean duplicate-free set), or a torch model
factory trained with ``forgetcore.training.fit_epochs``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import _checks

__all__ = ["subset_masks", "estimate", "memorization", "top_fraction", "noisy_labels"]


def subset_masks(n: int, n_runs: int, ratio: float = 0.7, seed: int = 0) -> torch.Tensor:
    """``[n_runs, n]`` bool: run j holds ``floor(ratio * n)`` examples, drawn without replacement
    from a generator seeded by (seed, j)."""
    n = _checks.positive_int("n", n)
    n_runs = _checks.positive_int("n_runs", n_runs)
    ratio = _checks.real("ratio", ratio, low=0.0, high=1.0, low_open=True, high_open=True)
    k = math.floor(ratio * n)
    if k < 1:
        raise ValueError(f"ratio: {ratio} of {n} examples leaves an empty subset")
    masks = torch.zeros(n_runs, n, dtype=torch.bool)
    for j in range(n_runs):
        g = torch.Generator().manual_seed(_run_seed(seed, j))
        masks[j, torch.randperm(n, generator=g)[:k]] = True
    return masks


def _run_seed(seed: int, run: int) -> int:
    return (_checks.seed(seed) * 1_000_003 + int(run)) % (2**63 - 1)


def estimate(masks: torch.Tensor, train_correct: torch.Tensor,
             test_correct: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Vectorised masked mean differences: ``mem`` [n_train] and, given test correctness, ``infl`` [n_test, n_train].

    Also ``held_out`` [n_train]: how many runs left each example out (its estimate's sample size).
    """
    if masks.dtype != torch.bool or masks.dim() != 2:
        raise ValueError(f"masks: expected a 2-D bool tensor, got {masks.dtype} of shape {tuple(masks.shape)}")
    if train_correct.shape != masks.shape:
        raise ValueError(f"train_correct: expected shape {tuple(masks.shape)}, got {tuple(train_correct.shape)}")
    m = masks.to(torch.float64)
    nm = 1.0 - m
    c = train_correct.to(torch.float64)
    cnt_in, cnt_out = m.sum(0).clamp_min(1e-10), nm.sum(0).clamp_min(1e-10)
    out = {"mem": ((m * c).sum(0) / cnt_in - (nm * c).sum(0) / cnt_out).float(),
           "held_out": nm.sum(0).to(torch.int64)}
    if test_correct is not None:
        if test_correct.dim() != 2 or test_correct.shape[0] != masks.shape[0]:
            raise ValueError(f"test_correct: expected shape ({masks.shape[0]}, n_test), "
                             f"got {tuple(test_correct.shape)}")
        t = test_correct.to(torch.float64)
        out["infl"] = ((t.T @ m) / cnt_in - (t.T @ nm) / cnt_out).float()
    return out


def _fit_run(job: dict[str, Any], run: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Train one model on the masked subset; return its correctness on train and test."""
    x, y, xt, yt = job["x"], job["y"], job["x_test"], job["y_test"]
    rs = _run_seed(job["seed"], run)
    if job["kind"] == "sklearn":
        from sklearn.base import clone

        est = clone(job["model"])
        if "random_state" in est.get_params():
            est.set_params(random_state=rs % (2**32))
        xn, yn = x.reshape(len(x), -1).numpy(), y.numpy()
        est.fit(xn[mask.numpy()], yn[mask.numpy()])
        tc = torch.from_numpy(est.predict(xn) == yn)
        te = None if xt is None else torch.from_numpy(est.predict(xt.reshape(len(xt), -1).numpy()) == yt.numpy())
        return tc, te
    from torch.utils.data import TensorDataset

    from ..training import fit_epochs, logits_of

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rs)
        model = job["model"]()
    fit_epochs(model, TensorDataset(x[mask], y[mask]), seed=rs, **job["recipe"])
    tc = logits_of(model, TensorDataset(x, y))[0].argmax(1) == y
    te = None if xt is None else logits_of(model, TensorDataset(xt, yt))[0].argmax(1) == yt
    return tc, te


def _fit_chunk(args: tuple[dict[str, Any], list[int], torch.Tensor]
               ) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
    job, runs, masks = args
    torch.set_num_threads(1)  # one process per core: intra-op threads would only contend
    res = [_fit_run(job, r, masks[i]) for i, r in enumerate(runs)]
    tr = torch.stack([a for a, _ in res])
    te = None if res[0][1] is None else torch.stack([b for _, b in res])
    return runs, tr, te


def memorization(x: torch.Tensor, y: torch.Tensor, model: Any, *, x_test: torch.Tensor | None = None,
                 y_test: torch.Tensor | None = None, n_runs: int = 200, ratio: float = 0.7, seed: int = 0,
                 recipe: dict[str, Any] | None = None, workers: int = 1, chunk_runs: int = 8,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """Feldman-Zhang memorisation (and, with a test set, influence) scores of every training example.

    Args:
        x, y: the training set (labels as given: a noisy label is scored as given).
        model: a scikit-learn estimator (anything with ``fit``/``predict`` and ``get_params``), or a
            picklable callable returning a fresh ``nn.Module`` (trained with ``fit_epochs``).
        recipe: ``fit_epochs`` arguments for the torch path (default: 10 epochs, Adam lr 1e-3, batch 64).
        n_runs, ratio, seed: the subsampling (official: 2000 runs, 0.7).
        workers: processes (torch.multiprocessing, ``spawn``); results do not depend on it.

    Returns ``mem``, ``held_out``, ``masks``, ``train_correct`` and, with a test set, ``infl``
    ([n_test, n_train]) and ``test_correct``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x: expected torch tensors x and y")
    if len(x) != len(y) or y.dim() != 1:
        raise ValueError(f"y: expected a 1-D tensor of len(x) = {len(x)} labels, got shape {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"y: expected integer labels, got {y.dtype}")
    if len(x) == 0:
        raise ValueError("x: expected a non-empty training set")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("x: expected finite inputs")
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test: pass x_test and y_test together")
    if x_test is not None and (len(x_test) != len(y_test) or x_test.shape[1:] != x.shape[1:]):  # type: ignore[arg-type]
        raise ValueError(f"x_test: expected examples shaped like x {tuple(x.shape[1:])} with one label each")
    workers = _checks.positive_int("workers", workers)
    chunk_runs = _checks.positive_int("chunk_runs", chunk_runs)
    if hasattr(model, "fit") and hasattr(model, "predict") and hasattr(model, "get_params"):
        kind = "sklearn"
    elif callable(model):
        kind = "torch"
    else:
        raise TypeError(f"model: expected a scikit-learn estimator or a callable returning an nn.Module, "
                        f"got {type(model).__name__}")
    masks = subset_masks(len(x), n_runs, ratio, seed)
    job = {"kind": kind, "model": model, "x": x.cpu(), "y": y.cpu().long(),
           "x_test": None if x_test is None else x_test.cpu(),
           "y_test": None if y_test is None else y_test.cpu().long(),
           "seed": _checks.seed(seed), "recipe": {"epochs": 10, "lr": 1e-3, "batch_size": 64, **(recipe or {})}}
    chunks = [list(range(s, min(s + chunk_runs, n_runs))) for s in range(0, n_runs, chunk_runs)]
    args = [(job, c, masks[c[0]:c[-1] + 1]) for c in chunks]
    train_c = torch.zeros(n_runs, len(x), dtype=torch.bool)
    test_c = None if x_test is None else torch.zeros(n_runs, len(x_test), dtype=torch.bool)
    bar = tqdm(total=n_runs, desc="memorisation runs", disable=not progress)

    def collect(res: tuple[list[int], torch.Tensor, torch.Tensor | None]) -> None:
        runs, tr, te = res
        train_c[runs[0]:runs[-1] + 1] = tr
        if test_c is not None and te is not None:
            test_c[runs[0]:runs[-1] + 1] = te
        bar.update(len(runs))

    try:
        if workers == 1 or len(chunks) == 1:
            threads = torch.get_num_threads()
            try:
                for a in args:
                    collect(_fit_chunk(a))
            finally:
                torch.set_num_threads(threads)
        else:
            import torch.multiprocessing as mp

            # spawn, not fork: a forked child of a process that already ran a Rust kernel can hang
            with mp.get_context("spawn").Pool(min(workers, len(chunks))) as pool:
                for res in pool.imap_unordered(_fit_chunk, args):
                    collect(res)
    finally:
        bar.close()
    out = estimate(masks, train_c, test_c)
    out.update(masks=masks, train_correct=train_c)
    if test_c is not None:
        out["test_correct"] = test_c
    return out


def top_fraction(scores: torch.Tensor, planted: torch.Tensor, k: int | None = None) -> float:
    """Fraction of the ``k`` highest scores (default: as many as planted) that fall on planted examples."""
    planted = planted.bool()
    k = int(planted.sum()) if k is None else _checks.positive_int("k", k)
    top = torch.topk(scores, k).indices
    return float(planted[top].float().mean())


def noisy_labels(y: torch.Tensor, fraction: float, seed: int,
                 n_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy of ``y`` with a seeded ``fraction`` relabelled to a different class; returns ``(y_noisy, flipped mask)``."""
    fraction = _checks.real("fraction", fraction, low=0.0, high=1.0, high_open=True)
    k = int(n_classes or int(y.max()) + 1)
    g = torch.Generator().manual_seed(_checks.seed(seed))
    idx = torch.randperm(len(y), generator=g)[: round(fraction * len(y))]
    yn = y.clone()
    yn[idx] = (y[idx] + torch.randint(1, k, (len(idx),), generator=g)) % k
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[idx] = True
    return yn, flipped

