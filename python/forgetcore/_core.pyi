# Hand-written stub of the Rust extension module (rust/python/). tests/test_stub.py runs
# mypy.stubtest against the built module, so a binding and its stub cannot drift apart.

__all__ = ["__version__", "kv_accumulate_", "kv_evict_one", "kv_select_keep", "num_threads"]
__version__: str

def num_threads() -> int: ...

import numpy as np
import numpy.typing as npt

def kv_accumulate_(
    scores: npt.NDArray[np.float32],
    attn: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    attn_dtype: str,
    valid: npt.NDArray[np.bool_] | None,
    group: int,
    alpha: float,
    renorm: bool,
) -> None: ...
def kv_select_keep(
    scores: npt.NDArray[np.float32],
    positions: npt.NDArray[np.int64],
    valid: npt.NDArray[np.bool_],
    budget: int,
    n_sink: int,
    n_recent: int,
) -> npt.NDArray[np.int64]: ...
def kv_evict_one(
    scores: npt.NDArray[np.float32],
    positions: npt.NDArray[np.int64],
    valid: npt.NDArray[np.bool_],
    n_sink: int,
    n_recent: int,
) -> npt.NDArray[np.int64]: ...
