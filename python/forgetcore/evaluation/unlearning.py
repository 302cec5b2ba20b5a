"""Unlearning harness: scenarios on embedded real data, metrics, and a method-comparison table.

Scenarios (seeded, stratified train/validation/test splits of ``forgetcore.datasets``):

- :func:`full_class`: forget every training example of one class;
- :func:`random_subset`: forget a random 10 % of the training set.

:func:`train_original` trains the model to unlearn from (retain and forget together; ``regulariser=``
adds a training penalty such as IAU's gradient restriction). Studies with their own scenarios:
:func:`two_factor` and :func:`sarr` (SafeEraser's refusal mechanism), :func:`biased` and
:func:`group_accuracy` (CUPID's biased digits); ``evaluation.probes`` (random-label forgetting) and
``evaluation.memorization`` (Feldman-Zhang scores) hold the others. This module imports no method:
methods and the reference (``Retrain``) are passed to :func:`compare` as arguments.
:func:`evaluate` measures forget / retain / test accuracy and two membership-inference attacks:

- ``mia_entropy``: the SSD paper's attack (``get_membership_attack_prob`` in the official code,
  after Chundawat et al. 2023): a class-balanced logistic regression on the entropy of the
  softmax output, fitted to retain examples (members) against test examples (non-members), then
  asked about the forget set; the reported number is the fraction of forget examples it calls
  members (lower = more forgotten; a retrained model is the reference point).
- ``mia_loss``: a loss-threshold attack (Yeom et al., CSF 2018): the per-example loss threshold
  that best separates retain from test (balanced accuracy) is applied to the forget set; again
  the fraction called members. ``mia_loss_auc`` is the AUC of that loss between forget and test
  examples (0.5: indistinguishable from unseen data).

:func:`compare` runs a list of methods on copies of one original model and returns a table
(list of dicts) with every metric and the wall time of each ``fit``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .. import _checks, datasets
from ..training import fit_epochs, logits_of
from ..unlearning.data import TRAIN_DEFAULTS, UnlearnData, labels_of

__all__ = ["full_class", "random_subset", "make_model", "train_original", "evaluate", "compare",
           "format_table", "SPLIT", "two_factor", "sarr", "biased", "group_accuracy"]

#: train / validation / test fractions of every scenario (stratified by class).
SPLIT: tuple[float, float, float] = (0.6, 0.2, 0.2)


def _splits(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    x, y = datasets.load(name)
    return x, y, datasets.stratified_split(y, SPLIT, seed)


def full_class(name: str = "digits", forget_class: int | Sequence[int] = 3, seed: int = 0) -> UnlearnData:
    """Forget every training example of ``forget_class`` (one class id or several).

    ``forget_val`` / ``retain_val``: the validation examples of the forgotten / kept classes;
    ``test``: the test examples of every class.
    """
    x, y, (tr, va, te) = _splits(name, seed)
    classes = [forget_class] if isinstance(forget_class, (int, np.integer)) else list(forget_class)
    known = set(torch.unique(y).tolist())
    if not classes or any(int(c) not in known for c in classes):
        raise ValueError(f"forget_class: expected class ids among {sorted(known)}, got {forget_class}")
    fc = torch.tensor([int(c) for c in classes])

    def parts(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.isin(y[idx], fc)
        return idx[m], idx[~m]

    f_tr, r_tr = parts(tr)
    f_va, r_va = parts(va)
    return UnlearnData(forget=datasets.subset(x, y, f_tr), retain=datasets.subset(x, y, r_tr),
                       forget_val=datasets.subset(x, y, f_va), retain_val=datasets.subset(x, y, r_va),
                       test=datasets.subset(x, y, te), forget_classes=tuple(int(c) for c in classes))


def random_subset(name: str = "digits", fraction: float = 0.1, seed: int = 0) -> UnlearnData:
    """Forget a uniformly random ``fraction`` of the training set (seeded).

    There is no held-out copy of the forget set, so ``forget_val`` is None (methods that tune on
    it use the forget set itself); ``retain_val`` and ``test`` are the validation and test splits.
    """
    fraction = _checks.real("fraction", fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    x, y, (tr, va, te) = _splits(name, seed)
    perm = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(_checks.seed(seed) + 1))]
    k = max(1, round(fraction * len(tr)))
    f_tr, r_tr = torch.sort(perm[:k]).values, torch.sort(perm[k:]).values
    return UnlearnData(forget=datasets.subset(x, y, f_tr), retain=datasets.subset(x, y, r_tr),
                       retain_val=datasets.subset(x, y, va), test=datasets.subset(x, y, te))


def make_model(arch: str = "mlp", in_shape: Sequence[int] = (1, 8, 8), n_classes: int = 10, seed: int = 0) -> nn.Module:
    """A small seeded classifier: ``"mlp"`` (two hidden layers of 128, ReLU; any input shape) or
    ``"cnn"`` (two conv layers; input ``(c, h, w)``)."""
    shape = tuple(int(s) for s in in_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_checks.seed(seed))
        if arch == "mlp":
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 128), nn.ReLU(), nn.Linear(128, 128),
                                 nn.ReLU(), nn.Linear(128, n_classes))
        if arch == "resmlp":
            return ResMLP(math.prod(shape), n_classes)
        if arch == "cnn":
            c = shape[0]
            return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(32 * 4, n_classes))
    raise ValueError(f"arch: expected 'mlp', 'resmlp' or 'cnn', got {arch!r}")


class FFNBlock(nn.Module):
    """``x + fc2(relu(fc1(x)))``: the feed-forward half of a Transformer block (GS-LoRA's LoRA sites)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class ResMLP(nn.Module):
    """Stem, ``blocks`` residual feed-forward blocks (``blocks.i.fc1`` / ``fc2``) and a linear head."""

    def __init__(self, in_features: int, n_classes: int, width: int = 64, hidden: int = 128, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
        self.blocks = nn.Sequential(*(FFNBlock(width, hidden) for _ in range(blocks)))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.blocks(self.stem(x))))


def train_original(data: UnlearnData, arch: str = "mlp", seed: int = 0, *, progress: bool = False,
                   regulariser: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                   **recipe: Any) -> nn.Module:
    """Train a fresh :func:`make_model` on retain and forget together, with ``TRAIN_DEFAULTS``
    (overridable through ``recipe``); returns it in eval mode.

    ``regulariser(model, loss) -> penalty`` is added to every mini-batch's loss: how the original
    was trained is part of some methods (IAU's gradient restriction,
    ``forgetcore.unlearning.iau.gradient_restriction``).
    """
    cfg = {**TRAIN_DEFAULTS, **recipe}
    x0, y0 = data.retain[0]
    n_classes = 1 + int(max(labels_of(data.retain).max(), labels_of(data.forget).max()))
    model = make_model(arch, tuple(x0.shape), n_classes, seed)
    fit_epochs(model, data.full(seed), seed=seed, progress=progress, desc="train original",
               regulariser=regulariser, **cfg)
    return model


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = F.softmax(logits, dim=1)
    return -torch.xlogy(p, p).sum(1)  # 0 log 0 = 0: a saturated output has entropy 0, not NaN


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score(pos) > score(neg)) + 0.5 P(tie): the Mann-Whitney AUC."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    # average ranks over ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _mia_entropy(ent_member: np.ndarray, ent_non: np.ndarray, ent_forget: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression

    xr = np.concatenate([ent_member, ent_non]).reshape(-1, 1)
    yr = np.concatenate([np.ones(len(ent_member)), np.zeros(len(ent_non))])
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs")
    clf.fit(xr, yr)
    return float(clf.predict(ent_forget.reshape(-1, 1)).mean())


def _loss_threshold(loss_member: np.ndarray, loss_non: np.ndarray) -> float:
    """Threshold t (member iff loss <= t) with the best balanced accuracy between the two sets."""
    cand = np.unique(np.concatenate([loss_member, loss_non]))
    m = np.sort(loss_member)
    n = np.sort(loss_non)
    tpr = np.searchsorted(m, cand, side="right") / len(m)
    fpr = np.searchsorted(n, cand, side="right") / len(n)
    return float(cand[int(np.argmax(tpr - fpr))])


def evaluate(model: nn.Module, data: UnlearnData) -> dict[str, float]:
    """Accuracies and membership-inference figures of ``model`` on ``data`` (model left unchanged).

    Keys: ``forget_acc``, ``retain_acc``; with ``data.test``: ``test_acc``, ``mia_entropy``,
    ``mia_loss``, ``mia_loss_auc``; for full-class data also ``test_forget_acc`` and
    ``test_retain_acc`` (test accuracy on the forgotten and on the kept classes).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, UnlearnData):
        raise TypeError(f"data: expected an UnlearnData, got {type(data).__name__}")
    # A wrecked model (gradient ascent run too long) can emit inf/NaN logits: score it, don't crash.
    lf, yf = logits_of(model, data.forget)
    lr, yr = logits_of(model, data.retain)
    lf, lr = torch.nan_to_num(lf), torch.nan_to_num(lr)
    out = {"forget_acc": float((lf.argmax(1) == yf).float().mean()),
           "retain_acc": float((lr.argmax(1) == yr).float().mean())}
    if data.test is None:
        return out
    lt, yt = logits_of(model, data.test)
    lt = torch.nan_to_num(lt)
    hit = lt.argmax(1) == yt
    out["test_acc"] = float(hit.float().mean())
    if data.forget_classes is not None:
        m = torch.isin(yt, torch.tensor(data.forget_classes))
        out["test_forget_acc"] = float(hit[m].float().mean()) if m.any() else math.nan
        out["test_retain_acc"] = float(hit[~m].float().mean()) if (~m).any() else math.nan
    out["mia_entropy"] = _mia_entropy(_entropy(lr).numpy(), _entropy(lt).numpy(), _entropy(lf).numpy())
    loss_r = F.cross_entropy(lr, yr, reduction="none").numpy()
    loss_t = F.cross_entropy(lt, yt, reduction="none").numpy()
    loss_f = F.cross_entropy(lf, yf, reduction="none").numpy()
    thr = _loss_threshold(loss_r, loss_t)
    out["mia_loss"] = float((loss_f <= thr).mean())
    # Members have low loss: AUC of "-loss" separating forget examples from unseen ones of the same
    # kind (test examples of the forgotten classes in full-class forgetting, all of them otherwise).
    same = torch.isin(yt, torch.tensor(data.forget_classes)).numpy() if data.forget_classes is not None \
        else np.ones(len(yt), dtype=bool)
    out["mia_loss_auc"] = _auc(-loss_f, -loss_t[same])
    return out


def _method_name(m: Any) -> str:
    return str(getattr(m, "label", None) or getattr(m, "name", None) or type(m).__name__)


def compare(methods: Sequence[Any], data: UnlearnData, model: nn.Module, *, include_original: bool = True,
            reference: Any | None = None, originals: Mapping[str, nn.Module] | None = None,
            progress: bool = False) -> list[dict[str, Any]]:
    """Run each method on a deep copy of ``model``; one row per method with metrics and ``fit_s``.

    ``reference``: the gold-standard method (e.g. ``forgetcore.unlearning.Retrain(...)``). A method
    whose ``alpha == "auto"`` and ``target is None`` on random-subset data gets as target the
    forget-set accuracy of ``reference``'s model (run first; if ``reference`` is also one of
    ``methods`` its row is that run). Evaluation does not import methods: the caller passes them.
    ``originals``: a different original model for some methods, keyed by method name (a method
    whose original is trained differently, e.g. IAU's gradient restriction); the others use
    ``model``. Rows also carry what ``fit`` reported about the chosen ``alpha``, the number of
    dampened elements and the target, when it did.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, UnlearnData):
        raise TypeError(f"data: expected an UnlearnData, got {type(data).__name__}")
    originals = dict(originals or {})
    for k, v in originals.items():
        if not isinstance(v, nn.Module):
            raise TypeError(f"originals: expected torch.nn.Module values, got {type(v).__name__} for {k!r}")
    if reference is not None and not callable(getattr(reference, "fit", None)):
        raise TypeError(f"reference: expected a method with fit(model, data), got {type(reference).__name__}")
    needs_target = data.forget_classes is None and any(
        getattr(m, "alpha", None) == "auto" and getattr(m, "target", 0) is None for m in methods)
    if needs_target and reference is None:
        raise ValueError("reference: a method tunes alpha on random-subset data and needs the forget accuracy of a "
                         "retrained model; pass reference=Retrain(...) (or give the method a target)")
    head: list[dict[str, Any]] = []
    if include_original:
        head.append({"method": "Original", "fit_s": 0.0, **evaluate(model, data)})
    rows: dict[int, dict[str, Any]] = {}

    def run(i: int, m: Any) -> dict[str, Any]:
        base = originals.get(_method_name(m), model)
        work = copy.deepcopy(base)
        t0 = time.perf_counter()
        info = m.fit(work, data)
        row: dict[str, Any] = {"method": _method_name(m), "fit_s": time.perf_counter() - t0, **evaluate(work, data)}
        row.update({k: info[k] for k in ("alpha", "dampened", "target") if k in info})
        return row

    target: float | None = None
    if needs_target:
        pos = next((i for i, m in enumerate(methods) if m is reference), None)
        ref_row = run(-1 if pos is None else pos, reference)
        if pos is not None:
            rows[pos] = ref_row
        target = ref_row["forget_acc"]
    for i, m in enumerate(methods):
        if i in rows:
            continue
        if needs_target and getattr(m, "alpha", None) == "auto" and getattr(m, "target", 0) is None:
            m = copy.copy(m)  # the caller's object is untouched
            m.target = target
        rows[i] = run(i, m)
    return head + [rows[i] for i in range(len(methods))]


def format_table(rows: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> str:
    """Plain-text table of :func:`compare` rows (percentages for accuracies and MIA figures)."""
    if not rows:
        return ""
    keys = list(keys) if keys is not None else [k for k in rows[0] if k != "method"]
    extra = [k for r in rows for k in r if k not in keys and k != "method"]
    keys += list(dict.fromkeys(extra))

    def fmt(k: str, v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            if k.endswith("_acc") or k.startswith(("mia", "fa_", "gap", "probe", "forget_", "a_test", "b_test",
                                                     "mem_", "top_k")) or k in ("target", "sarr", "harmful_refused"):
                return f"{100 * v:.1f}"
            if k.endswith("_s"):
                return f"{v:.2f}"
            return f"{v:g}"
        return str(v)

    head = ["method"] + keys
    body = [[str(r.get("method", ""))] + [fmt(k, r.get(k)) for k in keys] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)



def two_factor(name: str = "digits", harmful_class: int = 3, seed: int = 0, q_scale: float = 4.0) -> dict[str, Any]:
    """SafeEraser's mechanism test on embedded data: prompts are ``[image pixels, question one-hot]``.

    The image is a digit (harmful: class ``harmful_class``); the question is harmful or benign
    (a 2-way one-hot scaled by ``q_scale``); the answer is the digit (10 classes) and output 10
    means REFUSE. Returns ``n_outputs`` (11), ``refusal_class`` (10), ``pretrain`` (every image
    with both questions, answered; the original model learns to answer everything),
    ``data`` (an ``UnlearnData``: forget = harmful image + harmful question, labelled with the
    answer it used to get; retain = every training image with the benign question), ``decoupled``
    (benign training images + harmful question: PD's inputs), ``sarr_prompts`` (benign TEST images
    + harmful question), ``harmful_test`` (harmful test images + harmful question) and
    ``utility_test`` (every test image with the benign question).
    """
    x, y = datasets.load(name)
    tr, te = datasets.stratified_split(y, (0.7, 0.3), _checks.seed(seed))
    flat = x.reshape(len(x), -1)

    def prompts(idx: torch.Tensor, harmful_q: bool) -> torch.Tensor:
        q = torch.zeros(len(idx), 2)
        q[:, 1 if harmful_q else 0] = q_scale
        return torch.cat([flat[idx], q], 1)

    def ds(idx: torch.Tensor, harmful_q: bool) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(prompts(idx, harmful_q), y[idx])

    b_tr = tr[y[tr] != harmful_class]
    h_tr = tr[y[tr] == harmful_class]
    h_te, b_te = te[y[te] == harmful_class], te[y[te] != harmful_class]
    pretrain = torch.utils.data.TensorDataset(torch.cat([prompts(tr, False), prompts(tr, True)]),
                                              torch.cat([y[tr], y[tr]]))
    data = UnlearnData(forget=ds(h_tr, True), retain=ds(tr, False), test=ds(te, False))
    return {"n_outputs": 11, "refusal_class": 10, "pretrain": pretrain, "data": data,
            "decoupled": prompts(b_tr, True), "sarr_prompts": ds(b_te, True), "harmful_test": ds(h_te, True),
            "utility_test": ds(te, False)}


def sarr(model: nn.Module, prompts: Dataset, refusal_class: int, valid: torch.Tensor | None = None) -> float:
    """Safe Answer Refusal Rate: the fraction of benign-image + harmful-question prompts refused.

    ``valid`` (bool per prompt) marks judgements to count: SafeEraser's evaluator drops
    unparseable judge outputs from the denominator instead of counting them as refusals. Here
    the "judge" is exact (the refusal output is the argmax), so all are valid by default.
    """
    logits, _ = logits_of(model, prompts)
    refused = logits.argmax(1) == int(refusal_class)
    if valid is not None:
        valid = torch.as_tensor(valid, dtype=torch.bool)
        if valid.shape != refused.shape:
            raise ValueError(f"valid: expected {tuple(refused.shape)} flags, got {tuple(valid.shape)}")
        refused = refused[valid]
    if len(refused) == 0:
        raise ValueError("prompts: no valid judgement to compute SARR from")
    return float(refused.float().mean())


def biased(name: str = "digits", forget_class: int = 3, seed: int = 0, conflicting: float = 0.05,
           scale: float = 1.0) -> dict[str, Any]:
    """CUPID's "biased digits": pixels plus a spurious 10-way one-hot (times ``scale``) appended.

    In the training split the spurious code equals the class for a fraction ``1 - conflicting`` of
    each class (bias-aligned) and is a random other class for the rest (bias-conflicting; the
    spec's 0.5 % leaves no conflicting forget example at digits scale, so 5 % here); the test
    split is half aligned, half conflicting. Returns ``data`` (an ``UnlearnData`` forgetting
    ``forget_class``; ``test`` the whole test split) and bool masks ``forget_aligned`` (over
    ``data.forget``), ``test_aligned`` (over ``data.test``).
    """
    conflicting = _checks.real("conflicting", conflicting, low=0.0, high=1.0, low_open=True, high_open=True)
    x, y = datasets.load(name)
    tr, te = datasets.stratified_split(y, (0.7, 0.3), _checks.seed(seed))
    g = torch.Generator().manual_seed(_checks.seed(seed) + 17)
    k = int(y.max()) + 1

    def with_code(idx: torch.Tensor, p_conf: float) -> tuple[torch.Tensor, torch.Tensor]:
        conf = torch.rand(len(idx), generator=g) < p_conf
        code = y[idx].clone()
        code[conf] = (code[conf] + torch.randint(1, k, (int(conf.sum()),), generator=g)) % k
        return torch.cat([x[idx].reshape(len(idx), -1), scale * F.one_hot(code, k).float()], 1), ~conf

    xtr, al_tr = with_code(tr, conflicting)
    xte, al_te = with_code(te, 0.5)
    f = y[tr] == int(forget_class)
    data = UnlearnData(forget=torch.utils.data.TensorDataset(xtr[f], y[tr][f]),
                       retain=torch.utils.data.TensorDataset(xtr[~f], y[tr][~f]),
                       test=torch.utils.data.TensorDataset(xte, y[te]), forget_classes=(int(forget_class),))
    return {"data": data, "forget_aligned": al_tr[f], "test_aligned": al_te, "n_features": xtr.shape[1]}


def group_accuracy(model: nn.Module, scenario: dict[str, Any]) -> dict[str, float]:
    """CUPID's group metrics: forget accuracy on the training forget set and on the test examples of the
    forgotten class, each split into bias-aligned and bias-conflicting, their gaps, and kept-class test accuracy."""
    data = scenario["data"]
    lf, yf = logits_of(model, data.forget)
    hit_f = lf.argmax(1) == yf
    lt, yt = logits_of(model, data.test)
    hit_t = lt.argmax(1) == yt
    fc = torch.isin(yt, torch.tensor(data.forget_classes))
    al_f, al_t = scenario["forget_aligned"], scenario["test_aligned"]

    def mean(h: torch.Tensor) -> float:
        return float(h.float().mean()) if len(h) else math.nan

    out = {"fa_train_aligned": mean(hit_f[al_f]), "fa_train_conflicting": mean(hit_f[~al_f]),
           "fa_test_aligned": mean(hit_t[fc & al_t]), "fa_test_conflicting": mean(hit_t[fc & ~al_t]),
           "kept_test_acc": mean(hit_t[~fc])}
    out["gap_train"] = abs(out["fa_train_aligned"] - out["fa_train_conflicting"])
    out["gap_test"] = abs(out["fa_test_aligned"] - out["fa_test_conflicting"])
    return out
