"""KV-cache token eviction for Hugging Face models: A2SF, H2O and RecentWindow presses.

See :mod:`.presses` for the API, :mod:`.cache` for the shrinking ``Cache`` and the attention
function, :mod:`.simulate` for the official masked (lm-eval) rules, :mod:`.evaluation` for
the offline evaluation set and :mod:`forgetcore.demos.kvcache` for ``forgetcore demo kv``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cache import KVCache
    from .presses import A2SF, H2O, RecentWindow, cache_bytes

# The presses need transformers (the `kv` extra); the pure-torch `forgetcore.kvcache.simulate`
# does not, so they are imported on first use and a base install can still import the package.
_LAZY = {"KVCache": "cache", "A2SF": "presses", "H2O": "presses", "RecentWindow": "presses",
         "cache_bytes": "presses"}

__all__ = ["A2SF", "H2O", "KVCache", "RecentWindow", "cache_bytes"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(f".{_LAZY[name]}", __name__)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] == "transformers":
                raise ImportError(f"forgetcore.kvcache.{name} needs transformers: "
                                  f"pip install 'forgetcore[kv]'") from e
            raise
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
