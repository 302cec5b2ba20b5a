"""FOT on Flower: a ``ServerApp`` whose strategy runs FOT's server step, ``ClientApp`` clients.

Bakman et al., "Federated Orthogonal Training", ICLR 2024 (see :mod:`forgetcore.continual.fot`).
Needs the optional extra ``pip install forgetcore[fl]``: the apps use Flower's Message API (1.21 on);
:func:`deploy_local` starts the SuperLink and SuperNodes with the command lines of Flower 1.42
(one HTTP port for the Fleet and Control APIs, ``--disable-runtime-dependency-installation``).

- :class:`FOTStrategy` is a Flower ``Strategy``: each server round sends the global weights (and,
  at a task's last round, the layers' bases) to every node; :meth:`FOTStrategy.aggregate_train`
  calls FOT's :func:`~forgetcore.continual.fot.aggregate` (the pure ``server_step`` plus the sketch
  sums) over the nodes that answered, and at a task's last round extends the bases from the summed
  sketches. A node that fails or does not answer within the round's timeout is left out of that
  round (fractions and ratio weights renormalised over the others), as Flower's strategies do;
  the bases are then grown from the sketches that arrived, so they stay orthonormal and equal on
  the server whatever the nodes do.
- :data:`client_app` trains the node's share of each task (``partition-id`` of
  ``num-partitions`` in the node config, the same split as :func:`~forgetcore.continual.fot.split_clients`)
  with FOT's :func:`~forgetcore.continual.fot.client_update` and the generator of
  (seed, task, round, partition-id), so a deployment gives what ``FOT(n_clients=num-partitions)``
  gives in one process.
- :data:`server_app` runs the strategy with Flower's own round loop (``Strategy.start``), evaluates
  the global model centrally after each task (the accuracy matrix ``R``) and, when the run config
  has ``out``, saves ``{"R", "model", "bases", "clients_per_round"}`` there with ``torch.save``.
- :func:`deploy_local` starts Flower's real deployment on localhost (one ``flower-superlink
  --insecure``, ``n_nodes`` ``flower-supernode`` processes) and runs the app with ``flwr run``.

The task is the demo's Permuted-Digits stream and its bias-free MLP (``build_model``,
``build_scenario``); the run config (``RUN_CONFIG`` lists the keys) sets its size and FOT's
hyper-parameters.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from torch import nn

from .continual import fot, scenarios
from .subspace import GradientProjector, Subspace

log = logging.getLogger(__name__)

__all__ = ["RUN_CONFIG", "FOTStrategy", "client_app", "server_app", "build_model", "build_scenario",
           "deploy_local"]

# The run config's keys and defaults (``flwr run --run-config`` / the app's pyproject.toml).
RUN_CONFIG: dict[str, Any] = {
    "n-tasks": 3, "rounds": 2, "seed": 0, "lr": 0.1, "weight-decay": 1e-5, "batch-size": 16,
    "local-epochs": 1, "epsilon": 0.95, "eps-inc": 0.0, "orthogonal": True, "iid": True,
    "weighted": False, "timeout": 600.0, "out": "",
    "drop": "",  # "task:round:partition": that node fails in that round (to test a dropped client)
}


def _config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(run_config) - set(RUN_CONFIG))
    if unknown:
        raise ValueError(f"run_config: unknown keys {unknown}; expected some of {sorted(RUN_CONFIG)}")
    return {**RUN_CONFIG, **run_config}


def build_model(seed: int) -> nn.Module:
    """The bias-free MLP 64-100-100-10 of the GPM/FOT papers (and of ``forgetcore demo subspace``)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 100, bias=False), nn.ReLU(),
                         nn.Linear(100, 100, bias=False), nn.ReLU(), nn.Linear(100, 10, bias=False))


_SCENARIOS: dict[tuple[int, int], Any] = {}


def build_scenario(n_tasks: int, seed: int) -> Any:
    """Permuted-Digits with ``n_tasks`` permutations (cached per process)."""
    key = (int(n_tasks), int(seed))
    if key not in _SCENARIOS:
        _SCENARIOS[key] = scenarios.permuted("digits", n_tasks=key[0], seed=key[1])
    return _SCENARIOS[key]


def _hp(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"lr": float(cfg["lr"]), "weight_decay": float(cfg["weight-decay"]),
            "batch_size": int(cfg["batch-size"]), "local_epochs": int(cfg["local-epochs"])}


# ----------------------------------------------------------------------------------- server
class FOTStrategy(Strategy):
    """FOT's server as a Flower strategy (server round ``s`` is task ``(s-1) // rounds``,
    round ``(s-1) % rounds`` of it). ``model`` gives the layer names and the initial weights."""

    def __init__(self, model: nn.Module, run_config: Mapping[str, Any] | None = None):
        self.cfg = _config(run_config or {})
        self.model = model
        self.subspace = Subspace()
        self.projector = GradientProjector(model, self.subspace)
        self.layer_param = {n: (f"{n}.weight" if n else "weight") for n in self.projector.layers}
        self.rounds = int(self.cfg["rounds"])
        self.epsilon = float(self.cfg["epsilon"])
        self.clients_per_round: list[int] = []
        self._global: dict[str, torch.Tensor] = {}

    def where(self, server_round: int) -> tuple[int, int]:
        """(task, round within the task) of a server round (1-based, as Flower counts)."""
        return divmod(server_round - 1, self.rounds)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        task, rnd = self.where(server_round)
        self._global = arrays.to_torch_state_dict()
        sketch = bool(self.cfg["orthogonal"]) and rnd == self.rounds - 1
        conf = ConfigRecord({**{k: v for k, v in self.cfg.items() if k not in ("out", "timeout")},
                             "task": task, "round": rnd, "sketch": sketch})
        content: dict[str, Any] = {"arrays": arrays, "config": conf}
        if sketch:
            bases = {n: self.subspace[n] for n in self.subspace.names()}
            content["bases"] = ArrayRecord(torch_state_dict=bases)
        return [Message(content=RecordDict(content), dst_node_id=node, message_type="train")
                for node in sorted(grid.get_node_ids())]

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        task, rnd = self.where(server_round)
        updates = []
        for msg in replies:
            if msg.has_error():
                log.warning("FOT round %d: node %d failed (%s); the round goes on without it",
                            server_round, msg.metadata.src_node_id, msg.error.reason)
                continue
            c = msg.content
            meta = c["metrics"]
            sketches = c["sketches"].to_torch_state_dict() if "sketches" in c else {}
            update = {"weights": c["arrays"].to_torch_state_dict(), "n": int(meta["n"]), "sketches": sketches,
                      "ratios": {n: float(meta[f"ratio.{n}"]) for n in sketches}}
            bad = fot.nonfinite(update)
            if bad is not None:  # a diverged or broken node: left out like a failed one
                log.warning("FOT round %d: node %d sent non-finite %s; left out", server_round,
                            msg.metadata.src_node_id, bad)
                continue
            updates.append((int(meta["client"]), update))
        updates.sort(key=lambda cu: cu[0])
        self.clients_per_round.append(len(updates))
        if not updates:  # nobody answered: the global model stays, the task's sketch is lost
            log.warning("FOT round %d: no node answered; the global model is unchanged", server_round)
            return None, None
        bases = ({self.layer_param[n]: self.subspace[n] for n in self.subspace.names()}
                 if self.cfg["orthogonal"] else {})
        new, sums, ratios = fot.aggregate(self._global, [u for _, u in updates], bases,
                                          weighted=bool(self.cfg["weighted"]))
        if self.cfg["orthogonal"] and rnd == self.rounds - 1 and sums:
            fot.expand_bases(self.subspace, sums, ratios, self.epsilon)
            self.epsilon = min(1.0, self.epsilon + float(self.cfg["eps-inc"]))
        return ArrayRecord(torch_state_dict=new), MetricRecord({"clients": len(updates), "task": task})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is central (the accuracy matrix), see server_app

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("FOTStrategy: %s", self.cfg)


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    cfg = _config(context.run_config)
    torch.set_num_threads(1)
    model = build_model(int(cfg["seed"]))
    sc = build_scenario(int(cfg["n-tasks"]), int(cfg["seed"]))
    strategy = FOTStrategy(model, cfg)
    rows: list[list[float]] = []
    rounds = int(cfg["rounds"])

    @torch.no_grad()
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 or server_round % rounds:
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        rows.append([float((model(s.test.tensors[0]).argmax(1) == s.test.tensors[1]).float().mean()) for s in sc])
        return MetricRecord({"mean-accuracy": sum(rows[-1]) / len(rows[-1])})

    result = strategy.start(grid, ArrayRecord(torch_state_dict=model.state_dict()),
                            num_rounds=int(cfg["n-tasks"]) * rounds, timeout=float(cfg["timeout"]),
                            evaluate_fn=evaluate)
    if cfg["out"]:
        torch.save({"R": rows, "model": result.arrays.to_torch_state_dict(),
                    "bases": strategy.subspace.state_dict()["bases"],
                    "clients_per_round": strategy.clients_per_round}, cfg["out"])


# ----------------------------------------------------------------------------------- clients
client_app = ClientApp()


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg = dict(msg.content["config"])
    client = int(context.node_config["partition-id"])
    n_clients = int(context.node_config["num-partitions"])
    task, rnd = int(cfg["task"]), int(cfg["round"])
    if cfg["drop"] == f"{task}:{rnd}:{client}":
        raise RuntimeError(f"node {client} drops in task {task}, round {rnd} (run config 'drop')")
    seed = int(cfg["seed"])
    x, y = build_scenario(int(cfg["n-tasks"]), seed)[task].train.tensors
    idx = fot.split_clients(y, n_clients, iid=bool(cfg["iid"]), seed=seed * 1000 + task)[client]
    model = build_model(seed)
    projector = GradientProjector(model, Subspace())
    bases = msg.content["bases"].to_torch_state_dict() if "bases" in msg.content else {}
    up = fot.client_update(projector, msg.content["arrays"].to_torch_state_dict(), x[idx], y[idx],
                           fot.client_generator(seed, task, rnd, client), bases=bases,
                           sketch=bool(cfg["sketch"]), **_hp(cfg))
    metrics = MetricRecord({"client": client, "n": up["n"], **{f"ratio.{k}": v for k, v in up["ratios"].items()}})
    content = {"arrays": ArrayRecord(torch_state_dict=up["weights"]), "metrics": metrics}
    if up["sketches"]:
        content["sketches"] = ArrayRecord(torch_state_dict=up["sketches"])
    return Message(content=RecordDict(content), reply_to=msg)


# ----------------------------------------------------------------------------------- deployment
_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "forgetcore-fot"
version = "1.0.0"
description = "FOT (Bakman et al., ICLR 2024) on Flower, from forgetcore"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "forgetcore"

[tool.flwr.app.components]
serverapp = "forgetcore.flower:server_app"
clientapp = "forgetcore.flower:client_app"

[tool.flwr.app.config]
{config}
"""


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def deploy_local(run_config: Mapping[str, Any] | None = None, *, n_nodes: int = 2, timeout: float = 600.0,
                 workdir: str | Path | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run FOT on Flower's deployment engine on localhost and return what the ServerApp saved.

    Starts one ``flower-superlink --insecure`` and ``n_nodes`` ``flower-supernode --insecure``
    processes (node ``i`` has ``partition-id=i num-partitions=n_nodes``), writes the Flower app
    (a ``pyproject.toml`` naming :data:`server_app` and :data:`client_app`) and submits it with
    ``flwr run --stream``; stops every process it started when the run ends (or fails).
    Runtime dependency installation is off: the nodes use this Python environment.
    """
    cfg = _config(run_config or {})
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
        raise ValueError(f"n_nodes: expected an int >= 1, got {n_nodes!r}")
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="forgetcore-flower-"))
    app, home = root / "app", root / "flwr-home"
    app.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    out = root / "result.pt"
    cfg["out"] = str(out)
    (app / "pyproject.toml").write_text(_PYPROJECT.format(
        config="\n".join(f"{k} = {_toml_value(v)}" for k, v in cfg.items())))
    link, *node_ports = _free_ports(1 + n_nodes)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local-deployment"\n\n'
                                      f'[superlink.local-deployment]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    # the flwr commands of this interpreter's environment (the SuperNode spawns flower-superexec by name)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
               [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    logs = [open(root / f"{n}.log", "w") for n in ["superlink", *[f"supernode{i}" for i in range(n_nodes)]]]
    procs: list[subprocess.Popen] = []
    try:
        # each in its own session, so that stopping it stops the SuperExec/ClientApp children it spawned
        procs.append(subprocess.Popen(
            ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(link)],
            env=env, cwd=root, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True))
        for i, port in enumerate(node_ports):
            procs.append(subprocess.Popen(
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                 "--host", "127.0.0.1", "--port", str(port),
                 "--node-config", f"partition-id={i} num-partitions={n_nodes}"],
                env=env, cwd=root, stdout=logs[1 + i], stderr=subprocess.STDOUT, start_new_session=True))
        run = subprocess.run(["flwr", "run", str(app), "local-deployment", "--stream"], env=env, cwd=root,
                             capture_output=True, text=True, timeout=timeout)
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:  # --stream can return before the save
            time.sleep(0.5)
        if verbose or not out.exists():
            sys.stdout.write(run.stdout[-6000:] + run.stderr[-3000:])
        if not out.exists():
            tails = "".join(f"\n--- {f.name}\n" + Path(f.name).read_text()[-2000:] for f in logs)
            raise RuntimeError(f"the Flower run saved no result (flwr run exited {run.returncode}){tails}")
        return torch.load(out, weights_only=True)
    finally:
        for p in procs:
            _stop(p)
        for f in logs:
            f.close()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _stop(p: subprocess.Popen) -> None:
    """Stop the process group that :func:`deploy_local` created for ``p`` (``p`` and its children)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL also takes children that outlived p
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
