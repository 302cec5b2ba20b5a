"""The best pure-torch formulation of every primitive.

This module is two things at once: the oracle the Rust and CUDA kernels are tested against,
and the fallback that runs on devices without a kernel (see ``_backend.py``). It is written
for clarity and for speed within torch (vectorised, no per-element Python), never the slow
way the public code does it: those baselines live in ``benches/``.

Sections follow the five families of DESIGN.md; each function has the same signature and
semantics as the public primitive of the same name.
"""

from __future__ import annotations

import torch  # noqa: F401  (used by every section)

# ---------------------------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# importance
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# subspace
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# kvscore
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# spectral
# ---------------------------------------------------------------------------------------------
