"""Linear probes and the measurements of random-label forgetting.

Zhang, Choshen & Andreas, "Unforgettable Generalization in Language Models" (2024): after
fine-tuning on random labels, a logistic-regression probe with the TRUE labels on the frozen
representation still solves the task ("shallow forgetting"). Procedure details there are
reconstructed (no official code); here:

- :func:`features`: the input of the model's last ``nn.Linear`` (the penultimate
  representation), or of any given submodule, for a whole dataset (eval mode, no grad).
- :func:`linear_probe`: scikit-learn ``LogisticRegression`` fitted on one split's features with
  true labels, scored on a held-out split (never on the examples it was fitted on).
- :func:`forgetting_generalisation`: ``(acc_before - acc_after) / (acc_before - chance)`` on
  held-out examples of the forgotten task (1: forgetting generalised fully, 0: not at all).
- :func:`initial_confidence` (mean probability of the true label before forgetting) and
  :func:`representation_variability` (mean per-dimension variance of the features of the forget
  set): the paper's two weak predictors of generalisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import _checks, datasets
from ..training import accuracy, device_of, logits_of
from ..unlearning.data import UnlearnData

__all__ = ["features", "linear_probe", "forgetting_generalisation", "initial_confidence",
           "representation_variability", "two_task", "random_label_study"]


def _last_linear(model: nn.Module) -> nn.Module:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("layer: the model has no nn.Linear; pass the submodule whose input to probe")
    return last


def _nonempty(name: str, ds: Any) -> Dataset:
    if not isinstance(ds, Dataset):
        raise TypeError(f"{name}: expected a torch Dataset, got {type(ds).__name__}")
    if len(ds) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{name}: expected a non-empty dataset, got 0 examples")
    return ds


@torch.no_grad()
def features(model: nn.Module, data: Dataset, layer: nn.Module | None = None,
             batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)``: the input of ``layer`` (default: the last ``nn.Linear``) on ``data``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    data = _nonempty("data", data)
    layer = _last_linear(model) if layer is None else layer
    if not isinstance(layer, nn.Module) or not any(m is layer for m in model.modules()):
        raise ValueError("layer: expected a submodule of model")
    grabbed: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, inp: grabbed.append(inp[0].detach().flatten(1).float().cpu()))
    was = model.training
    model.eval()
    dev = device_of(model)
    ys = []
    try:
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            model(x.to(dev))
            ys.append(y)
    finally:
        hook.remove()
        model.train(was)
    return torch.cat(grabbed), torch.cat(ys)


def linear_probe(model: nn.Module, train: Dataset, test: Dataset, *, layer: nn.Module | None = None,
                 C: float = 1.0, max_iter: int = 2000, seed: int = 0) -> dict[str, float]:
    """Logistic regression with true labels on frozen features; returns train and held-out accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    C = _checks.real("C", C, low=0.0, low_open=True)
    max_iter = _checks.positive_int("max_iter", max_iter)
    train, test = _nonempty("train", train), _nonempty("test", test)
    ftr, ytr = features(model, train, layer)
    fte, yte = features(model, test, layer)
    if len(torch.unique(ytr)) < 2:
        raise ValueError("train: expected at least two classes to fit a probe")
    scaler = StandardScaler().fit(ftr.numpy())
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=_checks.seed(seed))
    clf.fit(scaler.transform(ftr.numpy()), ytr.numpy())
    return {"probe_train_acc": float(clf.score(scaler.transform(ftr.numpy()), ytr.numpy())),
            "probe_test_acc": float(clf.score(scaler.transform(fte.numpy()), yte.numpy()))}


def forgetting_generalisation(acc_before: float, acc_after: float, chance: float) -> float:
    """``(acc_before - acc_after) / (acc_before - chance)``; NaN when there was nothing above chance."""
    for name, v in (("acc_before", acc_before), ("acc_after", acc_after), ("chance", chance)):
        _checks.real(name, v, low=0.0, high=1.0)
    gap = acc_before - chance
    return float("nan") if gap <= 1e-12 else (acc_before - acc_after) / gap


def initial_confidence(model: nn.Module, data: Dataset) -> float:
    """Mean softmax probability of the true label (before forgetting)."""
    logits, y = logits_of(model, _nonempty("data", data))
    return float(F.softmax(logits, 1).gather(1, y[:, None]).mean())


def representation_variability(model: nn.Module, data: Dataset, layer: nn.Module | None = None) -> float:
    """Mean per-dimension variance of the probed features over ``data``."""
    f, _ = features(model, data, layer)
    return float(np.var(f.numpy(), axis=0).mean())


def two_task(name: str = "digits", seed: int = 0, fraction: float = 0.2) -> dict[str, Any]:
    """The spec's smallest experiment on embedded data: task A = classes 0-4, task B = classes 5-9.

    Stratified 60/20/20 split (seeded); the forget set is a random ``fraction`` of A's training
    examples, retain the rest of the training set. Returns ``data`` (an ``UnlearnData`` with the
    whole test split as ``test``), ``a_options`` (A's labels), ``probe_train`` (A's validation
    split: the probe never sees the examples it is scored on), ``a_test`` and ``b_test``.
    """
    fraction = _checks.real("fraction", fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    x, y = datasets.load(name)
    tr, va, te = datasets.stratified_split(y, (0.6, 0.2, 0.2), _checks.seed(seed))
    a_tr, b_tr = tr[y[tr] < 5], tr[y[tr] >= 5]
    perm = a_tr[torch.randperm(len(a_tr), generator=torch.Generator().manual_seed(_checks.seed(seed)))]
    k = max(1, round(fraction * len(perm)))
    data = UnlearnData(forget=datasets.subset(x, y, perm[:k]),
                       retain=datasets.subset(x, y, torch.cat([perm[k:], b_tr])), test=datasets.subset(x, y, te))
    return {"data": data, "a_options": list(range(5)), "probe_train": datasets.subset(x, y, va[y[va] < 5]),
            "a_test": datasets.subset(x, y, te[y[te] < 5]), "b_test": datasets.subset(x, y, te[y[te] >= 5])}


def random_label_study(method: Any, model: nn.Module, scenario: dict[str, Any]) -> dict[str, float]:
    """Run ``method.fit`` (e.g. ``RandomLabelForgetting``) on ``scenario`` (:func:`two_task`) and measure
    the paper's quantities: forget / A-test / B-test accuracy before and after, the
    forgetting-generalisation score on A-test, the two predictors (before forgetting) and the
    true-label linear probe of the forgotten model on A (and of the original, for reference).
    ``model`` is edited in place."""
    data = scenario["data"]
    chance = 1.0 / len(scenario["a_options"])
    sets = {"forget": data.forget, "a_test": scenario["a_test"], "b_test": scenario["b_test"]}
    row: dict[str, float] = {f"{k}_before": accuracy(model, d) for k, d in sets.items()}
    row["initial_confidence"] = initial_confidence(model, data.forget)
    row["representation_variability"] = representation_variability(model, data.forget)
    row["probe_before"] = linear_probe(model, scenario["probe_train"], scenario["a_test"])["probe_test_acc"]
    info = method.fit(model, data)
    row.update({f"{k}_after": accuracy(model, d) for k, d in sets.items()})
    row["generalisation"] = forgetting_generalisation(row["a_test_before"], row["a_test_after"], chance)
    row["probe_after"] = linear_probe(model, scenario["probe_train"], scenario["a_test"])["probe_test_acc"]
    row["chance"] = chance
    row["epochs"] = float(info.get("epochs", float("nan")))
    return row
