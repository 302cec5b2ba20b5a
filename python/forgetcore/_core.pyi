# Hand-written stub of the Rust extension module (rust/python/). tests/test_stub.py runs
# mypy.stubtest against the built module, so a binding and its stub cannot drift apart.

__all__ = [
    "__version__",
    "cuda_accumulate_",
    "cuda_compile",
    "cuda_compile_check",
    "cuda_device_info",
    "cuda_find_invalid",
    "cuda_kv_accumulate_",
    "cuda_kv_evict_one",
    "cuda_kv_select_keep",
    "cuda_nvrtc_version",
    "cuda_ssd_dampen_",
    "num_threads",
]
__version__: str

def num_threads() -> int: ...

# CUDA path (rust/python/cuda.rs): raw device pointers and torch's stream handle as ints; only
# forgetcore._cuda calls the launchers, after checking the tensors.
def cuda_nvrtc_version() -> tuple[int, int]: ...
def cuda_compile(source: str, arch: int, cubin: bool = False) -> bytes: ...
def cuda_compile_check(arch: int, cubin: bool = False) -> list[tuple[str, int]]: ...
def cuda_device_info(device: int) -> tuple[int, int]: ...
def cuda_accumulate_(
    device: int, stream: int, meta: int, n: int, chunk: int, blocks: int, scale: float, abs: bool
) -> None: ...
def cuda_ssd_dampen_(
    device: int, stream: int, meta: int, n: int, chunk: int, blocks: int, alpha: float, lam: float, counts: int
) -> None: ...
def cuda_find_invalid(device: int, stream: int, meta: int, n: int, chunk: int, blocks: int, first: int) -> None: ...
def cuda_kv_accumulate_(
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
def cuda_kv_select_keep(
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
def cuda_kv_evict_one(
    device: int, stream: int, scores: int, positions: int, valid: int, rows: int, slots: int, n_sink: int, n_recent: int, out: int
) -> None: ...
