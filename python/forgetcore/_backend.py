"""Which implementation of a primitive runs for a given call: the one dispatch helper.

The rule: CPU tensors go to the Rust kernels, CUDA tensors to the family's CUDA kernel
where it has one, everything else (MPS, XPU, meta, ...) to ``reference.py``. A primitive whose
kernel cannot take some inputs (a dtype or a layout it does not handle) says why, and the call
goes to the reference: never silently. Every choice is logged at DEBUG on the
``forgetcore.dispatch`` logger with its reason, e.g.
``importance.accumulate_ -> reference: acc[1] is not contiguous``.
``FORGETCORE_BACKEND=reference`` forces the reference everywhere (debugging, benchmarks).
"""

from __future__ import annotations

import logging
import os

import torch

RUST = "rust"
CUDA = "cuda"
REFERENCE = "reference"

log = logging.getLogger("forgetcore.dispatch")


def choose(device: torch.device, *, cuda_kernel: bool = False) -> str:
    """The device rule alone: ``"rust"``, ``"cuda"`` or ``"reference"`` for tensors on ``device``.

    Primitives call :func:`dispatch`, which applies this rule, takes the kernel's own limits
    into account and logs the choice.
    """
    if os.environ.get("FORGETCORE_BACKEND", "").lower() == REFERENCE:
        return REFERENCE
    if device.type == "cpu":
        return RUST
    if device.type == "cuda" and cuda_kernel:
        return CUDA
    return REFERENCE


def _reason(device: torch.device, backend: str, cuda_kernel: bool) -> str:
    if backend == REFERENCE:
        if os.environ.get("FORGETCORE_BACKEND", "").lower() == REFERENCE:
            return "FORGETCORE_BACKEND=reference"
        if device.type == "cuda":
            return "no CUDA kernel for this primitive"
        return f"no kernel for {device.type} tensors"
    return f"{device.type} tensors"


def dispatch(op: str, device: torch.device, *, cuda_kernel: bool = False,
             unsupported: str | None = None) -> str:
    """Pick the implementation of primitive ``op`` (``"family.name"``) for tensors on ``device``.

    ``cuda_kernel``: the family has a CUDA kernel for ``op``. ``unsupported``: why the kernel
    that the device rule picks cannot take these inputs (``None`` when it can); the call then
    goes to the reference. Returns :data:`RUST`, :data:`CUDA` or :data:`REFERENCE` and logs the
    choice and its reason at DEBUG.
    """
    backend = choose(device, cuda_kernel=cuda_kernel)
    if backend != REFERENCE and unsupported is not None:
        reason = f"the {backend} kernel does not take these inputs: {unsupported}"
        backend = REFERENCE
    else:
        reason = _reason(device, backend, cuda_kernel)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s -> %s: %s", op, backend, reason)
    return backend
