"""KV-cache token eviction for Hugging Face models: A2SF, H2O, RecentWindow, SnapKV, TOVA,
Knorm and ExpectedAttention presses, each one ``score()`` over the public :class:`Press` API.

See :mod:`.presses` for the API, :mod:`.cache` for the shrinking ``Cache`` and the attention
function, :mod:`.simulate` for the official masked (lm-eval) rules, :mod:`.evaluation` for
the offline evaluation set and :mod:`forgetcore.demos.kvcache` for ``forgetcore demo kv``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cache import KVCache
    from .presses import (
        A2SF,
        H2O,
        TOVA,
        ExpectedAttention,
        Knorm,
        Press,
        RecentWindow,
        ScoreContext,
        SnapKV,
        cache_bytes,
    )

# The presses need transformers (the `kv` extra); the pure-torch `forgetcore.kvcache.simulate`
# does not, so they are imported on first use and a base install can still import the package.
__all__ = ["A2SF", "H2O", "TOVA", "ExpectedAttention", "KVCache", "Knorm", "Press", "RecentWindow", "ScoreContext",
           "SnapKV", "cache_bytes"]
_LAZY = {n: "cache" if n == "KVCache" else "presses" for n in __all__}


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
