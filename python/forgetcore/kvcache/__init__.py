"""KV-cache token eviction for Hugging Face models: A2SF, H2O and RecentWindow presses.

See :mod:`.presses` for the API, :mod:`.cache` for the shrinking ``Cache`` and the attention
function, :mod:`.simulate` for the official masked (lm-eval) rules, :mod:`.evaluation` for
the offline evaluation set and :mod:`.demo` for ``forgetcore demo kv``.
"""

from __future__ import annotations

from .cache import KVCache
from .presses import A2SF, H2O, RecentWindow, cache_bytes

__all__ = ["A2SF", "H2O", "KVCache", "RecentWindow", "cache_bytes"]
