"""forgetcore's continual metrics next to avalanche-lib's, on the same accuracy matrices.

avalanche-lib pins its own torch and would move the project's locked versions, so it is not a
test dependency: this script runs in a separate virtual environment.

    python3 -m venv /tmp/av && /tmp/av/bin/pip install avalanche-lib scikit-learn tqdm
    PYTHONPATH=python /tmp/av/bin/python benches/avalanche_compare.py

(avalanche-lib 0.6.0 with its own torch 2.15 was used for the numbers in the issue's note.)
It trains Finetune and ER on Split-Digits (class-incremental, 5 tasks) with forgetcore's Trainer,
once per seed, and also takes a hand-built matrix. Each matrix ``R`` is then fed to Avalanche's
standalone metric classes (``Forgetting``, ``BWT``, ``ForwardTransfer``, ``Accuracy``) in the
order Avalanche's evaluation plugins feed them (``GenericExperienceForgetting.after_eval_exp``:
after training experience k, the evaluation of experience k sets its "initial" value, every other
evaluation its "last" value; ``ForwardTransfer``: the evaluation of experience k + 1 after
training k, against the value at initialisation), and the stream accuracy is Avalanche's
``Accuracy`` over every test example of the stream after the last task. Printed side by side:

- accuracy: forgetcore's ACC is the mean of the per-task accuracies (GEM); Avalanche's stream
  accuracy is pooled over examples: they differ when the tasks' test sets differ in size;
- forgetting: Avalanche's StreamForgetting is ``R[j][j] - R[T-1][j]`` averaged over ``j < T-1``,
  which is exactly ``-BWT``; forgetcore's ``average_forgetting`` (Chaudhry et al. 2018) counts
  from the best earlier accuracy, ``max_l R[l][j]``, so it is larger when a task's accuracy
  rose after its own training (the hand-built matrix shows it);
- BWT and FWT agree exactly (both follow GEM).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

from avalanche.evaluation.metrics import BWT, Accuracy, Forgetting, ForwardTransfer  # noqa: E402

import forgetcore.evaluation.continual as fc  # noqa: E402
from forgetcore.continual import ER, Finetune, Trainer, scenarios  # noqa: E402


def avalanche_metrics(R: np.ndarray, b: np.ndarray | None) -> dict[str, float]:
    T = R.shape[0]
    forg, bwt, fwt = Forgetting(), BWT(), ForwardTransfer()
    if b is not None:
        for j in range(T):
            fwt.update(j, float(b[j]), initial=True)
    for k in range(T):  # after training experience k, evaluate every experience j
        forg.reset_last()
        bwt.reset_last()
        for j in range(T):
            v = float(R[k, j])
            forg.update(j, v, initial=(j == k and j not in forg.initial))
            bwt.update(j, v, initial=(j == k and j not in bwt.initial))
            if j == k + 1:
                fwt.update(j, v)
    f = [v for j, v in forg.result().items() if j < T - 1]
    out = {"forgetting": float(np.mean(f)), "bwt": float(np.mean([v for j, v in bwt.result().items() if j < T - 1]))}
    if b is not None:
        out["fwt"] = float(np.mean(list(fwt.result().values())))
    return out


def forgetcore_metrics(R: np.ndarray, b: np.ndarray | None) -> dict[str, float]:
    out = {"acc": fc.average_accuracy(R), "forgetting": fc.average_forgetting(R), "bwt": fc.backward_transfer(R)}
    if b is not None:
        out["fwt"] = fc.forward_transfer(R, b)
    return out


def run(method: str, seed: int):
    torch.manual_seed(seed)
    sc = scenarios.split("digits", 5, "class", seed=seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 100), torch.nn.ReLU(),
                                torch.nn.Linear(100, 10))
    plugin = Finetune() if method == "Finetune" else ER(200, seed=seed)
    tr = Trainer(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.05), [plugin], epochs=5, batch_size=10,
                 seed=seed, progress=False, eval_every=None)
    res = tr.fit(sc)
    acc = Accuracy()  # Avalanche's stream accuracy: pooled over every test example of the stream
    model.eval()
    with torch.no_grad():
        for t in sc:
            x, y = t.test.tensors
            acc.update(model(x), y)
    return np.array(res["R"]), np.array(res["initial"]), float(acc.result()), [len(t.test) for t in sc]


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    hand = np.array([[0.90, 0.05, 0.20], [0.95, 0.80, 0.30], [0.50, 0.70, 0.95]])
    rows.append(("hand-built (task 0 rises after task 1)", hand, np.array([0.10, 0.0, 0.20]), None, None))
    for method in ("Finetune", "ER"):
        for seed in (0, 1, 2):
            R, b, stream_acc, sizes = run(method, seed)
            rows.append((f"split-digits {method} seed {seed}", R, b, stream_acc, sizes))
    head = (f"{'matrix':<40} | {'ACC fc':>7} {'ACC av':>7} | {'FGT fc':>7} {'FGT av':>7} | "
            f"{'BWT fc':>7} {'BWT av':>7} | {'FWT fc':>7} {'FWT av':>7}")
    print(head)
    print("-" * len(head))
    for name, R, b, stream_acc, _ in rows:
        f, a = forgetcore_metrics(R, b), avalanche_metrics(R, b)
        acc_av = f"{stream_acc:7.4f}" if stream_acc is not None else f"{'-':>7}"
        print(f"{name:<40} | {f['acc']:7.4f} {acc_av} | {f['forgetting']:7.4f} {a['forgetting']:7.4f} | "
              f"{f['bwt']:7.4f} {a['bwt']:7.4f} | {f['fwt']:7.4f} {a['fwt']:7.4f}")
    print("(fc: forgetcore.evaluation.continual; av: avalanche-lib's metric classes. ACC av is the stream "
          "accuracy pooled over examples; FGT fc counts from the best earlier accuracy, FGT av from the "
          "accuracy right after the task's training, = -BWT.)")
    print("test-set sizes per task (seed 0):", rows[1][4])


if __name__ == "__main__":
    main()
