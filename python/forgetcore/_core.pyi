# Hand-written stub of the Rust extension module (rust/python/). tests/test_stub.py runs
# mypy.stubtest against the built module, so a binding and its stub cannot drift apart.

__all__ = ["__version__", "num_threads", "accumulate_", "ssd_dampen_", "find_invalid_importance"]
__version__: str

def num_threads() -> int: ...

# importance
import numpy as np
import numpy.typing as npt

def accumulate_(acc: list[npt.NDArray[np.float32]], grads: list[npt.NDArray[np.float32]], scale: float, mode: str) -> None: ...
def ssd_dampen_(params: list[npt.NDArray[np.float32]], imp_full: list[npt.NDArray[np.float32]], imp_forget: list[npt.NDArray[np.float32]], alpha: float, lam: float) -> npt.NDArray[np.int64]: ...
def find_invalid_importance(imps: list[npt.NDArray[np.float32]]) -> tuple[int, int, float] | None: ...
