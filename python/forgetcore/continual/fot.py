"""FOT: Federated Orthogonal Training, in one process, across torch.distributed ranks, or on Flower.

Bakman, Yaldiz, Ezzeldin, Avestimehr, "Federated Orthogonal Training: Mitigating Global
Catastrophic Forgetting in Continual Federated Learning", ICLR 2024 (arXiv 2309.01289).

What runs (the paper's Algorithm 1 as the official code ``FedAVGAggregator.aggregate`` /
``expand_orth_set`` and ``mnist_trainer.collect_activations`` do it):

- clients start each round from the global weights and train with plain local SGD; nothing is
  projected on the clients (:func:`local_train`);
- the server averages the client weights, takes the aggregated update ``D = theta_g - mean_k theta_k``
  and removes, for every Linear/Conv2d weight, its input-side component in the global subspace of
  old tasks, ``D_l <- D_l - (D_l U_l) U_l^T`` (:func:`server_step`, a pure function of the global
  weights, the client weights and the bases, so a Flower strategy can call it);
- at the last round of each task every client sends, per layer, a random sketch of its input
  activations over all its local data, taken after removing their part in span(U):
  ``(A - U U^T A) R_k`` with a private ``R_k`` of i.i.d. U(-1, 1) entries, plus its norm ratio
  ``||A - U U^T A|| / ||A||`` and its sample count (:func:`client_sketch`). The server sees only
  the sum of the sketches (secure-aggregation friendly) and the sample-weighted mean ratio, and
  extends the bases with FOT's norm-ratio criterion (``subspace.extend_basis(criterion="norm_ratio")``):
  ``eps' = (r - (1 - epsilon)) / r``, the fewest leading directions of the summed sketch whose
  energy share exceeds eps', at least one, then re-orthonormalised (:func:`expand_bases`);
  ``epsilon`` grows by ``eps_inc`` after each task.

``orthogonal=False`` gives FedAvg (same loop, no projection, no subspace).

One client's work (:func:`client_update`) and the server's (:func:`aggregate`) are the same
functions in the three engines: :class:`FOT` in one process, :class:`FOT` under
``torch.distributed`` (each rank simulates the clients ``c`` with ``c % world == rank``, the
updates are all-gathered in client order, every rank runs the same server step) and the Flower
apps of :mod:`forgetcore.flower`. Each client draws its batch order and its sketch from its own
generator, seeded by (seed, task, round, client) (:func:`client_generator`), so the three give
the same result (this seeding is ours: it is what makes the three engines agree).

Departures from the official code: client weights are averaged by sample count when
``weighted=True`` (the code uses 1/#clients, our default); Conv2d activations are unfolded with
the layer's own stride, padding and dilation (the code assumes stride 1, padding 0); the new
directions are re-orthonormalised by Gram-Schmidt applied twice instead of QR (same span);
a client that does not answer in a round (a dropped Flower node) is left out of that round's
average and sketch sum, with the fractions renormalised over the clients that answered.
Biases are averaged without projection (the paper's networks have none).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import _checks, subspace
from .. import distributed as fcdist
from ..subspace import GradientProjector, Subspace

log = logging.getLogger(__name__)

__all__ = ["FOT", "server_step", "client_sketch", "expand_bases", "split_clients", "client_generator",
           "local_train", "client_update", "nonfinite", "aggregate"]


def _float_tensor(name: str, t: Any, ndim: int | None = None) -> torch.Tensor:
    _checks.tensor(name, t, dtype=(torch.float32, torch.float64, torch.float16, torch.bfloat16), ndim=ndim)
    return _checks.finite(name, t)


def _check_weights(name: str, w: Any, ref: Mapping[str, torch.Tensor] | None = None) -> None:
    if not isinstance(w, Mapping):
        raise TypeError(f"{name}: expected a mapping of parameter names to tensors, got {type(w).__name__}")
    if ref is not None and set(w) != set(ref):
        missing, extra = sorted(set(ref) - set(w)), sorted(set(w) - set(ref))
        raise ValueError(f"{name}: expected the keys of global_weights; missing {missing}, unexpected {extra}")
    for k, v in w.items():
        _checks.tensor(f"{name}[{k!r}]", v)
        if ref is not None and (v.shape != ref[k].shape or v.dtype != ref[k].dtype):
            raise ValueError(f"{name}[{k!r}]: expected {_checks.describe(ref[k])}, got {_checks.describe(v)}")
        _checks.finite(f"{name}[{k!r}]", v)


def server_step(
    global_weights: Mapping[str, torch.Tensor],
    client_weights: Sequence[Mapping[str, torch.Tensor]],
    bases: Mapping[str, torch.Tensor],
    *,
    client_fractions: Sequence[float] | None = None,
    validated: bool = False,
) -> dict[str, torch.Tensor]:
    """One FOT server aggregation; returns the new global weights (inputs are not modified).

    ``bases`` maps a parameter name (a weight of shape (out, ...)) to its (in * k * k, rank)
    input-side basis. ``theta_g - sum_k f_k theta_k`` is the aggregated update; its component
    in span(U) on the input side is removed before it is applied. With empty ``bases`` this is
    FedAvg. ``client_fractions`` default to 1 / #clients. ``validated=True`` skips the finiteness
    and shape checks of the weights (for weights forgetcore made itself).
    """
    if isinstance(client_weights, Mapping) or not isinstance(client_weights, Sequence):
        raise TypeError(f"client_weights: expected a sequence of state dicts, got {type(client_weights).__name__}")
    if not client_weights:
        raise ValueError("client_weights: expected at least one client")
    k = len(client_weights)
    if client_fractions is None:
        fr = [1.0 / k] * k
    else:
        if isinstance(client_fractions, (str, bytes)) or not isinstance(client_fractions, Sequence):
            raise TypeError(f"client_fractions: expected a sequence of numbers, got {type(client_fractions).__name__}")
        fr = [_checks.real(f"client_fractions[{i}]", f, low=0.0) for i, f in enumerate(client_fractions)]
        if len(fr) != k or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"client_fractions: expected {k} non-negative numbers summing to 1, got {fr}")
    if not isinstance(bases, Mapping):
        raise TypeError(f"bases: expected a mapping of parameter names to bases, got {type(bases).__name__}")
    if not validated:
        _check_weights("global_weights", global_weights)
        for i, c in enumerate(client_weights):
            _check_weights(f"client_weights[{i}]", c, global_weights)
    for name, u in bases.items():
        if name not in global_weights:
            raise ValueError(f"bases: {name!r} is not a parameter of global_weights")
        w = global_weights[name]
        _float_tensor(f"bases[{name!r}]", u, ndim=2)
        if w.dim() < 2 or u.shape[0] != w[0].numel():
            raise ValueError(f"bases[{name!r}]: expected {w[0].numel() if w.dim() else 0} rows for the weight "
                             f"{_checks.describe(w)}, got {_checks.describe(u)}")
    new: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for name, g in global_weights.items():
        if not g.is_floating_point():
            new[name] = client_weights[0][name].clone()  # counters (e.g. BN num_batches_tracked)
            continue
        avg = sum(f * c[name].to(torch.float32) for f, c in zip(fr, client_weights))
        deltas[name] = (g.to(torch.float32) - avg).contiguous()
    names = [n for n in bases if bases[n].shape[1] > 0]
    if names:
        subspace.project_out_([deltas[n].view(deltas[n].shape[0], -1) for n in names],
                              [bases[n].to(torch.float32) for n in names], check=False)
    for name, d in deltas.items():
        new[name] = (global_weights[name].to(torch.float32) - d).to(global_weights[name].dtype)
    return new


def client_sketch(reps: torch.Tensor, basis: torch.Tensor | None, generator: torch.Generator,
                  *, width: int | None = None) -> tuple[torch.Tensor, float]:
    """One client's message for one layer: ``((A - U U^T A) R, ||A - U U^T A|| / ||A||)``.

    ``reps`` is the (d, n) activation matrix, ``R`` (n, width) has private U(-1, 1) entries
    (width d by default), so E[(AR)(AR)^T] is proportional to A A^T.
    """
    reps = _float_tensor("reps", reps, ndim=2)
    if basis is not None:
        basis = _float_tensor("basis", basis, ndim=2)
        if basis.shape[0] != reps.shape[0]:
            raise ValueError(f"basis: expected {reps.shape[0]} rows (the rows of reps), got {_checks.describe(basis)}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if width is not None:
        width = _checks.positive_int("width", width)
    a = reps.to(torch.float32)
    d, n = a.shape
    ratio = 1.0
    if basis is not None and basis.shape[1]:
        basis = basis.to(torch.float32)
        norm = float(torch.linalg.vector_norm(a))
        a = a - basis @ (basis.T @ a)
        ratio = float(torch.linalg.vector_norm(a)) / norm if norm > 0 else 0.0
    r = torch.rand(n, width or d, generator=generator) * 2 - 1
    return a @ r, ratio


def expand_bases(bases: Subspace, sketch_sums: Mapping[str, torch.Tensor], ratios: Mapping[str, float],
                 epsilon: float) -> dict[str, int]:
    """Server side of the subspace growth: extend each layer from the summed sketch with FOT's
    norm-ratio criterion and the clients' weighted mean ratio. Returns directions added."""
    return bases.extend(dict(sketch_sums), epsilon, criterion="norm_ratio", ratios=dict(ratios))


def split_clients(y: torch.Tensor, n_clients: int, *, iid: bool, seed: int,
                  shards_per_client: int = 2) -> list[torch.Tensor]:
    """Client index sets: IID (a seeded shuffle cut in equal parts) or non-IID (FedAvg's label
    shards: sort by label, cut into ``n_clients * shards_per_client`` shards, deal them out).

    Every client gets at least one example (one shard), so ``n_clients`` (times
    ``shards_per_client`` when non-IID) is at most ``len(y)``; checked before anything is allocated.
    """
    _checks.tensor("y", y, ndim=1)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y: expected an integer label tensor, got {_checks.describe(y)}")
    n_clients = _checks.positive_int("n_clients", n_clients)
    shards_per_client = _checks.positive_int("shards_per_client", shards_per_client)
    seed = _checks.seed(seed)
    pieces = n_clients if iid else n_clients * shards_per_client
    if pieces > len(y):
        what = "n_clients" if iid else "n_clients * shards_per_client"
        raise ValueError(f"n_clients: expected {what} <= len(y) = {len(y)} so that every client gets data, "
                         f"got {pieces}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    if iid:
        return [p.sort().values for p in perm.tensor_split(n_clients)]
    order = perm[torch.argsort(y[perm], stable=True)]
    shards = order.tensor_split(pieces)
    deal = torch.randperm(len(shards), generator=g).tolist()
    return [torch.cat([shards[s] for s in deal[c::n_clients]]).sort().values for c in range(n_clients)]


def client_generator(seed: int, task: int, rnd: int, client: int) -> torch.Generator:
    """The private generator of one client in one round (batch order, then sketch), the same in
    every engine: seeded by mixing (seed, task, round, client) with numpy's SeedSequence."""
    words = [int(v) % 2**64 for v in (seed, task, rnd, client)]
    s = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]) >> 1
    return torch.Generator().manual_seed(s)


def local_train(model: nn.Module, state: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator, *, lr: float, weight_decay: float, batch_size: int,
                local_epochs: int) -> dict[str, torch.Tensor]:
    """A client's plain local SGD from ``state``; returns its weights (``model`` is used as scratch)."""
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(local_epochs):
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def client_update(projector: GradientProjector, state: Mapping[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor, generator: torch.Generator, *, bases: Mapping[str, torch.Tensor] | None,
                  sketch: bool, lr: float, weight_decay: float, batch_size: int,
                  local_epochs: int) -> dict[str, Any]:
    """One client's round: local training, then (``sketch=True``, at a task's last round) its
    per-layer sketches and norm ratios against ``bases`` (layer name -> U).

    Returns ``{"weights", "n", "sketches", "ratios"}``: what the client sends to the server.
    """
    weights = local_train(projector.model, state, x, y, generator, lr=lr, weight_decay=weight_decay,
                          batch_size=batch_size, local_epochs=local_epochs)
    sketches: dict[str, torch.Tensor] = {}
    ratios: dict[str, float] = {}
    diverged = any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in weights.values())
    if sketch and len(y) and not diverged:  # a diverged client is reported by the server (nonfinite)
        for n, a in projector.representations(x).items():  # the client's own trained model
            sketches[n], ratios[n] = client_sketch(a, (bases or {}).get(n), generator)
    return {"weights": weights, "n": len(y), "sketches": sketches, "ratios": ratios}


def nonfinite(update: Mapping[str, Any]) -> str | None:
    """The name of the first non-finite tensor of a client update (weights, then sketches), else None."""
    for group in ("weights", "sketches"):
        for k, v in update[group].items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"{group}[{k!r}]"
    return None


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, Any]],
              bases: Mapping[str, torch.Tensor], *, weighted: bool, validated: bool = False,
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """The server's round over the clients that answered (in client order): the new global
    weights (:func:`server_step`), the summed sketches and the sample-weighted mean norm ratios.

    Fractions and ratio weights are renormalised over ``updates``, so a round that lost a client
    is the round of the others. ``validated=True`` skips :func:`server_step`'s checks of the
    weights (for updates already checked with :func:`nonfinite`).
    """
    if not updates:
        raise ValueError("updates: expected at least one client update")
    sizes = np.array([u["n"] for u in updates], dtype=np.float64)
    fractions = (sizes / sizes.sum()).tolist() if weighted and sizes.sum() > 0 else None
    new = server_step(global_state, [u["weights"] for u in updates], bases, client_fractions=fractions,
                      validated=validated)
    sums: dict[str, torch.Tensor] = {}
    ratios: dict[str, float] = {}
    total = sizes.sum()
    for u, n in zip(updates, sizes):
        for name, s in u["sketches"].items():
            sums[name] = sums[name] + s if name in sums else s
            ratios[name] = ratios.get(name, 0.0) + n / total * u["ratios"][name]
    return new, sums, {n: min(1.0, r) for n, r in ratios.items()}


class FOT:
    """Federated Orthogonal Training (Bakman et al., ICLR 2024); ``orthogonal=False`` is FedAvg.

    Args:
        model: the global model (trained in place); its Linear/Conv2d weights are the
            orthogonalised layers.
        n_clients: clients; the training data of every task is split among them.
        rounds: communication rounds per task (all clients take part in every round).
        local_epochs, lr, weight_decay, batch_size: the clients' plain SGD
            (official defaults: lr 0.01, weight decay 1e-5).
        epsilon, eps_inc: FOT's threshold and its increase per task (PMNIST: 0.96 IID, 0.94 non-IID).
        iid: IID client splits or FedAvg-style label shards.
        weighted: average the client weights by their sample counts (``client_fractions`` of
            :func:`server_step`); False (default, as the official code) weights every client 1/#clients.
        seed: client splits, batch order, sketches.
        distributed: simulate the clients across the ranks of the initialised ``torch.distributed``
            group (``None``: when one is initialised); the result equals the single-process run.
    """

    def __init__(self, model: nn.Module, *, n_clients: int = 10, rounds: int = 20, local_epochs: int = 1,
                 lr: float = 0.01, weight_decay: float = 1e-5, batch_size: int = 16, epsilon: float = 0.96,
                 eps_inc: float = 0.0, orthogonal: bool = True, iid: bool = True, seed: int = 0,
                 progress: bool = True, weighted: bool = False, distributed: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.n_clients = _checks.positive_int("n_clients", n_clients)
        self.rounds = _checks.positive_int("rounds", rounds)
        self.local_epochs = _checks.positive_int("local_epochs", local_epochs)
        self.lr = _checks.real("lr", lr, low=0.0, low_open=True)
        self.weight_decay = _checks.real("weight_decay", weight_decay, low=0.0)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.epsilon = _checks.real("epsilon", epsilon, low=0.0, high=1.0, low_open=True)
        self.eps_inc = _checks.real("eps_inc", eps_inc, low=0.0)
        self.orthogonal = bool(orthogonal)
        self.iid = bool(iid)
        if not isinstance(weighted, bool):
            raise TypeError(f"weighted: expected a bool, got {type(weighted).__name__}")
        self.weighted = weighted
        self.seed = _checks.seed(seed)
        self.progress = progress
        self.world = fcdist.resolve_world(distributed)
        self.rank = fcdist.rank() if self.world > 1 else 0
        self.subspace = Subspace()
        self.projector = GradientProjector(model, self.subspace)
        # parameter name of each orthogonalised layer's weight
        self.layer_param = {n: (f"{n}.weight" if n else "weight") for n in self.projector.layers}

    @torch.no_grad()
    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        return float((self.model(x).argmax(1) == y).float().mean()) if len(y) else float("nan")

    def param_bases(self) -> dict[str, torch.Tensor]:
        """The current bases keyed by weight name (what :func:`server_step` takes)."""
        if not self.orthogonal:
            return {}
        return {self.layer_param[n]: self.subspace[n] for n in self.subspace.names()}

    def _gather(self, mine: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Every client's update in client order, on every rank."""
        if self.world == 1:
            return [mine[c] for c in sorted(mine)]
        import torch.distributed as dist

        box: list[Any] = [None] * self.world
        dist.all_gather_object(box, mine)
        merged = {c: u for part in box for c, u in part.items()}
        return [merged[c] for c in range(self.n_clients)]

    def fit(self, scenario: Sequence[Any]) -> dict[str, Any]:
        """Train on every task of ``scenario`` (items with ``.train`` and ``.test`` TensorDatasets).

        Returns ``{"R": accuracy matrix (list of rows), "ranks": per-task subspace ranks,
        "ratios": per-task mean norm ratios}``. A fit that raises (e.g. a client whose training
        diverged) restores the model and the bases it started from.
        """
        start = self.state_dict()
        try:
            return self._fit(scenario)
        except BaseException:
            self.model.load_state_dict(start["model"])
            self.subspace.load_state_dict(start["subspace"])
            raise

    def _fit(self, scenario: Sequence[Any]) -> dict[str, Any]:
        rows, ranks, ratio_log = [], [], []
        n_tasks = len(scenario)
        bar = tqdm(total=n_tasks * self.rounds, desc="FOT" if self.orthogonal else "FedAvg",
                   disable=not self.progress or self.rank != 0, leave=False)
        eps = self.epsilon
        hp = dict(lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
                  local_epochs=self.local_epochs)
        for t, task in enumerate(scenario):
            x, y = task.train.tensors
            parts = split_clients(y, self.n_clients, iid=self.iid, seed=self.seed * 1000 + t)
            layer_bases = {n: self.subspace[n] for n in self.subspace.names()}
            for rnd in range(self.rounds):
                global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                sketch = self.orthogonal and rnd == self.rounds - 1
                mine = {c: client_update(self.projector, global_state, x[parts[c]], y[parts[c]],
                                         client_generator(self.seed, t, rnd, c), bases=layer_bases,
                                         sketch=sketch, **hp)
                        for c in range(self.rank, self.n_clients, self.world)}
                updates = self._gather(mine)
                for c, u in enumerate(updates):  # on every rank alike, so no rank is left waiting
                    bad = nonfinite(u)
                    if bad is not None:
                        raise ValueError(f"model: client {c}'s local training in task {t}, round {rnd} made "
                                         f"{bad} non-finite (lr={self.lr} too large?)")
                new, sums, ratios = aggregate(global_state, updates, self.param_bases(),
                                              weighted=self.weighted, validated=True)
                self.model.load_state_dict(new)
                bar.update(1)
            if self.orthogonal:
                expand_bases(self.subspace, sums, ratios, eps)
                fcdist.check_agree("subspace", self.subspace.state_dict())
                eps = min(1.0, eps + self.eps_inc)
                ratio_log.append(dict(ratios))
            ranks.append(self.subspace.ranks())
            rows.append([self._accuracy(*s.test.tensors) for s in scenario])
            log.info("%s task %d: accuracies %s ranks %s", "FOT" if self.orthogonal else "FedAvg",
                     t, np.round(rows[-1], 3).tolist(), ranks[-1])
        bar.close()
        return {"R": rows, "ranks": ranks, "ratios": ratio_log}

    def state_dict(self) -> dict[str, Any]:
        return {"model": copy.deepcopy(self.model.state_dict()), "subspace": self.subspace.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Validate the whole state (keys, shapes, dtypes, finite weights, orthonormal bases of the
        model's own layers), then apply it; a state that fails changes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping, got {type(state).__name__}")
        if set(state) != {"model", "subspace"}:
            raise ValueError(f"state: expected keys ['model', 'subspace'], got {sorted(state, key=str)}")
        _check_weights("state['model']", state["model"], self.model.state_dict())
        sub = state["subspace"]
        bases = sub.get("bases") if isinstance(sub, Mapping) else None
        if not isinstance(bases, Mapping):
            raise ValueError("state['subspace']: expected a mapping with a 'bases' mapping")
        dims = self.projector.input_dims()
        for name, u in bases.items():
            if name not in dims:
                raise ValueError(f"state['subspace']: {name!r} is not a Linear/Conv2d layer of the model")
            where = f"state['subspace']['bases'][{name!r}]"
            _checks.tensor(where, u, dtype=torch.float32, ndim=2)
            if u.shape[0] != dims[name] or u.shape[1] > dims[name]:
                raise ValueError(f"{where}: expected ({dims[name]}, rank <= {dims[name]}), got {_checks.describe(u)}")
            subspace.check_orthonormal(where, u)
        # both checked above, so neither load can fail half-way
        self.model.load_state_dict(state["model"])
        self.subspace.load_state_dict(sub)
