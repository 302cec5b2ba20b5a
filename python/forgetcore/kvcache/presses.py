"""KV-cache presses for Hugging Face Llama-architecture models, over one public API.

A press is a :class:`Press` with one ``score(ctx) -> (batch, kv_heads, slots)`` method (see
:class:`ScoreContext`); the framework does budgets, sinks, the recent window, padding, batch > 1,
per-head eviction on a cache that really shrinks, and the attention. A2SF, H2O, RecentWindow,
and the ports of kvpress's SnapKV, TOVA, Knorm and ExpectedAttention are all such presses.

Used like kvpress's presses::

    with A2SF(0.9, compression_ratio=0.8)(model):          # keep 20 % of the longest prompt
        out = model.generate(**tok(prompts, padding=True, return_tensors="pt"), max_new_tokens=32)

Inside the ``with`` block every forward call of ``model`` gets a :class:`~.cache.KVCache`
(one per ``generate()``/forward call that starts without a cache; pass ``press.make_cache()``
as the cache yourself to continue one across calls), and attention runs through
:func:`~.cache.kv_attention`, which needs no eager attention (see ``cache.py``).

Modes:

- ``mode="prefill"`` (one-shot, as A2SF's current official code, "variant C"): the first
  forward (the prompt) is scored and each layer compressed to the budget right after its
  attention; later tokens are appended uncompressed.
- ``mode="decode"`` (step-wise, as A2SF's real-drop code): the prompt is compressed to the
  budget, then every new token is scored, evicts one slot (one out per one in) and takes its
  place in the cache tensors, so a step costs O(heads x budget) and the cache never grows.
  The scoring rule per step is the press's (A2SF: see its ``forgetting`` option).

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
from dataclasses import dataclass
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


@dataclass
class ScoreContext:
    """What a press's :meth:`Press.score` sees for one layer and one scored forward.

    All per-slot tensors are (batch, kv_heads, slots) over what the cache holds *after* this
    forward's keys were added (slots need not be in token order once a step-wise press has
    overwritten some; ``positions`` says which token each holds).

    Attributes:
        keys, values: (B, Hkv, S, D) the cache's keys (after rotary embedding) and values.
        positions: int64 (B, Hkv, S) token index of each slot (column of the padded batch).
        valid: bool (B, Hkv, S) real token (False: padding or a freed slot, never kept first).
        queries: (B, Hq, q, D) this forward's queries (after rotary embedding).
        query_positions: int64 (B, q); query_valid: bool (B, q) (False: padding).
        group: query heads per KV head (GQA).
        scaling: the attention's logit scale.
        window_attn: float32 (B, Hq, W, S) softmax attention of the last W = ``press.window``
            query rows (over the slots each may see), or None when the press asks for none.
        colsum: float32 (B, Hkv, S) the kernel's alpha-weighted attention column sums
            accumulated over every scored forward so far (``press.forgetting_factor``), or None.
        module: the attention module (for presses that need its weights or config).
        layer_idx: the layer.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    queries: torch.Tensor
    query_positions: torch.Tensor
    query_valid: torch.Tensor
    group: int
    scaling: float
    window_attn: torch.Tensor | None
    colsum: torch.Tensor | None
    module: Any
    layer_idx: int


class Press:
    """A KV press: subclasses implement :meth:`score`; the framework does the rest.

    The framework (this class) owns the budget (``budget`` tokens, or ``compression_ratio`` of
    the longest padded prompt), the protected sinks (first ``n_sink`` real tokens) and recent
    window (last ``n_recent``), padding (never scored, never kept ahead of a real token),
    batch > 1 with per-head eviction on a cache that really shrinks, the hooks on the model
    and the attention itself (torch's fused SDPA). A press only says which slots matter:

    - ``score(ctx) -> (B, Hkv, S)`` float scores, larger = keep (see :class:`ScoreContext`);
    - class attribute ``window = W`` to receive the last W query rows' attention (W x S, never
      S x S) in ``ctx.window_attn``;
    - class attribute ``forgetting_factor = alpha`` to receive the fused kernel's alpha-weighted
      column sums (:func:`forgetcore.kvscore.attention_scores_`) in ``ctx.colsum``, accumulated
      across scored forwards (``S <- alpha^q S + ...``).

    ``mode="prefill"`` scores the first forward (the prompt) and compresses each layer right
    after its attention, so the whole prompt's K/V never sits in every layer at once; later
    tokens are appended. ``mode="decode"`` also scores every later forward and keeps the cache
    at the budget, each new token taking the slot of the one it evicts.
    """

    window: int = 0
    forgetting_factor: float | None = None

    def __init__(self, budget: int | None = None, compression_ratio: float | None = None,
                 n_sink: int = 4, n_recent: int = 8, mode: str = "prefill"):
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
        self.tol = 1e-7
        self.active_cache: KVCache | None = None

    def __repr__(self) -> str:
        b = f"budget={self.budget}" if self.budget is not None else f"compression_ratio={self.compression_ratio}"
        return f"{type(self).__name__}({b}, n_sink={self.n_sink}, n_recent={self.n_recent}, mode={self.mode!r})"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, Hkv, S) scores for the slots in ``ctx``; larger = keep. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__}.score: a press implements score(ctx)")

    # -- policy -----------------------------------------------------------------------------------
    def _budget_for(self, length: int) -> int:
        """Slots kept per (row, head) for a prompt of ``length`` (padded) tokens."""
        if self.budget is not None:
            return self.budget
        kept = math.floor((1.0 - self.compression_ratio) * length + 0.5)
        return max(kept, self.n_sink + self.n_recent)

    def needs_scores(self, cache: KVCache) -> bool:
        return self.mode == "decode" or cache.forwards == 0

    def context(self, cache: KVCache, layer_idx: int, module, query: torch.Tensor, scaling: float,
                scores: torch.Tensor | None = None) -> ScoreContext:
        """Build the :class:`ScoreContext` for this forward; ``scores`` receives the column sums."""
        lay = cache.kv[layer_idx]
        b, hq, q, _ = query.shape
        g = hq // lay.keys.shape[1]
        qpos = (cache.seen + torch.arange(q, device=query.device)).expand(b, q)
        qval = cache.query_valid(b, q, query.device)
        colsum = None
        if self.forgetting_factor is not None:
            colsum = lay.scores if scores is None else scores
            self._colsum(cache, lay, query, qpos, qval, scaling, colsum)
        win = window_attention(query, lay.keys, lay.pos, lay.valid, qpos, scaling, self.window) \
            if self.window else None
        return ScoreContext(lay.keys, lay.values, lay.pos, lay.valid, query, qpos, qval, g, scaling, win, colsum,
                            module, layer_idx)

    def _colsum(self, cache: KVCache, lay, query, qpos, qval, scaling: float, out: torch.Tensor) -> None:
        """Accumulate the alpha-weighted column sums of this forward into ``out`` (the fused kernel)."""
        kvscore.attention_scores_(out, query, lay.keys, scaling, self.forgetting_factor, positions=lay.pos,
                                  valid=lay.valid, query_positions=qpos, query_valid=qval, tol=self.tol)

    def observe(self, cache: KVCache, layer_idx: int, module, query: torch.Tensor, scaling: float) -> None:
        """Score this forward's layer into the cache (called by the attention, before eviction)."""
        if not self.needs_scores(cache):
            return
        lay = cache.kv[layer_idx]
        s = self.score(self.context(cache, layer_idx, module, query, scaling))
        if s is not lay.scores:
            _check_scores(type(self).__name__, s, lay.scores.shape)
            lay.scores = s.float().contiguous()

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
            raise TypeError("model: sliding-window attention layers are not supported by the presses; "
                            "load the model with use_sliding_window=False or use a model without them")
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
        cache.begin_forward(q, b, kwargs.get("attention_mask"), x.device, ids)
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


def _check_scores(name: str, s: Any, shape) -> None:
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(shape) or not s.is_floating_point():
        raise ValueError(f"{name}.score: expected a float tensor of shape {tuple(shape)} (batch, kv_heads, slots), "
                         f"got {_checks.describe(s) if isinstance(s, torch.Tensor) else type(s).__name__}")
    if bool(torch.isnan(s).any()):
        raise ValueError(f"{name}.score: expected no NaN scores")


def window_attention(query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                     query_positions: torch.Tensor, scaling: float, window: int) -> torch.Tensor:
    """float32 (B, Hq, W, S) softmax attention of the last ``window`` query rows over the slots
    each may see (valid, position <= the query's): a bounded W x S block, never S x S."""
    b, hq, q, d = query.shape
    hkv = keys.shape[1]
    g = hq // hkv
    w = min(window, q)
    qw = query[:, :, q - w:].float().reshape(b, hkv, g * w, d)
    logits = torch.matmul(qw, keys.float().transpose(-1, -2)) * scaling               # (B, Hkv, g*w, S)
    vis = valid[:, :, None, :] & (positions[:, :, None, :] <= query_positions[:, None, q - w:, None])
    logits = logits.reshape(b, hkv, g, w, -1).masked_fill(~vis[:, :, None], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0).reshape(b, hq, w, -1)


class A2SF(Press):
    """A2SF: Accumulative Attention Scoring with Forgetting Factor (Jeon et al., 2024/2025).

    Score S(j) = sum_i alpha^(t-i) A[i, j], GQA query heads summed, float32, computed by the
    fused kernel (:func:`forgetcore.kvscore.attention_scores_`: no T x T matrix, and only the
    newest ~log(tol)/log(alpha) query rows, since older ones cannot change the ranking); keep
    sinks + recent + top scores. The official code's three variants:

    - ``forgetting="token"``, ``mode="prefill"`` (default) is variant C, the official HEAD code
      (``utils_real_drop/policies/a2sf.py``): prefill row q weighs alpha^(L-1-q), the prompt is
      compressed once, later tokens are appended.
    - ``forgetting="token"``, ``mode="decode"`` continues with the token-level recurrence
      ``S <- alpha S + a`` (decay, then add the new row) and one eviction per new token. This
      decode rule is ours (no official variant decays per token while decoding).
    - ``forgetting="sentence"`` is variant B, the real-drop code (``kv_cache.py`` ``update`` with
      ``kv_llama.py`` ``set_forget``): forgetting counts sentences, gated by ``punctuation_ids``.
      At prefill row q weighs alpha^k, k the number of punctuation tokens at or after the end of
      q's sentence (a punctuation token ends its sentence); each later token adds its row, then
      decays S by alpha only if it is punctuation (add, then decay). Use it with
      ``mode="decode"`` for the official per-step eviction. Every row is needed here (no skip).

    Departures from the official code: sinks are protected as in the lm-eval simulation
    (variant A), where variants B/C protect only a recent window (``n_sink=0`` restores that);
    the recent window is ``n_recent`` tokens (variant C uses 16, B half the budget); variant B's
    sentences are found per batch row (the official code flattens the batch, i.e. batch 1).
    The masked lm-eval rule (variant A, ``a2s_base_mask``) is :func:`~.simulate.a2sf_mask`.

    Args:
        forgetting_factor: alpha in [0, 1]; 1 is H2O's plain sum, 0 keeps the last row only.
        tol: the skipped query rows' total weight bound (see ``attention_scores_``); 0 = every row.
        forgetting: ``"token"`` or ``"sentence"`` (variant B; needs ``punctuation_ids``).
        punctuation_ids: token ids that end a sentence (e.g. the tokenizer's ids of ". , ! ? ;").
    """

    def __init__(self, forgetting_factor: float, budget: int | None = None,
                 compression_ratio: float | None = None, n_sink: int = 4, n_recent: int = 8,
                 mode: str = "prefill", tol: float = 1e-7, forgetting: str = "token",
                 punctuation_ids=None):
        self.forgetting_factor = _checks.real("forgetting_factor", forgetting_factor, low=0.0, high=1.0)
        super().__init__(budget, compression_ratio, n_sink, n_recent, mode)
        self.tol = _checks.real("tol", tol, low=0.0)
        if forgetting not in ("token", "sentence"):
            raise ValueError(f"forgetting: expected 'token' or 'sentence', got {forgetting!r}")
        self.forgetting = forgetting
        self.punctuation_ids = None
        if forgetting == "sentence":
            if punctuation_ids is None or len(punctuation_ids) == 0:
                raise ValueError("punctuation_ids: forgetting='sentence' needs the token ids that end a sentence, "
                                 "e.g. [tok.convert_tokens_to_ids(t) for t in ['.', ',', '!', '?']]")
            self.punctuation_ids = torch.tensor([int(i) for i in punctuation_ids], dtype=torch.int64)

    @property
    def alpha(self) -> float:
        return self.forgetting_factor

    def __repr__(self) -> str:
        extra = f"forgetting_factor={self.forgetting_factor}, "
        if self.forgetting == "sentence":
            extra += "forgetting='sentence', "
        return super().__repr__().replace("(", "(" + extra, 1)

    def _colsum(self, cache: KVCache, lay, query, qpos, qval, scaling: float, out: torch.Tensor) -> None:
        if self.forgetting == "token":
            return super()._colsum(cache, lay, query, qpos, qval, scaling, out)
        ids = cache.input_ids
        if ids is None:
            raise ValueError("input_ids: forgetting='sentence' needs the forward's input_ids (not inputs_embeds)")
        punct = torch.isin(ids, self.punctuation_ids.to(ids.device))
        q = query.shape[2]
        for b in range(query.shape[0]):
            # segments end after each punctuation token; S += rows of the segment, then, if it
            # ended with punctuation, S *= alpha (the official add-then-decay; at prefill this
            # gives row weights alpha^(punctuation tokens at or after its sentence's end))
            ends = (punct[b].nonzero().flatten() + 1).tolist()
            if not ends or ends[-1] != q:
                ends.append(q)
            sb, s0 = out[b:b + 1], 0
            for e in ends:
                kvscore.attention_scores_(sb, query[b:b + 1, :, s0:e], lay.keys[b:b + 1], scaling, 1.0,
                                          positions=lay.pos[b:b + 1], valid=lay.valid[b:b + 1],
                                          query_positions=qpos[b:b + 1, s0:e], query_valid=qval[b:b + 1, s0:e],
                                          tol=0.0)
                if bool(punct[b, e - 1]):
                    sb.mul_(self.forgetting_factor)
                s0 = e
        return None

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.colsum


class H2O(A2SF):
    """H2O: Heavy-Hitter Oracle for Efficient Generative Inference (Zhang et al., NeurIPS 2023).

    Accumulated attention S(j) = sum_i A[i, j] (alpha = 1, no renormalisation: in a real cache
    the evicted keys are gone, so later rows are over the kept keys, which is what H2O's
    "zero the evicted scores" gives); keep heavy hitters plus a recent window (and ``n_sink``
    first tokens, 0 for the paper's rule). Every query row is needed (blocked, no T x T
    matrix). The masked lm-eval rule (``local_heavy_hitter_mask``) is :func:`~.simulate.h2o_mask`.
    """

    def __init__(self, budget: int | None = None, compression_ratio: float | None = None,
                 n_sink: int = 4, n_recent: int = 8, mode: str = "prefill"):
        super().__init__(1.0, budget, compression_ratio, n_sink, n_recent, mode, tol=0.0)

    def __repr__(self) -> str:
        return Press.__repr__(self)


class RecentWindow(Press):
    """StreamingLLM-style window (Xiao et al., "Efficient Streaming Language Models with
    Attention Sinks", ICLR 2024): the first ``n_sink`` tokens plus the most recent ones.
    The score is the token position; no attention is computed."""

    def __init__(self, budget: int | None = None, compression_ratio: float | None = None,
                 n_sink: int = 4, mode: str = "prefill"):
        super().__init__(budget, compression_ratio, n_sink, 0, mode)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.positions.float()


class Knorm(Press):
    """Key-norm press (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV
    Cache Compression", EMNLP 2024; kvpress ``KnormPress``): keep the keys of *smallest* L2
    norm, score = -||k||."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1)


class SnapKV(Press):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024;
    kvpress ``SnapKVPress``): the attention of the last ``window`` prompt queries (the
    observation window), averaged over those rows, smoothed by average pooling over
    ``kernel_size`` neighbouring slots and averaged over the GQA group; the window itself is
    kept by the framework's recent window (``n_recent`` defaults to ``window``).

    Pooling runs over slot order, which is token order at prefill (the one-shot use); in
    ``mode="decode"`` slots are out of order and the window is the last token only.
    """

    def __init__(self, budget: int | None = None, compression_ratio: float | None = None, n_sink: int = 0,
                 n_recent: int | None = None, mode: str = "prefill", window: int = 64, kernel_size: int = 5):
        self.window = _checks.positive_int("window", window)
        self.kernel_size = _checks.positive_int("kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd number (centred pooling), got {kernel_size}")
        super().__init__(budget, compression_ratio, n_sink, self.window if n_recent is None else n_recent, mode)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        b, hkv, s = ctx.positions.shape
        a = ctx.window_attn.mean(2)                                          # (B, Hq, S)
        k = self.kernel_size
        a = torch.nn.functional.avg_pool1d(a.reshape(-1, 1, s), k, stride=1, padding=k // 2,
                                           count_include_pad=False).reshape(b, hkv * ctx.group, s)
        return a.reshape(b, hkv, ctx.group, s).mean(2)


class TOVA(Press):
    """TOVA (Oren et al., "Transformers are Multi-State RNNs", 2024; kvpress ``TOVAPress``): the
    last query's attention averaged over all heads of the layer, the same score for every KV
    head. In ``mode="decode"`` it re-scores at each new token, the paper's policy."""

    window = 1

    def __init__(self, budget: int | None = None, compression_ratio: float | None = None, n_sink: int = 0,
                 n_recent: int = 1, mode: str = "prefill"):
        super().__init__(budget, compression_ratio, n_sink, n_recent, mode)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        a = ctx.window_attn[:, :, -1].mean(1, keepdim=True)                 # (B, 1, S)
        return a.expand_as(ctx.positions).contiguous()


class ExpectedAttention(Press):
    """Expected-attention-style scoring (Devoto et al., "Expected Attention: KV Cache Compression
    by Estimating Attention from Future Queries Distribution", 2025; kvpress
    ``ExpectedAttentionPress``): model the next queries as Gaussian with the mean and diagonal
    variance of the last ``n_queries`` queries, score each key by the expected unnormalised
    attention exp(s mu.k + s^2/2 sum_d var_d k_d^2), normalised over the slots, averaged over the
    GQA group, plus ``epsilon``, times ||v|| (``use_vnorm``).

    Departure (ours, to stay short): the statistics are taken from the post-rotary queries of the
    last positions and not rotated to future positions, and the covariance is diagonal.
    """

    def __init__(self, budget: int | None = None, compression_ratio: float | None = None, n_sink: int = 4,
                 n_recent: int = 8, mode: str = "prefill", n_queries: int = 64, epsilon: float = 0.0,
                 use_vnorm: bool = True):
        self.n_queries = _checks.positive_int("n_queries", n_queries)
        self.epsilon = _checks.real("epsilon", epsilon, low=0.0)
        self.use_vnorm = bool(use_vnorm)
        super().__init__(budget, compression_ratio, n_sink, n_recent, mode)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        b, hkv, s = ctx.positions.shape
        q = ctx.queries[:, :, -self.n_queries:].float()                    # (B, Hq, n, D)
        mu, var = q.mean(2), q.var(2, unbiased=False) if q.shape[2] > 1 else torch.zeros_like(q[:, :, 0])
        k = ctx.keys.float().repeat_interleave(ctx.group, 1)               # (B, Hq, S, D)
        logit = ctx.scaling * (k @ mu[..., None])[..., 0] + 0.5 * ctx.scaling ** 2 * ((k * k) @ var[..., None])[..., 0]
        vis = ctx.valid.repeat_interleave(ctx.group, 1)
        p = torch.softmax(logit.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
        sc = p.reshape(b, hkv, ctx.group, s).mean(2) + self.epsilon
        return sc * ctx.values.float().norm(dim=-1) if self.use_vnorm else sc


class ScoreAll(Press):
    """Evaluation helper: prefill without eviction, scoring for every press at once, so
    :meth:`KVCache.fork` can build each press's compressed cache from one prefill."""

    def __init__(self, presses):
        super().__init__(budget=None, compression_ratio=0.0, n_sink=0, n_recent=0)
        self.presses = [p for p in presses if p is not None]

    def needs_scores(self, cache: KVCache) -> bool:
        return cache.forwards == 0

    def observe(self, cache: KVCache, layer_idx: int, module, query: torch.Tensor, scaling: float) -> None:
        if not self.needs_scores(cache):
            return
        lay = cache.kv[layer_idx]
        for p in self.presses:
            scores = torch.zeros_like(lay.scores)
            s = p.score(p.context(cache, layer_idx, module, query, scaling, scores=scores))
            _check_scores(type(p).__name__, s, lay.scores.shape)
            lay.multi[id(p)] = s.float().contiguous()

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
