# Hand-written stub of the Rust extension module (rust/python/). tests/test_stub.py runs
# mypy.stubtest against the built module, so a binding and its stub cannot drift apart.

__all__ = ["__version__", "num_threads", "project_out_", "project_out_flat_", "orthonormalize", "extend_bases"]
__version__: str

def num_threads() -> int: ...

# subspace (rust/python/subspace.rs)
import numpy as np
import numpy.typing as npt

def project_out_(
    grads: list[npt.NDArray[np.float32]], bases: list[npt.NDArray[np.float32]], check: bool = True
) -> None: ...
def project_out_flat_(
    g: npt.NDArray[np.float32], vectors: npt.NDArray[np.float32], check: bool = True
) -> None: ...
def orthonormalize(
    vectors: npt.NDArray[np.float32], tol: float
) -> tuple[npt.NDArray[np.float32], list[int]]: ...
def extend_bases(
    bases: list[npt.NDArray[np.float32]],
    reps: list[npt.NDArray[np.float32]],
    thresholds: list[float],
    criterion: str = "energy",
    count: str = "official",
    ratios: list[float | None] | None = None,
) -> list[npt.NDArray[np.float32]]: ...
