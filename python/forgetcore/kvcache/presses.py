"""KV-cache presses: A2SF, H2O and RecentWindow for Hugging Face Llama-architecture models.

Used like kvpress's presses::

    with A2SF(0.9, compression_ratio=0.8)(model):          # keep 20 % of the longest prompt
        out = model.generate(**tok(prompts, padding=True, return_tensors="pt"), max_new_tokens=32)

Inside the ``with`` block every forward call of ``model`` gets a :class:`~.cache.KVCache`
(one per ``generate()``/forward call that starts without a cache; pass ``press.make_cache()``
as the cache yourself to continue one across calls), and attention runs through
:func:`~.cache.kv_attention`, which needs no eager attention (see ``cache.py``).

Modes:

- ``mode="prefill"`` (one-shot, A2SF's current official code, "variant C"): the first forward
  (the prompt) is scored and compressed to the budget; later tokens are appended uncompressed.
- ``mode="decode"`` (step-wise, A2SF's real-drop code, "variant B"): the prompt is compressed
  to the budget, then every new token evicts one slot (one out per one in) and takes its place
  in the cache tensors, so a step costs O(heads x budget) and the cache never grows.

The budget is one number per batch: ``budget`` tokens, or ``compression_ratio`` (fraction
removed, as in kvpress) of the longest (padded) prompt. Rows with fewer real tokens than the
budget keep all of them; padding is never scored or kept ahead of a real token.

In a real cache evicted keys are gone, so the softmax of later queries is already taken over
the kept keys: A2SF's renormalisation and H2O's "zero the evicted scores" are both automatic
here (they only differ in the masked simulation, see ``forgetcore.kvcache.simulate``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from typing import Any

import torch

from .. import _checks, kvscore
from .cache import ATTN_NAME, KVCache, kv_attention

log = logging.getLogger(__name__)

_TESTED = {"llama", "mistral", "qwen2", "qwen3"}


def _register() -> None:
    try:
        from transformers import AttentionInterface
    except ImportError as e:  # pragma: no cover - guarded by the pinned range
        raise ImportError("transformers: forgetcore.kvcache needs transformers with AttentionInterface "
                          "(see pyproject.toml for the supported range)") from e
    AttentionInterface.register(ATTN_NAME, kv_attention)


class _Press:
    """Shared budget, mode and hooking logic; subclasses set ``alpha`` and ``scored``."""

    alpha: float = 1.0
    scored: bool = True

    def __init__(self, budget: int | None = None, compression_ratio: float | None = None,
                 n_sink: int = 4, n_recent: int = 8, mode: str = "prefill", chunk: int = 256):
        if (budget is None) == (compression_ratio is None):
            raise ValueError("budget: give exactly one of budget= (tokens kept) or compression_ratio= "
                             f"(fraction removed), got budget={budget}, compression_ratio={compression_ratio}")
        self.n_sink = _checks.positive_int("n_sink", n_sink, allow_zero=True)
        self.n_recent = _checks.positive_int("n_recent", n_recent, allow_zero=True)
        if budget is not None:
            budget = _checks.positive_int("budget", budget)
            if budget < self.n_sink + self.n_recent:
                raise ValueError(f"budget: expected at least n_sink + n_recent = {self.n_sink + self.n_recent}, "
                                 f"got {budget}")
        if compression_ratio is not None:
            compression_ratio = _checks.real("compression_ratio", compression_ratio, low=0.0, high=1.0,
                                             high_open=True)
        if mode not in ("prefill", "decode"):
            raise ValueError(f"mode: expected 'prefill' or 'decode', got {mode!r}")
        self.budget, self.compression_ratio, self.mode = budget, compression_ratio, mode
        self.chunk = _checks.positive_int("chunk", chunk)
        self.active_cache: KVCache | None = None

    def __repr__(self) -> str:
        b = f"budget={self.budget}" if self.budget is not None else f"compression_ratio={self.compression_ratio}"
        return f"{type(self).__name__}({b}, n_sink={self.n_sink}, n_recent={self.n_recent}, mode={self.mode!r})"

    # -- policy -----------------------------------------------------------------------------------
    def _budget_for(self, length: int) -> int:
        """Slots kept per (row, head) for a prompt of ``length`` (padded) tokens."""
        if self.budget is not None:
            return self.budget
        kept = math.floor((1.0 - self.compression_ratio) * length + 0.5)
        return max(kept, self.n_sink + self.n_recent)

    def needs_scores(self, cache: KVCache) -> bool:
        return self.scored and (self.mode == "decode" or cache.forwards == 0)

    def accumulate(self, lay, probs: torch.Tensor, group: int) -> None:
        """Add the attention rows ``probs`` (B, q_heads, q, S) to the layer's scores."""
        kvscore.accumulate_(lay.scores, probs, self.alpha, group)

    def after_attention(self, cache: KVCache, layer_idx: int) -> None:
        if self.mode == "decode" or cache.forwards == 0:
            cache.compress_(layer_idx, cache.budget, self.n_sink, self.n_recent, step=self.mode == "decode")

    def make_cache(self) -> KVCache:
        return KVCache(self)

    # -- hooking --------------------------------------------------------------------------------------
    def _check_model(self, model) -> list:
        cfg = getattr(model, "config", None)
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if cfg is None or layers is None or not hasattr(cfg, "_attn_implementation"):
            raise TypeError(f"model: expected a Hugging Face decoder (Llama architecture) with .model.layers and a "
                            f"config, got {type(model).__name__}")
        attns = [getattr(layer, "self_attn", None) for layer in layers]
        if any(a is None or not hasattr(a, "layer_idx") or not hasattr(a, "scaling") for a in attns):
            raise TypeError(f"model: {type(model).__name__}'s layers have no `self_attn` with layer_idx/scaling; "
                            "the press needs a model whose attention goes through transformers' "
                            "AttentionInterface (Llama, Mistral, Qwen2/3)")
        if getattr(cfg, "model_type", None) not in _TESTED:
            log.warning("kvcache: %s is untested with model_type=%r", type(self).__name__, cfg.model_type)
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
                and cfg.model_type not in ("llama", "qwen2", "qwen3"):
            raise TypeError("model: sliding-window attention layers are not supported by the presses")
        return attns

    def _cache_key(self, model) -> str:
        return cache_kwarg(model)

    def _pre_hook(self, module, args, kwargs):
        key = self._cache_key(module)
        cache = kwargs.get(key, kwargs.get("past_key_values"))
        if not isinstance(cache, KVCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(f"{key}: a press needs its own KVCache from the first token; got a filled "
                                 f"{type(cache).__name__} (pass press.make_cache() or no cache)")
            cache = self.make_cache()
        kwargs.pop("past_key_values", None)
        kwargs[key] = cache
        kwargs["use_cache"] = True
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        b, q = x.shape[0], x.shape[1]
        cache.begin_forward(q, b, kwargs.get("attention_mask"), x.device)
        self.active_cache = cache
        return args, kwargs

    def _post_hook(self, module, args, kwargs, output):
        if self.active_cache is not None:
            self.active_cache.end_forward()
        return output

    @contextlib.contextmanager
    def __call__(self, model):
        """Context manager: install the press on ``model`` (restored on exit, also on error)."""
        attns = self._check_model(model)
        _register()
        cfg = model.config
        old_impl = cfg._attn_implementation
        handles = []
        try:
            cfg._attn_implementation = ATTN_NAME
            for a in attns:
                a._forgetcore_press = self
            handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            handles.append(model.register_forward_hook(self._post_hook, with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            for a in attns:
                if hasattr(a, "_forgetcore_press"):
                    del a._forgetcore_press
            cfg._attn_implementation = old_impl
            self.active_cache = None


class A2SF(_Press):
    """A2SF: Accumulative Attention Scoring with Forgetting Factor (Jeon et al., 2024/2025).

    Score S(j) = sum_i alpha^(t-i) A[i, j] (the spec's recurrence S <- alpha S + A_t), GQA
    query heads summed, float32; keep sinks + recent + top scores. ``mode="prefill"`` is the
    official HEAD code's one-shot compression (variant C: prefill weights alpha^(L-1-q));
    ``mode="decode"`` adds the real-drop code's one-out-per-one-in eviction (variant B).
    Departures: sinks are protected as in the lm-eval simulation (variant A), where variant B/C
    protect only a recent window; the recent window is ``n_recent`` tokens, not half the budget.
    The masked lm-eval rule (variant A, ``a2s_base_mask``) is :func:`~.simulate.a2sf_mask`.

    Args:
        forgetting_factor: alpha in [0, 1]; 1 is H2O's plain sum, 0 keeps the last row only.
    """

    def __init__(self, forgetting_factor: float, budget: int | None = None,
                 compression_ratio: float | None = None, n_sink: int = 4, n_recent: int = 8,
                 mode: str = "prefill", chunk: int = 256):
        self.alpha = _checks.real("forgetting_factor", forgetting_factor, low=0.0, high=1.0)
        super().__init__(budget, compression_ratio, n_sink, n_recent, mode, chunk)

    def __repr__(self) -> str:
        return super().__repr__().replace("(", f"(forgetting_factor={self.alpha}, ", 1)


class H2O(_Press):
    """H2O: Heavy-Hitter Oracle for Efficient Generative Inference (Zhang et al., NeurIPS 2023).

    Accumulated attention S(j) = sum_i A[i, j] (alpha = 1, no renormalisation); keep heavy
    hitters plus a recent window (and ``n_sink`` first tokens, 0 for the paper's rule).
    The masked lm-eval rule (``local_heavy_hitter_mask``) is :func:`~.simulate.h2o_mask`.
    """

    alpha = 1.0


class RecentWindow(_Press):
    """StreamingLLM-style window (Xiao et al., "Efficient Streaming Language Models with
    Attention Sinks", ICLR 2024): the first ``n_sink`` tokens plus the most recent ones.
    No attention scores are needed."""

    scored = False

    def __init__(self, budget: int | None = None, compression_ratio: float | None = None,
                 n_sink: int = 4, mode: str = "prefill", chunk: int = 256):
        super().__init__(budget, compression_ratio, n_sink, 0, mode, chunk)


class ScoreAll(_Press):
    """Evaluation helper: prefill without eviction, scoring every forgetting factor at once,
    so :meth:`KVCache.fork` can build each press's compressed cache from one prefill."""

    def __init__(self, alphas, chunk: int = 256):
        super().__init__(budget=None, compression_ratio=0.0, n_sink=0, n_recent=0, chunk=chunk)
        self.alphas = tuple(float(a) for a in alphas)

    def needs_scores(self, cache: KVCache) -> bool:
        return cache.forwards == 0

    def accumulate(self, lay, probs: torch.Tensor, group: int) -> None:
        for a in self.alphas:
            if a not in lay.multi:
                lay.multi[a] = torch.zeros_like(lay.scores)
            kvscore.accumulate_(lay.multi[a], probs, a, group)

    def after_attention(self, cache: KVCache, layer_idx: int) -> None:
        pass


def cache_kwarg(model) -> str:
    """The forward() keyword that takes the cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_bytes(cache: Any) -> int:
    """Bytes of a KVCache or a transformers DynamicCache (keys + values + bookkeeping)."""
    if isinstance(cache, KVCache):
        return cache.nbytes()
    total = 0
    for lay in getattr(cache, "layers", []):
        for t in (getattr(lay, "keys", None), getattr(lay, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
