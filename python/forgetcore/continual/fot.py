"""FOT: Federated Orthogonal Training, an in-process federated continual-learning simulation.

Bakman, Yaldiz, Ezzeldin, Avestimehr, "Federated Orthogonal Training: Mitigating Global
Catastrophic Forgetting in Continual Federated Learning", ICLR 2024 (arXiv 2309.01289).

What runs (the paper's Algorithm 1 as the official code ``FedAVGAggregator.aggregate`` /
``expand_orth_set`` and ``mnist_trainer.collect_activations`` do it):

- clients start each round from the global weights and train with plain local SGD; nothing is
  projected on the clients;
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

Departures from the official code: client weights are averaged by sample count when
``weighted=True`` (the code uses 1/#clients, our default); Conv2d activations are unfolded with
the layer's own stride, padding and dilation (the code assumes stride 1, padding 0); the new
directions are re-orthonormalised by Gram-Schmidt applied twice instead of QR (same span).
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
from ..subspace import GradientProjector, Subspace

log = logging.getLogger(__name__)

__all__ = ["FOT", "server_step", "client_sketch", "expand_bases", "split_clients"]


def server_step(
    global_weights: Mapping[str, torch.Tensor],
    client_weights: Sequence[Mapping[str, torch.Tensor]],
    bases: Mapping[str, torch.Tensor],
    *,
    client_fractions: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """One FOT server aggregation; returns the new global weights (inputs are not modified).

    ``bases`` maps a parameter name (a weight of shape (out, ...)) to its (in * k * k, rank)
    input-side basis. ``theta_g - sum_k f_k theta_k`` is the aggregated update; its component
    in span(U) on the input side is removed before it is applied. With empty ``bases`` this is
    FedAvg. ``client_fractions`` default to 1 / #clients.
    """
    if not client_weights:
        raise ValueError("client_weights: expected at least one client")
    k = len(client_weights)
    fr = [1.0 / k] * k if client_fractions is None else [float(f) for f in client_fractions]
    if len(fr) != k or abs(sum(fr) - 1.0) > 1e-6 or min(fr) < 0:
        raise ValueError(f"client_fractions: expected {k} non-negative numbers summing to 1, got {fr}")
    for name in bases:
        if name not in global_weights:
            raise ValueError(f"bases: {name!r} is not a parameter of global_weights")
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
                              [bases[n] for n in names], check=False)
    for name, d in deltas.items():
        new[name] = (global_weights[name].to(torch.float32) - d).to(global_weights[name].dtype)
    return new


def client_sketch(reps: torch.Tensor, basis: torch.Tensor | None, generator: torch.Generator,
                  *, width: int | None = None) -> tuple[torch.Tensor, float]:
    """One client's message for one layer: ``((A - U U^T A) R, ||A - U U^T A|| / ||A||)``.

    ``reps`` is the (d, n) activation matrix, ``R`` (n, width) has private U(-1, 1) entries
    (width d by default), so E[(AR)(AR)^T] is proportional to A A^T.
    """
    a = reps.to(torch.float32)
    d, n = a.shape
    ratio = 1.0
    if basis is not None and basis.shape[1]:
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
    shards: sort by label, cut into ``n_clients * shards_per_client`` shards, deal them out)."""
    n_clients = _checks.positive_int("n_clients", n_clients)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    if iid:
        return [p.sort().values for p in perm.tensor_split(n_clients)]
    order = perm[torch.argsort(y[perm], stable=True)]
    shards = order.tensor_split(n_clients * shards_per_client)
    deal = torch.randperm(len(shards), generator=g).tolist()
    return [torch.cat([shards[s] for s in deal[c::n_clients]]).sort().values for c in range(n_clients)]


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
    """

    def __init__(self, model: nn.Module, *, n_clients: int = 10, rounds: int = 20, local_epochs: int = 1,
                 lr: float = 0.01, weight_decay: float = 1e-5, batch_size: int = 16, epsilon: float = 0.96,
                 eps_inc: float = 0.0, orthogonal: bool = True, iid: bool = True, seed: int = 0,
                 progress: bool = True, weighted: bool = False):
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
        self.seed = int(seed)
        self.progress = progress
        self.subspace = Subspace()
        self.projector = GradientProjector(model, self.subspace)
        # parameter name of each orthogonalised layer's weight
        self.layer_param = {n: (f"{n}.weight" if n else "weight") for n in self.projector.layers}

    def _local_train(self, state: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     g: torch.Generator) -> dict[str, torch.Tensor]:
        self.model.load_state_dict(state)
        self.model.train()
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.local_epochs):
            for idx in torch.randperm(len(y), generator=g).split(self.batch_size):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.model(x[idx]), y[idx]).backward()
                opt.step()
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        return float((self.model(x).argmax(1) == y).float().mean()) if len(y) else float("nan")

    def fit(self, scenario: Sequence[Any]) -> dict[str, Any]:
        """Train on every task of ``scenario`` (items with ``.train`` and ``.test`` TensorDatasets).

        Returns ``{"R": accuracy matrix (list of rows), "ranks": per-task subspace ranks,
        "ratios": per-task mean norm ratios}``.
        """
        rows, ranks, ratio_log = [], [], []
        gen = torch.Generator().manual_seed(self.seed)
        n_tasks = len(scenario)
        bar = tqdm(total=n_tasks * self.rounds, desc="FOT" if self.orthogonal else "FedAvg",
                   disable=not self.progress, leave=False)
        eps = self.epsilon
        for t, task in enumerate(scenario):
            x, y = task.train.tensors
            parts = split_clients(y, self.n_clients, iid=self.iid, seed=self.seed * 1000 + t)
            sizes = np.array([len(p) for p in parts], dtype=np.float64)
            for rnd in range(self.rounds):
                global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                clients, sketches, ratios = [], {}, {n: 0.0 for n in self.layer_param}
                last = rnd == self.rounds - 1
                for c, idx in enumerate(parts):
                    clients.append(self._local_train(global_state, x[idx], y[idx], gen))
                    if last and self.orthogonal and len(idx):
                        reps = self.projector.representations(x[idx])  # the client's own model
                        for n, a in reps.items():
                            basis = self.subspace[n] if n in self.subspace else None
                            s, r = client_sketch(a, basis, gen)
                            sketches[n] = sketches[n] + s if n in sketches else s
                            ratios[n] += sizes[c] / sizes.sum() * r
                bases = ({self.layer_param[n]: self.subspace[n] for n in self.subspace.names()}
                         if self.orthogonal else {})
                fractions = (sizes / sizes.sum()).tolist() if self.weighted else None
                self.model.load_state_dict(server_step(global_state, clients, bases,
                                                       client_fractions=fractions))
                bar.update(1)
            if self.orthogonal:
                expand_bases(self.subspace, sketches, {n: min(1.0, r) for n, r in ratios.items()}, eps)
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
        self.subspace.load_state_dict(state["subspace"])
        self.model.load_state_dict(state["model"])
