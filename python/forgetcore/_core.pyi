# Hand-written stub of the Rust extension module (rust/python/). tests/test_stub.py runs
# mypy.stubtest against the built module, so a binding and its stub cannot drift apart.

__all__ = ["__version__", "num_threads"]
__version__: str

def num_threads() -> int: ...
