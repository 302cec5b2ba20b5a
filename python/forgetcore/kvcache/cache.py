"""``KVCache``: a transformers ``Cache`` that really shrinks, and the attention that reads it.

Each layer holds keys/values (batch, kv_heads, slots, head_dim) plus, per slot, the token's
logical position, a validity flag and its accumulated score (all (batch, kv_heads, slots)).
Once a press evicts per head, slot order is no longer token order and heads of one row keep
different tokens, so transformers' 2-D attention mask and ``get_seq_length()`` no longer
describe the cache: this cache owns positions and validity and builds the per-head boolean
mask itself (:meth:`KVLayer.mask`).

The attention function (:func:`kv_attention`, registered with transformers'
``AttentionInterface`` as ``"forgetcore_kv"``) is installed by the press for the duration of
its ``with`` block, whatever ``attn_implementation`` the model was loaded with (eager, sdpa,
...). The output comes from torch's fused ``scaled_dot_product_attention`` (flash / memory-
efficient kernels where torch has them) with the cheapest exact mask (see :func:`_attend`);
the press's scores come from a separate pass (the fused kvscore kernel, or a bounded window of
query rows) that never holds the T x T matrix; then the press evicts, layer by layer, so the
whole prompt's K/V never sits in every layer at once. Presses therefore work with models
loaded for SDPA, unlike kvpress's attention-based presses, which need eager attention.

``get_seq_length()`` returns the number of tokens seen (left padding included), which is what
``generate()`` uses to slice inputs and place positions; the physical size is
:meth:`KVCache.physical_length`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .. import kvscore

ATTN_NAME = "forgetcore_kv"


@dataclass
class KVLayer:
    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor      # int64 (B, H, S): logical token index (column of the padded sequence)
    valid: torch.Tensor    # bool  (B, H, S): real token (not padding, not a freed slot)
    scores: torch.Tensor   # f32   (B, H, S)
    new: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # (B, H, q) slots of this step
    multi: dict = field(default_factory=dict)  # id(press) -> scores, filled by ScoreAll (evaluation)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.pos, self.valid, self.scores))

    def mask(self, q: int) -> torch.Tensor:
        """bool (B, H, q, S): query i sees every valid old slot and the new slots j <= i (causal)."""
        b, h, s = self.valid.shape
        is_new = torch.zeros(b, h, s, dtype=torch.bool, device=self.valid.device)
        is_new.scatter_(-1, self.new, True)
        m = (self.valid & ~is_new)[:, :, None, :].expand(b, h, q, s).clone()
        # new slot k (k-th new token) is visible to query i when k <= i and it is valid, or k == i
        causal = torch.ones(q, q, dtype=torch.bool, device=m.device).tril()
        vis = causal[None, None] & self.valid.gather(-1, self.new)[:, :, None, :]
        vis |= torch.eye(q, dtype=torch.bool, device=m.device)[None, None]   # pads see themselves (no NaN)
        m.scatter_(-1, self.new[:, :, None, :].expand(b, h, q, q), vis)
        return m


class KVCache(Cache):
    """A shrinking KV cache driven by a press (see ``forgetcore.kvcache``).

    Create it through a press (``with press(model): model.generate(...)`` makes one per call)
    or explicitly with ``press.make_cache()`` and pass it as the cache argument.
    """

    def __init__(self, press: Any):
        super().__init__(layer_class_to_replicate=DynamicLayer)
        self.press = press
        self.kv: list[KVLayer | None] = []
        self.seen = 0                  # logical tokens seen (columns of the padded batch)
        self.budget: int | None = None  # fixed at the first forward
        self._new_valid: torch.Tensor | None = None
        self._q = 0
        self.forwards = 0
        self.input_ids: torch.Tensor | None = None   # this forward's token ids (sentence forgetting)

    # -- bookkeeping the press calls before each forward --------------------------------------
    def begin_forward(self, q: int, batch: int, attention_mask: torch.Tensor | None, device,
                      input_ids: torch.Tensor | None = None) -> None:
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask: a press needs the 2-D (batch, length) padding mask, "
                                 f"got {attention_mask.dim()}-D")
            nv = attention_mask[:, -q:].to(device=device, dtype=torch.bool)
        else:
            nv = torch.ones(batch, q, dtype=torch.bool, device=device)
        if self.budget is None:
            self.budget = self.press._budget_for(self.seen + q)
        self._new_valid, self._q = nv, q
        self.input_ids = input_ids if input_ids is not None and input_ids.shape == (batch, q) else None

    def query_valid(self, b: int, q: int, device) -> torch.Tensor:
        """bool (b, q): which rows of this forward are real tokens (False: left padding)."""
        nv = self._new_valid
        return nv if nv is not None and nv.shape == (b, q) else torch.ones(b, q, dtype=torch.bool, device=device)

    def end_forward(self) -> None:
        self.seen += self._q
        self.forwards += 1

    # -- transformers Cache API ---------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        b, h, q, _ = key_states.shape
        while len(self.kv) <= layer_idx:
            self.kv.append(None)
        dev = key_states.device
        nv = self.query_valid(b, q, dev)
        pos_new = (self.seen + torch.arange(q, device=dev)).expand(b, h, q)
        val_new = nv[:, None, :].expand(b, h, q)
        lay = self.kv[layer_idx]
        if lay is None:
            lay = KVLayer(key_states, value_states, pos_new.contiguous(), val_new.contiguous(),
                          torch.zeros(b, h, q, dtype=torch.float32, device=dev),
                          torch.arange(q, device=dev).expand(b, h, q).contiguous())
            self.kv[layer_idx] = lay
            return lay.keys, lay.values
        free = ~lay.valid & (lay.pos < 0)  # slots freed by step-wise eviction (pos = -1)
        if q == 1 and bool(free.any(-1).all()):
            # one in, one out: overwrite the freed slot in place, O(heads x head_dim)
            slot = free.to(torch.int8).argmax(-1, keepdim=True)            # (B, H, 1)
            d = key_states.shape[-1]
            lay.keys.scatter_(2, slot[..., None].expand(b, h, 1, d), key_states)
            lay.values.scatter_(2, slot[..., None].expand(b, h, 1, value_states.shape[-1]), value_states)
            lay.pos.scatter_(-1, slot, pos_new)
            lay.valid.scatter_(-1, slot, val_new)
            lay.scores.scatter_(-1, slot, torch.zeros_like(slot, dtype=torch.float32))
            lay.new = slot
        else:
            s = lay.keys.shape[2]
            lay.keys = torch.cat([lay.keys, key_states], 2)
            lay.values = torch.cat([lay.values, value_states], 2)
            lay.pos = torch.cat([lay.pos, pos_new], -1)
            lay.valid = torch.cat([lay.valid, val_new], -1)
            lay.scores = torch.cat([lay.scores, torch.zeros(b, h, q, dtype=torch.float32, device=dev)], -1)
            lay.new = (s + torch.arange(q, device=dev)).expand(b, h, q).contiguous()
        return lay.keys, lay.values

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        q = args[0] if args and isinstance(args[0], int) else self._q
        return self.physical_length() + q, 0

    def get_max_length(self, *args, **kwargs) -> int:
        return -1

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return -1

    def physical_length(self, layer_idx: int = 0) -> int:
        lay = self.kv[layer_idx] if layer_idx < len(self.kv) else None
        return 0 if lay is None else lay.keys.shape[2]

    def nbytes(self) -> int:
        """Bytes held by keys, values and the per-slot bookkeeping over all layers."""
        return sum(lay.nbytes() for lay in self.kv if lay is not None)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return any(lay is not None for lay in self.kv)

    def __len__(self) -> int:
        return len(self.kv)

    def reset(self) -> None:
        self.kv, self.seen, self.budget, self.forwards = [], 0, None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for lay in self.kv:
            if lay is not None:
                for name in ("keys", "values", "pos", "valid", "scores", "new"):
                    setattr(lay, name, getattr(lay, name).index_select(0, beam_idx.to(lay.keys.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for lay in self.kv:
            if lay is not None:
                for name in ("keys", "values", "pos", "valid", "scores", "new"):
                    setattr(lay, name, getattr(lay, name).repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for lay in self.kv:
            if lay is not None:
                for name in ("keys", "values", "pos", "valid", "scores", "new"):
                    setattr(lay, name, getattr(lay, name)[indices])

    def fork(self, press: Any) -> KVCache:
        """A compressed copy for ``press`` from a prefill scored by :class:`~.presses.ScoreAll`.

        Equal to prefilling under ``press`` (``mode="prefill"``) directly, since prefill outputs
        do not depend on the press: the evaluation scores every method from one prefill.
        """
        new = KVCache(press)
        new.seen, new.forwards = self.seen, self.forwards
        new.budget = press._budget_for(self.seen)
        for i, lay in enumerate(self.kv):
            sc = lay.multi[id(press)]
            # clones: the step-wise path writes in place and must not reach the parent's tensors
            new.kv.append(KVLayer(lay.keys.clone(), lay.values.clone(), lay.pos.clone(), lay.valid.clone(),
                                  sc.clone(), lay.new))
            if new.budget < lay.keys.shape[2]:
                new.compress_(i, new.budget, press.n_sink, press.n_recent, step=press.mode == "decode")
        return new

    # -- eviction -------------------------------------------------------------------------------
    def compress_(self, layer_idx: int, budget: int, n_sink: int, n_recent: int, step: bool) -> None:
        """Bring layer ``layer_idx`` down to ``budget`` valid slots.

        ``step`` (one new token over budget): free the lowest-scoring evictable slot in place
        (mark it invalid, pos -1) so the next token overwrites it. Otherwise gather the kept
        slots into new, smaller tensors (and, with ``step``-wise presses, one free slot).
        """
        lay = self.kv[layer_idx]
        n_valid = int(lay.valid.sum(-1).max())
        if n_valid <= budget:
            return
        if step and n_valid == budget + 1:
            ev = kvscore.evict_one(lay.scores, n_sink, n_recent, lay.pos, lay.valid,
                                   validated=True).to(lay.pos.device)  # (B, H)
            rows = (lay.valid.sum(-1) > budget) & (ev >= 0)   # rows under budget keep everything
            e = torch.where(rows, ev, torch.zeros_like(ev))[..., None]
            lay.valid.scatter_(-1, e, lay.valid.gather(-1, e) & ~rows[..., None])
            lay.pos.scatter_(-1, e, torch.where(rows[..., None], torch.full_like(e, -1), lay.pos.gather(-1, e)))
            return
        keep = kvscore.select_keep(lay.scores, budget, n_sink, n_recent, lay.pos, lay.valid,
                                    validated=True).to(lay.keys.device)
        d, dv = lay.keys.shape[-1], lay.values.shape[-1]
        lay.keys = lay.keys.gather(2, keep[..., None].expand(*keep.shape, d))
        lay.values = lay.values.gather(2, keep[..., None].expand(*keep.shape, dv))
        lay.pos = lay.pos.gather(-1, keep)
        lay.valid = lay.valid.gather(-1, keep)
        lay.scores = lay.scores.gather(-1, keep)
        # rows with fewer valid tokens than the budget keep pad slots: mark them free so the
        # step-wise path can reuse them before evicting anything
        lay.pos = torch.where(lay.valid, lay.pos, torch.full_like(lay.pos, -1)) if step else lay.pos
        if step and not bool((~lay.valid).any(-1).all()):
            b, h, _ = lay.pos.shape
            lay.keys = torch.cat([lay.keys, lay.keys.new_zeros(b, h, 1, d)], 2)
            lay.values = torch.cat([lay.values, lay.values.new_zeros(b, h, 1, dv)], 2)
            lay.pos = torch.cat([lay.pos, lay.pos.new_full((b, h, 1), -1)], -1)
            lay.valid = torch.cat([lay.valid, lay.valid.new_zeros(b, h, 1)], -1)
            lay.scores = torch.cat([lay.scores, lay.scores.new_zeros(b, h, 1)], -1)


def _attend(query: torch.Tensor, lay: KVLayer, q: int, scaling: float, first: bool) -> torch.Tensor:
    """Attention output (B, Hq, q, Dv) from torch's fused SDPA over what the cache holds.

    The mask is the cheapest that is exact: none (``is_causal``) for an unpadded first forward,
    the shared (B, 1, q, S) causal-and-padding mask for a padded one (every head holds the same
    slots then), the per-head validity (B, Hkv, 1, S) as a view for a decode step (the group's
    query heads ride in the query-length dimension, so no (B, H, q, S) tensor is built or
    cloned), and the full per-head mask only for a multi-token forward over an evicted cache.
    """
    b, hq, _, d = query.shape
    hkv = lay.keys.shape[1]
    g = hq // hkv
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if q == 1:
        qg = query.reshape(b, hkv, g, d)
        m = None if bool(lay.valid.all()) else lay.valid[:, :, None, :]
        return sdpa(qg, lay.keys, lay.values, attn_mask=m, scale=scaling).reshape(b, hq, 1, -1)
    if first:
        k = lay.keys.repeat_interleave(g, 1) if g > 1 else lay.keys
        v = lay.values.repeat_interleave(g, 1) if g > 1 else lay.values
        val = lay.valid[:, 0]                                                  # (B, S), same for every head
        if bool(val.all()):
            return sdpa(query, k, v, is_causal=True, scale=scaling)
        eye = torch.eye(q, dtype=torch.bool, device=query.device)
        # pads see themselves (a row that sees nothing would be NaN)
        m = (torch.ones(q, q, dtype=torch.bool, device=query.device).tril() & val[:, None, :]) | eye
        return sdpa(query, k, v, attn_mask=m[:, None], scale=scaling)
    m = lay.mask(q)                                                            # (B, Hkv, q, S)
    qg = query.reshape(b, hkv, g * q, d)
    mg = m[:, :, None].expand(b, hkv, g, q, m.shape[-1]).reshape(b, hkv, g * q, -1)
    return sdpa(qg, lay.keys, lay.values, attn_mask=mg, scale=scaling).reshape(b, hq, q, -1)


def kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function used while a press is active (see the module doc)."""
    press = getattr(module, "_forgetcore_press", None)
    cache = getattr(press, "active_cache", None) if press is not None else None
    if cache is None:
        raise RuntimeError("forgetcore_kv attention called outside a press's `with` block")
    layer_idx = module.layer_idx
    lay = cache.kv[layer_idx]
    q = query.shape[2]
    scaling = module.scaling if scaling is None else scaling
    first = cache.forwards == 0
    out = _attend(query, lay, q, scaling, first)
    press.observe(cache, layer_idx, module, query, scaling)
    press.after_attention(cache, layer_idx)
    return out.transpose(1, 2).contiguous(), None
