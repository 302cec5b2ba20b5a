"""SafeEraser's prompt-decouple (PD) loss around a refusal-style (PO) unlearning objective.

Chen et al., "SafeEraser: Enhancing Safety in Multimodal Large Language Models through
Multimodal Machine Unlearning" (arXiv 2502.12520, ACL 2025 Findings). No official code was
found; the PD term is reconstructed from the abstract and the released data schema (spec
section 18, marked uncertain there): over-forgetting makes the unlearned model refuse any prompt
that contains the harmful *question*, even with a harmless image; PD adds a supervised term on
decoupled prompts (a benign image with the same harmful question) whose targets are the
*original* model's answers (not ground truth), so the model learns that the question alone is
not a reason to refuse.

What runs here (the spec's mechanism experiment, a classifier with one extra "refuse" output):

    L = CE(f(x_forget), REFUSE) + CE(f(x_retain), y_retain) + lambda_pd * CE(f(x_pd), f_original(x_pd))

with Adam over mini-batches (forget, retain and PD batches drawn together, the shorter sets
cycled). ``lambda_pd = 0`` is the PO baseline without PD. Not established: the paper's lambda_pd
and whether harmful-image + benign-question pairs also enter the PD term (here: only what the
caller passes as ``decoupled``). The metric SARR is ``forgetcore.evaluation.unlearning.sarr``.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .. import _checks
from ..training import device_of, logits_of
from .data import UnlearnData

__all__ = ["SafeEraser", "prompt_decouple_loss"]


def prompt_decouple_loss(model: nn.Module, x_decoupled: torch.Tensor, original_answers: torch.Tensor) -> torch.Tensor:
    """PD term: cross-entropy of the model on decoupled prompts against the original model's answers."""
    return F.cross_entropy(model(x_decoupled), original_answers)


class SafeEraser:
    """Refusal unlearning (forget prompts -> ``refusal_class``) with SafeEraser's prompt-decouple term.

    Args:
        refusal_class: the output index meaning "refuse".
        decoupled: inputs of the decoupled prompts (benign image + harmful question); their targets
            are the model's own answers when ``fit`` starts. Required when ``lambda_pd > 0``.
        lambda_pd: weight of the PD term (0: the PO baseline without PD).
        epochs, lr, batch_size: Adam over the forget set (retain and PD batches cycled alongside).
    """

    name = "SafeEraser"

    def __init__(self, refusal_class: int, decoupled: Dataset | torch.Tensor | None = None, *, lambda_pd: float = 1.0,
                 epochs: int = 30, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
                 progress: bool = False) -> None:
        if isinstance(refusal_class, bool) or not isinstance(refusal_class, int) or refusal_class < 0:
            raise ValueError(f"refusal_class: expected an output index >= 0, got {refusal_class!r}")
        self.refusal_class = refusal_class
        self.lambda_pd = _checks.real("lambda_pd", lambda_pd, low=0.0)
        if isinstance(decoupled, Dataset):
            decoupled = torch.stack([decoupled[i][0] for i in range(len(decoupled))])  # type: ignore[arg-type]
        if decoupled is not None:
            if not isinstance(decoupled, torch.Tensor) or len(decoupled) == 0:
                raise ValueError("decoupled: expected a non-empty tensor or Dataset of inputs")
            if not bool(torch.isfinite(decoupled).all()):
                raise ValueError("decoupled: expected finite inputs")
        if self.lambda_pd > 0 and decoupled is None:
            raise ValueError("decoupled: lambda_pd > 0 needs the decoupled prompts (benign image + harmful question)")
        self.decoupled = decoupled
        self.epochs = _checks.positive_int("epochs", epochs)
        self.lr = _checks.real("lr", lr, low=0.0, low_open=True)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.seed = _checks.seed(seed)
        self.progress = progress
        self.label = f"SafeEraser (PD {self.lambda_pd:g})" if self.lambda_pd > 0 else "PO (no PD)"

    def fit(self, model: nn.Module, data: UnlearnData) -> dict[str, Any]:
        UnlearnData.check(model, data)
        t0 = time.perf_counter()
        dev = device_of(model)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if head and self.refusal_class >= head[-1].out_features:
            raise ValueError(f"refusal_class: {self.refusal_class} is not an output of the model "
                             f"({head[-1].out_features} outputs)")
        use_pd = self.lambda_pd > 0 and self.decoupled is not None
        if use_pd:
            # targets: the ORIGINAL model's answers (spec pitfall), fixed before any update
            pd_y = logits_of(model, TensorDataset(self.decoupled, torch.zeros(len(self.decoupled))))[0].argmax(1)
            pd_iter = itertools.cycle(DataLoader(TensorDataset(self.decoupled, pd_y), batch_size=self.batch_size,
                                                 shuffle=True, generator=torch.Generator().manual_seed(self.seed + 2)))
        g = torch.Generator().manual_seed(self.seed)
        retain = itertools.cycle(DataLoader(data.retain, batch_size=self.batch_size, shuffle=True,
                                            generator=torch.Generator().manual_seed(self.seed + 1)))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.lr)
        model.train()
        steps = 0
        for _ in tqdm(range(self.epochs), desc=self.label, disable=not self.progress, leave=False):
            for xf, _yf in DataLoader(data.forget, batch_size=self.batch_size, shuffle=True, generator=g):
                xr, yr = next(retain)
                refuse = torch.full((len(xf),), self.refusal_class, dtype=torch.long, device=dev)
                loss = F.cross_entropy(model(xf.to(dev)), refuse) + F.cross_entropy(model(xr.to(dev)), yr.to(dev))
                if use_pd:
                    xp, yp = next(pd_iter)
                    loss = loss + self.lambda_pd * prompt_decouple_loss(model, xp.to(dev), yp.to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
        model.eval()
        return {"method": self.label, "steps": steps, "seconds": time.perf_counter() - t0}
