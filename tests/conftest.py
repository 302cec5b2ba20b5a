import os

import pytest
from hypothesis import HealthCheck, settings

# CI: reproducible examples, no wall-clock deadline (the machine is shared and noisy).
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import torch

# The models under test are tiny: extra intra-op threads only add contention on a busy
# 2-core machine (measured 30x slower under load). Rust kernels keep their own rayon pool.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer, loaded offline once per test session (~10 s)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from forgetcore.models import load_smollm2

    return load_smollm2()
