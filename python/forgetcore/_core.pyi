"""Hand-written stub of the Rust extension module (rust/python/, built with the `python`
feature). tests/test_package.py runs mypy.stubtest against the built module, so a binding and
its stub cannot drift apart.

`_core` is one flat module. Its names map onto the families as follows (the Python modules are
the public API; nothing outside the primitives layer imports `_core`):

- replay: `ReservoirCore`, `CbrsCore`, `ReplayRng` (used by `forgetcore.replay`,
  `forgetcore.power_law`);
- importance: `accumulate_`, `ssd_dampen_`, `find_invalid_importance` (-> `InvalidImportance`),
  `stream_triad_` (the benchmarks' bandwidth yardstick), used by `forgetcore.importance`;
- kvscore: `kv_accumulate_`, `kv_select_keep`, `kv_evict_one` = `forgetcore.kvscore.accumulate_`,
  `select_keep`, `evict_one` (prefixed: importance also has an `accumulate_`);
- subspace: `project_out_`, `project_out_flat_`, `orthonormalize`, `extend_bases`, used by
  `forgetcore.subspace` under the same names;
- spectral: `spectral_singular_values`, `spectral_condition_numbers`, `spectral_norm_estimates`
  = `forgetcore.spectral.singular_values`, `kappa`, `spectral_norm` (prefixed, and `kappa` is
  the Python name of the condition numbers of matrices: `spectral.condition_numbers` means a
  model's layers -> dict);
- CUDA: `CudaUnavailableError`, `CudaCompileError`, `cuda_nvrtc_version`, `cuda_compile`,
  `cuda_compile_check`, `cuda_device_info`; the raw-pointer launchers `_cuda_*` are private,
  called only by `forgetcore._cuda` after its checks;
- `num_threads`: the size of the kernels' fork-safe thread pool.
"""

from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = ["__version__", "num_threads"]
__all__ += ["ReservoirCore", "CbrsCore", "ReplayRng"]
__all__ += ["accumulate_", "ssd_dampen_", "find_invalid_importance", "find_nonfinite", "InvalidImportance",
            "stream_triad_"]
__all__ += [
    "CudaCompileError",
    "CudaUnavailableError",
    "cuda_compile",
    "cuda_compile_check",
    "cuda_device_info",
    "cuda_nvrtc_version",
]
__all__ += ["kv_accumulate_", "kv_attention_scores_", "kv_evict_one", "kv_select_keep"]
__all__ += ["project_out_", "project_out_flat_", "orthonormalize", "extend_bases"]
__all__ += ["spectral_condition_numbers", "spectral_norm_estimates", "spectral_singular_values"]
__version__: str

def num_threads() -> int: ...

_I64 = npt.NDArray[np.int64]

@final
class ReservoirCore:
    def __new__(cls, capacity: int, seed: int) -> ReservoirCore: ...
    @property
    def capacity(self) -> int: ...
    @property
    def seen(self) -> int: ...
    def __len__(self) -> int: ...
    def add(self, n: int, batch: list[Any], storage: list[npt.NDArray[Any]]) -> tuple[_I64, _I64]: ...
    def set_fields(self, names: list[str], tails: list[list[int]], dtypes: list[Any],
                   storage: list[npt.NDArray[Any]], label: int | None = None) -> None: ...
    def add_fields(self, fields: dict[str, Any], return_rows: bool = False) -> Any: ...
    def sample(self, n: int) -> _I64: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, seen: int, rng: list[int]) -> None: ...

@final
class CbrsCore:
    def __new__(cls, capacity: int, seed: int) -> CbrsCore: ...
    @property
    def capacity(self) -> int: ...
    @property
    def seen(self) -> int: ...
    def __len__(self) -> int: ...
    def add(self, labels: _I64, batch: list[Any], storage: list[npt.NDArray[Any]]) -> tuple[_I64, _I64]: ...
    def set_fields(self, names: list[str], tails: list[list[int]], dtypes: list[Any],
                   storage: list[npt.NDArray[Any]], label: int | None = None) -> None: ...
    def add_fields(self, fields: dict[str, Any], return_rows: bool = False) -> Any: ...
    def sample(self, n: int) -> _I64: ...
    def classes(self) -> tuple[_I64, _I64, _I64, npt.NDArray[np.bool_]]: ...
    def slot_labels(self) -> _I64: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, seen: int, rng: list[int], labels: list[int], n_seen: list[int], full: list[bool],
                  offsets: list[int], slots: list[int]) -> None: ...

@final
class ReplayRng:
    def __new__(cls, seed: int) -> ReplayRng: ...
    def next_u64(self, n: int) -> npt.NDArray[np.uint64]: ...
    def below(self, bounds: _I64) -> _I64: ...
    def sample(self, size: int, n: int) -> _I64: ...
    def get_state(self) -> list[int]: ...
    def set_state(self, rng: list[int]) -> None: ...

# CUDA path (rust/python/cuda.rs). Typed errors, raised by the extension itself.
class CudaUnavailableError(RuntimeError): ...

class CudaCompileError(RuntimeError):
    log: str

def cuda_nvrtc_version() -> tuple[int, int]: ...
def cuda_compile(source: str, arch: int, cubin: bool = False) -> bytes: ...
def cuda_compile_check(arch: int, cubin: bool = False) -> list[tuple[str, int]]: ...
def cuda_device_info(device: int) -> tuple[int, int]: ...
# Private launchers (raw device pointers and torch's stream handle as ints, outside __all__):
# only forgetcore._cuda calls them, after checking the tensors.
def _cuda_accumulate_(
    device: int, stream: int, meta: int, acc: list[int], grads: list[int], chunk: int, blocks: int, scale: float,
    mode: str,
) -> None: ...
def _cuda_ssd_dampen_(
    device: int, stream: int, meta: int, numels: list[list[int]], chunk: int, blocks: int, alpha: float, lam: float,
    counts: int,
) -> None: ...
def _cuda_find_invalid(device: int, stream: int, meta: int, n: int, chunk: int, blocks: int, first: int) -> None: ...
def _cuda_kv_accumulate_(
    device: int,
    stream: int,
    scores: int,
    attn: int,
    attn_dtype: str,
    attn_strides: list[int],
    valid: int,
    inv: int,
    shape: list[int],
    alpha: float,
) -> None: ...
def _cuda_kv_select_keep(
    device: int,
    stream: int,
    scores: int,
    positions: int,
    valid: int,
    rows: int,
    slots: int,
    budget: int,
    n_sink: int,
    n_recent: int,
    out: int,
) -> None: ...
def _cuda_kv_evict_one(
    device: int,
    stream: int,
    scores: int,
    positions: int,
    valid: int,
    rows: int,
    slots: int,
    n_sink: int,
    n_recent: int,
    out: int,
) -> None: ...

def _cuda_kv_attention_scores_(
    device: int,
    stream: int,
    ptrs: list[int],
    dims: list[int],
    scaling: float,
    alpha: float,
    tol: float,
) -> None: ...

# importance

def accumulate_(
    acc: list[npt.NDArray[np.float32]], grads: list[npt.NDArray[np.float32]], scale: float, mode: str
) -> None: ...
def ssd_dampen_(
    params: list[npt.NDArray[np.float32]],
    imp_full: list[npt.NDArray[np.float32]],
    imp_forget: list[npt.NDArray[np.float32]],
    alpha: float,
    lam: float,
) -> npt.NDArray[np.int64]: ...

@final
class InvalidImportance:
    @property
    def tensor(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def value(self) -> float: ...

def find_invalid_importance(imps: list[npt.NDArray[np.float32]]) -> InvalidImportance | None: ...
def find_nonfinite(xs: list[npt.NDArray[np.float32]]) -> InvalidImportance | None: ...
def stream_triad_(
    a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], c: npt.NDArray[np.float32], s: float
) -> None: ...

# kvscore

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
def kv_attention_scores_(
    scores: npt.NDArray[np.float32],
    query: npt.NDArray[np.float32],
    keys: npt.NDArray[np.float32],
    key_pos: npt.NDArray[np.int64],
    key_valid: npt.NDArray[np.bool_],
    query_pos: npt.NDArray[np.int64],
    query_valid: npt.NDArray[np.bool_],
    scaling: float,
    alpha: float,
    tol: float,
) -> None: ...
# subspace (rust/python/subspace.rs)
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

# spectral (rust/python/spectral.rs)

def spectral_singular_values(
    matrices: list[npt.NDArray[np.float32]], method: str = "auto"
) -> list[npt.NDArray[np.float64]]: ...
def spectral_condition_numbers(
    matrices: list[npt.NDArray[np.float32]], method: str = "auto"
) -> npt.NDArray[np.float64]: ...
def spectral_norm_estimates(
    matrices: list[npt.NDArray[np.float32]], tol: float = 1e-6, max_iter: int = 100, seed: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint64], npt.NDArray[np.bool_]]: ...
