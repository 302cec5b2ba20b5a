"""KV-cache token scores: forgetting-factor accumulation and which slots to keep.

The primitive family behind :mod:`forgetcore.kvcache` (A2SF, H2O, RecentWindow):

- :func:`accumulate_` — ``S <- alpha^q S + sum_i alpha^(q-1-i) A_i`` over ``q`` new attention
  rows (newest weight 1), GQA query heads summed, float32 whatever the input dtype. A2SF
  (Accumulative Attention Scoring with Forgetting Factor) uses ``alpha < 1`` and, in its
  lm-eval simulation, renormalises each row over the keys still kept (``renorm=True``);
  H2O (Heavy-Hitter Oracle) is ``alpha = 1`` without renormalisation.
- :func:`select_keep` — the ``budget`` slots to keep per (batch, kv-head): sinks and the
  recent window always, the rest by top score; equal counts per head so K/V stay rectangular.
- :func:`evict_one` — the one slot to overwrite in step-wise eviction (O(slots) per head).
- :func:`attention_scores_` — the fused form of :func:`accumulate_` for a cache: the same
  alpha-weighted column sums straight from queries and keys, blocked over query rows, never
  holding the (q x slots) probability matrix; with alpha < 1 only the newest
  :func:`rows_needed` rows are computed (the skipped ones move no score by more than
  ``group * tol``), so A2SF's prefill scoring is O(W x T) instead of O(T^2).

Slots carry their token ``positions`` and a ``valid`` mask (B, H, T), because a cache that
overwrites evicted slots in place is no longer in token order and left padding puts pads
where sinks would be: sinks are the first ``n_sink`` valid positions, the recent window the
``n_recent`` highest, and invalid slots are never scored or kept ahead of a valid one. The
valid slots of a row hold distinct positions (a cache never holds a token twice; with
duplicates "the first" and "the most recent" are undefined): a repeat is a ``ValueError``
naming ``positions`` (``validated=True`` skips that check on the torch paths for a caller
that vouches for it, as the cache does; the Rust kernel's O(slots) check always runs).

Bad input: none of these functions is differentiable, so inputs that require grad are
detached (``scores`` is still written in place); NaN or inf attention, queries or keys and
NaN scores are a ``ValueError`` naming the argument, found by a read-only pass before
anything is written; ``scores`` sharing memory with an input it is computed from is refused.

CPU tensors run the Rust kernels (rayon, GIL released), CUDA tensors the NVRTC kernels of
``cuda/kvscore.cu`` on torch's current stream (``accumulate_`` bit-identical to Rust without
``renorm``, within float32 rounding of the row sums with it; ``attention_scores_`` within
float32 rounding: another summation order and exp); other devices run ``reference.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _backend, _checks, _core, _cuda, reference

__all__ = ["accumulate_", "attention_scores_", "evict_one", "rows_needed", "select_keep"]

_ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)




def rows_needed(alpha: float, tol: float, q_len: int) -> int:
    """Newest query rows that can move alpha-weighted scores by more than ``tol``: the smallest W
    with alpha^W / (1 - alpha) <= tol (``q_len`` for alpha = 1 or tol = 0; 1 for alpha = 0)."""
    alpha = _checks.real("alpha", alpha, low=0.0, high=1.0)
    tol = _checks.real("tol", tol, low=0.0)
    q_len = _checks.positive_int("q_len", q_len, allow_zero=True)
    return reference.kv_rows_needed(alpha, tol, q_len)


def _scores(scores: torch.Tensor) -> torch.Tensor:
    """Checked and detached (not differentiable: a scores tensor that requires grad is still
    written in place, through a detached view of the same memory)."""
    _checks.tensor("scores", scores, dtype=torch.float32, ndim=3)
    if scores.device.type == "meta":
        raise ValueError(f"scores: expected a tensor that holds data (CPU, CUDA, ...), got {_checks.describe(scores)}")
    # the Rust kernels check NaN themselves (one pass, no temporary); the reference needs it here
    if _backend.choose(scores.device) != _backend.RUST and scores.numel() and bool(torch.isnan(scores).any()):
        raise ValueError("scores: expected no NaN (+inf marks evicted slots), got NaN")
    return scores.detach()


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses that ``t``'s elements occupy."""
    lo = t.data_ptr()
    return lo, lo + (sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _disjoint(scores: torch.Tensor, **inputs) -> None:
    """Refuse an input that shares memory with ``scores`` (written in place while it is read)."""
    if scores.numel() == 0:
        return
    lo, hi = _extent(scores)
    for name, t in inputs.items():
        if t is None or t.numel() == 0 or t.untyped_storage().data_ptr() != scores.untyped_storage().data_ptr():
            continue
        a, b = _extent(t)
        if a < hi and lo < b:
            raise ValueError(f"{name}: expected memory disjoint from scores (written in place), got an "
                             "overlapping view; pass a copy (.clone())")


def _unique_positions(positions: torch.Tensor, valid: torch.Tensor) -> None:
    """The torch paths' form of the Rust kernel's check: distinct positions among valid slots."""
    if positions.shape[-1] < 2:
        return
    order = positions.argsort(dim=-1, stable=True)
    order = order.gather(-1, (~valid.gather(-1, order)).to(torch.uint8).argsort(dim=-1, stable=True))
    p, v = positions.gather(-1, order), valid.gather(-1, order)      # valid first, by position
    dup = (p[..., 1:] == p[..., :-1]) & v[..., 1:]
    if bool(dup.any()):
        raise ValueError(f"positions: expected distinct positions among the valid slots of each row, got "
                         f"{int(p[..., 1:][dup][0])} twice")


def _slots(scores: torch.Tensor, positions, valid):
    b, h, t = scores.shape
    if positions is None:
        positions = torch.arange(t, device=scores.device).expand(b, h, t)
    _checks.tensor("positions", positions, dtype=torch.int64, shape=(b, h, t), device=scores.device)
    if valid is None:
        valid = torch.ones(b, h, t, dtype=torch.bool, device=scores.device)
    _checks.tensor("valid", valid, dtype=torch.bool, shape=(b, h, t), device=scores.device)
    return positions, valid


def _counts(n_sink, n_recent):
    return _checks.positive_int("n_sink", n_sink, allow_zero=True), \
        _checks.positive_int("n_recent", n_recent, allow_zero=True)


def accumulate_(scores: torch.Tensor, attn: torch.Tensor, alpha: float, group: int = 1, *,
                renorm: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulate new attention rows into ``scores`` in place and return it.

    Args:
        scores: float32 (batch, kv_heads, T); may hold +inf ("already evicted" in simulation).
        attn: softmax probabilities (batch, kv_heads * group, q, T), float32/float16/bfloat16.
        alpha: forgetting factor in [0, 1]; 1 is H2O's plain sum.
        group: query heads per KV head (GQA); their rows are summed.
        renorm: divide each query head's row by its sum over ``valid`` slots (A2SF lm-eval).
        valid: bool (batch, kv_heads, T); invalid slots receive nothing.
    """
    out, scores = scores, _scores(scores)
    alpha = _checks.real("alpha", alpha, low=0.0, high=1.0)
    group = _checks.positive_int("group", group)
    b, h, t = scores.shape
    _checks.tensor("attn", attn, dtype=_ATTN_DTYPES, ndim=4, device=scores.device)
    if attn.shape[0] != b or attn.shape[1] != h * group or attn.shape[3] != t:
        raise ValueError(f"attn: expected shape ({b}, {h * group}, q, {t}) (batch, kv_heads*group, q, slots), "
                         f"got {_checks.describe(attn)}")
    if valid is not None:
        _checks.tensor("valid", valid, dtype=torch.bool, shape=(b, h, t), device=scores.device)
        valid = valid.detach()
    attn = attn.detach()
    _disjoint(scores, attn=attn, valid=valid)
    backend = _backend.dispatch("kvscore.accumulate_", scores.device, cuda_kernel=True,
                                unsupported=None if scores.is_contiguous()
                                else f"scores is not contiguous (strides {scores.stride()})")
    if backend == _backend.RUST:
        a = attn.contiguous()
        name = str(a.dtype).removeprefix("torch.")
        arr = a.numpy() if a.dtype == torch.float32 else a.view(torch.int16).numpy()
        v = None if valid is None else _checks.numpy_view(valid.contiguous())
        _core.kv_accumulate_(_checks.numpy_view(scores), arr, name, v, group, alpha, bool(renorm))
        return out
    _checks.finite("attn", attn)
    if backend == _backend.CUDA:
        _cuda.kv_accumulate_(scores, attn, alpha, group, renorm=bool(renorm),
                             valid=None if valid is None else valid.contiguous())
    else:
        reference.kv_accumulate_(scores, attn, alpha, group, renorm=renorm, valid=valid)
    return out


def select_keep(scores: torch.Tensor, budget: int, n_sink: int = 0, n_recent: int = 0,
                positions: torch.Tensor | None = None, valid: torch.Tensor | None = None, *,
                validated: bool = False) -> torch.Tensor:
    """The ``budget`` slots to keep per (batch, kv-head), ascending: int64 (batch, kv_heads, budget).

    ``budget >= T`` keeps everything (a documented no-op: returns ``arange(T)``).
    ``budget < n_sink + n_recent`` is an error. Ties in score keep the later token; the valid
    slots of a row must hold distinct positions (``validated=True``: the caller vouches).
    """
    scores = _scores(scores)
    n_sink, n_recent = _counts(n_sink, n_recent)
    budget = _checks.positive_int("budget", budget, allow_zero=True)
    if budget < n_sink + n_recent:
        raise ValueError(f"budget: expected at least n_sink + n_recent = {n_sink + n_recent}, got {budget}")
    given = positions, valid  # the CUDA kernel reads None as slot order / all valid: no (B, H, T) copies
    positions, valid = _slots(scores, positions, valid)
    b, h, t = scores.shape
    if budget >= t:
        return torch.arange(t, device=scores.device).expand(b, h, t).clone()
    backend = _backend.dispatch("kvscore.select_keep", scores.device, cuda_kernel=True)
    if backend != _backend.RUST and not validated:
        _unique_positions(positions, valid)
    if backend == _backend.CUDA:
        return _cuda.kv_select_keep(scores.contiguous(), budget, n_sink, n_recent,
                                    *(None if x is None else x.contiguous() for x in given))
    if backend == _backend.RUST:
        out = _core.kv_select_keep(_checks.numpy_view(scores.contiguous()), _checks.numpy_view(positions.contiguous()),
                                   _checks.numpy_view(valid.contiguous()), budget, n_sink, n_recent)
        return torch.from_numpy(np.asarray(out))
    return reference.kv_select_keep(scores, budget, n_sink, n_recent, positions, valid)


def evict_one(scores: torch.Tensor, n_sink: int = 0, n_recent: int = 0,
              positions: torch.Tensor | None = None, valid: torch.Tensor | None = None, *,
              validated: bool = False) -> torch.Tensor:
    """Per (batch, kv-head) the lowest-scoring valid slot that is neither sink nor recent
    (ties: the older token), or -1 where none: int64 (batch, kv_heads). The valid slots of a
    row must hold distinct positions (``validated=True``: the caller vouches)."""
    scores = _scores(scores)
    n_sink, n_recent = _counts(n_sink, n_recent)
    # protecting more than every slot protects every slot: clamp, so any int reaches the kernels
    n_sink, n_recent = min(n_sink, scores.shape[-1]), min(n_recent, scores.shape[-1])
    given = positions, valid
    positions, valid = _slots(scores, positions, valid)
    backend = _backend.dispatch("kvscore.evict_one", scores.device, cuda_kernel=True)
    if backend != _backend.RUST and not validated:
        _unique_positions(positions, valid)
    if backend == _backend.CUDA:
        return _cuda.kv_evict_one(scores.contiguous(), n_sink, n_recent,
                                  *(None if x is None else x.contiguous() for x in given))
    if backend == _backend.RUST:
        out = _core.kv_evict_one(_checks.numpy_view(scores.contiguous()), _checks.numpy_view(positions.contiguous()),
                                 _checks.numpy_view(valid.contiguous()), n_sink, n_recent)
        return torch.from_numpy(np.asarray(out))
    return reference.kv_evict_one(scores, n_sink, n_recent, positions, valid)


def attention_scores_(scores: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, scaling: float,
                      alpha: float, *, positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                      query_positions: torch.Tensor | None = None, query_valid: torch.Tensor | None = None,
                      tol: float = 1e-7) -> torch.Tensor:
    """Add the alpha-weighted softmax column sums of ``query`` over ``keys`` to ``scores`` in place.

    ``S <- alpha^q S + sum_i alpha^(q-1-i) sum_g softmax_j(scaling * q_gi . k_j)`` (newest row
    weight 1, GQA query heads summed, float32) — what :func:`accumulate_` gives from explicit
    probabilities, computed blocked so no (q x slots) matrix is ever held. Query row ``i`` sees
    slot ``j`` when ``valid[j]`` and ``positions[j] <= query_positions[i]`` (causal prefill,
    chunked prefill and decode alike, slots in any order); rows with ``query_valid`` false
    (padding), or that see nothing, add nothing.

    With ``alpha < 1`` only the newest ``rows_needed(alpha, tol, q)`` rows are computed: the
    skipped rows' weights sum to at most ``tol``, so every score is within ``group * tol`` of
    the exact one and the kept set can only differ between keys whose exact scores are closer
    than ``2 * group * tol``. ``tol=0`` computes every row.

    Args:
        scores: float32 (batch, kv_heads, slots); may hold +inf (evicted sentinel, kept by alpha = 0).
        query: (batch, kv_heads * group, q, head_dim), after rotary embedding.
        keys: (batch, kv_heads, slots, head_dim), what the cache holds (new keys included).
        scaling: the attention's logit scale (usually head_dim ** -0.5).
        alpha: forgetting factor in [0, 1].
        positions / valid: int64 / bool (batch, kv_heads, slots); default slot order / all valid.
        query_positions / query_valid: int64 / bool (batch, q); default the last q positions
            (``slots - q + i``) / all valid.
        tol: absolute bound on the skipped rows' total weight (>= 0).
    """
    out, scores = scores, _scores(scores)
    alpha = _checks.real("alpha", alpha, low=0.0, high=1.0)
    scaling = _checks.real("scaling", scaling)
    tol = _checks.real("tol", tol, low=0.0)
    b, h, t = scores.shape
    _checks.tensor("keys", keys, dtype=_ATTN_DTYPES, ndim=4, device=scores.device)
    _checks.tensor("query", query, dtype=_ATTN_DTYPES, ndim=4, device=scores.device)
    if keys.shape[:3] != (b, h, t):
        raise ValueError(f"keys: expected shape ({b}, {h}, {t}, head_dim) like scores, got {_checks.describe(keys)}")
    if query.shape[0] != b or query.shape[1] % h or query.shape[1] == 0 or query.shape[3] != keys.shape[3]:
        raise ValueError(f"query: expected shape ({b}, {h} * group, q, {keys.shape[3]}), got {_checks.describe(query)}")
    q = query.shape[2]
    positions, valid = _slots(scores, positions, valid)
    if query_positions is None:
        query_positions = (t - q + torch.arange(q, device=scores.device)).expand(b, q)
    _checks.tensor("query_positions", query_positions, dtype=torch.int64, shape=(b, q), device=scores.device)
    if query_valid is None:
        query_valid = torch.ones(b, q, dtype=torch.bool, device=scores.device)
    _checks.tensor("query_valid", query_valid, dtype=torch.bool, shape=(b, q), device=scores.device)
    query, keys = query.detach(), keys.detach()
    _disjoint(scores, query=query, keys=keys, positions=positions, valid=valid, query_positions=query_positions,
              query_valid=query_valid)
    backend = _backend.dispatch("kvscore.attention_scores_", scores.device, cuda_kernel=True,
                                unsupported=None if scores.is_contiguous() else "non-contiguous scores")
    if backend == _backend.RUST:
        _core.kv_attention_scores_(
            _checks.numpy_view(scores), query.float().contiguous().numpy(), keys.float().contiguous().numpy(),
            _checks.numpy_view(positions.contiguous()), _checks.numpy_view(valid.contiguous()),
            _checks.numpy_view(query_positions.contiguous()), _checks.numpy_view(query_valid.contiguous()),
            scaling, alpha, tol)
        return out
    _checks.finite("query", query)
    _checks.finite("keys", keys)
    if backend == _backend.CUDA:
        _cuda.kv_attention_scores_(scores, query.float().contiguous(), keys.float().contiguous(),
                                   positions.contiguous(), valid.contiguous(), query_positions.contiguous(),
                                   query_valid.contiguous(), scaling, alpha, tol)
        return out
    reference.kv_attention_scores_(scores, query, keys, scaling, alpha, positions, valid,
                                   query_positions, query_valid, tol=tol)
    return out
