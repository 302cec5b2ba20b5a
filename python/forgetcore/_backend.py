"""Which implementation of a primitive runs for a given tensor.

DESIGN.md's dispatch: CPU tensors go to the Rust kernels, CUDA tensors to the family's CUDA
kernel where it has one, everything else (MPS, XPU, meta, ...) to ``reference.py``.
``FORGETCORE_BACKEND=reference`` forces the reference everywhere (debugging, benchmarks).
"""

from __future__ import annotations

import os

import torch

RUST = "rust"
CUDA = "cuda"
REFERENCE = "reference"


def choose(device: torch.device, *, cuda_kernel: bool = False) -> str:
    """Return ``"rust"``, ``"cuda"`` or ``"reference"`` for tensors on ``device``."""
    if os.environ.get("FORGETCORE_BACKEND", "").lower() == REFERENCE:
        return REFERENCE
    if device.type == "cpu":
        return RUST
    if device.type == "cuda" and cuda_kernel:
        return CUDA
    return REFERENCE
