# Hand-written stub of the Rust extension module (rust/python/). tests/test_stub.py runs
# mypy.stubtest against the built module, so a binding and its stub cannot drift apart.

__all__ = ["__version__", "num_threads", "spectral_condition_numbers", "spectral_norm_estimates",
           "spectral_singular_values"]
__version__: str

def num_threads() -> int: ...

# spectral (rust/python/spectral.rs)
import numpy as np
import numpy.typing as npt

def spectral_singular_values(
    matrices: list[npt.NDArray[np.float32]], method: str = "auto"
) -> list[npt.NDArray[np.float64]]: ...
def spectral_condition_numbers(
    matrices: list[npt.NDArray[np.float32]], method: str = "auto"
) -> npt.NDArray[np.float64]: ...
def spectral_norm_estimates(
    matrices: list[npt.NDArray[np.float32]], tol: float = 1e-6, max_iter: int = 100, seed: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint64], npt.NDArray[np.bool_]]: ...
