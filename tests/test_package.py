"""The package imports, the extension is abi3, and the shared argument checks name the argument."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forgetcore
from forgetcore import _checks, _core


def test_version_and_threads():
    assert forgetcore.__version__ == _core.__version__
    assert _core.num_threads() >= 1


def test_extension_is_abi3():
    # One wheel for every CPython >= 3.11: the module file carries the stable-ABI tag.
    assert Path(_core.__file__).name.endswith(".abi3.so")


def test_stub_matches_bindings():
    # The same check `make stubtest` runs; here too so `pytest` alone catches drift.
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "forgetcore._core", "--concise"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tensor_check_messages():
    x = torch.zeros(1024, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^imp_forget: expected float32 tensor, got float64 \(1024, 3\)"):
        _checks.tensor("imp_forget", x, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^imp_forget: expected shape \(1024,\)"):
        _checks.tensor("imp_forget", x, shape=(1024,))
    with pytest.raises(TypeError, match="^t: expected a torch.Tensor, got list"):
        _checks.tensor("t", [1, 2])
    assert _checks.tensor("x", x, shape=(None, 3)) is x


def test_scalar_checks():
    assert _checks.positive_int("capacity", 3) == 3
    with pytest.raises(ValueError, match="^capacity: expected an int >= 1, got 0"):
        _checks.positive_int("capacity", 0)
    with pytest.raises(TypeError, match="^capacity"):
        _checks.positive_int("capacity", 2.0)
    with pytest.raises(ValueError, match="^d: expected a finite number"):
        _checks.real("d", math.inf)
    with pytest.raises(ValueError, match=r"^alpha: expected a number > 0"):
        _checks.real("alpha", 0.0, low=0.0, low_open=True)
    with pytest.raises(ValueError, match="^g: expected finite values, got 1 NaN/inf"):
        _checks.finite("g", torch.tensor([1.0, math.nan]))


def test_numpy_view_shares_memory_and_widens_bf16():
    t = torch.zeros(4)
    _checks.numpy_view(t)[1] = 5.0
    assert t[1] == 5.0
    assert _checks.numpy_view(torch.ones(2, dtype=torch.bfloat16)).dtype.name == "int16"
