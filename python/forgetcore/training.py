"""Small training and inference helpers shared by the baselines and the evaluation harness."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def reinit_(model: nn.Module, seed: int) -> None:
    """Fresh weights for every submodule that has ``reset_parameters``, from a seeded RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m in model.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()


def fit_epochs(model: nn.Module, data: Dataset, *, epochs: int, lr: float, batch_size: int, seed: int,
               weight_decay: float = 0.0, ascent: bool = False, optimizer: str = "adam",
               regulariser: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
               progress: bool = False, desc: str = "train") -> int:
    """Train (or, with ``ascent=True``, un-train) with cross-entropy; returns the number of steps.

    ``regulariser(model, loss) -> penalty``, if given, is added to each batch's (signed) loss.
    """
    dev = device_of(model)
    gen = torch.Generator().manual_seed(int(seed))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    model.train()
    steps = 0
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            obj = -loss if ascent else loss
            if regulariser is not None:
                obj = obj + regulariser(model, obj)
            obj.backward()
            opt.step()
            steps += 1
    model.eval()
    return steps


@torch.no_grad()
def logits_of(model: nn.Module, data: Dataset, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a whole dataset, in order, on the CPU, with the model in eval mode."""
    dev = device_of(model)
    was = model.training
    model.eval()
    outs, ys = [], []
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        outs.append(model(x.to(dev)).float().cpu())
        ys.append(y)
    model.train(was)
    return torch.cat(outs), torch.cat(ys)


def accuracy(model: nn.Module, data: Dataset) -> float:
    logits, y = logits_of(model, data)
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")
