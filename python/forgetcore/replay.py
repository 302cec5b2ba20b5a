"""Rehearsal buffers, schedules and selection: reservoir, class-balanced reservoir, power-law
rehearsal, herding, the View-Batch sampler.

- :class:`ReservoirBuffer`: a uniform sample of everything ever added (Vitter's Algorithm R).
- :class:`ClassBalancedReservoir`: a sample that stays balanced over classes however skewed
  the stream (CBRS, Chrysakis and Moens, ICML 2020).
- :class:`PowerLawScheduler`: how much of each earlier task to rehearse after each new task
  (Gandhi et al., arXiv 2401.10393); it lives in :mod:`forgetcore.power_law` and is
  re-exported here.
- :func:`herding` / :func:`herding_per_class` (iCaRL's exemplar selection, WA's memory) and
  :func:`view_batch_indices` (View-Batch's recall-interval sampler): they live in
  :mod:`forgetcore.replay_samplers` and are re-exported here.

Both buffers store any set of named tensors (``x``, ``y``, ``logits``, task ids, ...), in
storage preallocated at the first ``add``. One Rust call per batch decides every slot (the
random stream, xoshiro256++, lives in Rust and is saved by ``state_dict``) and, for CPU
storage, also checks the batch against the stored fields and copies the surviving rows (the
GIL released for large copies); CUDA storage gets one ``index_copy_`` per field. Nothing runs
per example in Python.

Distributed training: every decision is a function of the seed and of what was added (batch
sizes; labels too for CBRS), computed on the host with an exact integer generator, so the
same seed gives the same choices on every rank and every machine. To keep one replicated
buffer under DDP, all-gather each batch and ``add`` the gathered batch on every rank with the
same seed: the buffers stay identical without any further communication. To keep one
independent buffer per rank instead, seed each with ``seed + rank``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import _backend, _checks
from ._core import CbrsCore, ReservoirCore
from .power_law import PowerLawScheduler
from .reference import scatter_rows_
from .replay_samplers import herding, herding_per_class, view_batch_indices

__all__ = ["ReservoirBuffer", "ClassBalancedReservoir", "PowerLawScheduler", "herding", "herding_per_class",
           "view_batch_indices"]

_SEEN_MAX = 2**63 - 1  # a saved `seen` above this could wrap the u64 counter of the core
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.uint16, torch.uint32, torch.uint64)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _numpy_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """None when ``tensor.numpy()`` works for ``dtype``, else an integer dtype of the same size
    to view it as (bfloat16, float8, complex32...): the copy only moves bytes."""
    try:
        torch.empty(0, dtype=dtype).numpy()
        return None
    except (TypeError, RuntimeError):
        return _SAME_SIZE_INT[torch.empty(0, dtype=dtype).element_size()]


def _concrete_device(device: torch.device | str) -> torch.device:
    """``"cuda"`` -> ``cuda:0`` (the current device), so that it compares equal to tensors' devices."""
    try:
        return torch.empty(0, device=device).device
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a usable torch device, got {device!r} ({e})") from None


_seed = _checks.seed
_rng_tensor = _checks.rng_tensor


def _rng_words(t: Any) -> list[int]:
    return _checks.rng_words("state_dict['rng']", t)


class _Field:
    """One stored field: its per-row shape and dtype, the storage and (CPU) its cached numpy
    view, which the Rust core writes through (numpy has no bfloat16 or float8: those storages
    are viewed as integers of the same size, since only bytes are copied)."""

    __slots__ = ("dtype", "name", "storage", "storage_np", "tail", "view_dtype")

    def __init__(self, name: str, tail: torch.Size, dtype: torch.dtype, storage: torch.Tensor):
        self.name, self.tail, self.dtype = name, tail, dtype
        self.view_dtype = _numpy_dtype(dtype)
        self.storage = storage
        self.storage_np = None
        if storage.device.type == "cpu":
            s = storage if self.view_dtype is None else storage.view(self.view_dtype)
            self.storage_np = s.numpy()


class _Buffer:
    """What both buffers share: field bookkeeping, checks, storage, sampling, state."""

    _core: ReservoirCore | CbrsCore  # the Rust decision state (and CPU copies), set by subclasses

    def _decide(self, n: int, labels: np.ndarray | None, batch: list[torch.Tensor],
                storage: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One core call: decide the slots of ``n`` items (and copy the rows when given storage)."""
        raise NotImplementedError

    # Bytes of bookkeeping per slot beyond the stored rows (CBRS keeps per-slot class tables).
    _SLOT_BYTES = 0

    def __init__(self, capacity: int, seed: int, device: torch.device | str | None):
        self._capacity = _checks.positive_int("capacity", capacity)
        self._seed = _seed(seed)
        self._device_arg = None if device is None else _concrete_device(device)
        # Sizes before allocation: every slot holds at least one byte (plus its bookkeeping), so
        # a capacity whose smallest storage cannot fit is refused now; the first add checks the
        # real size (capacity x the row's bytes) before it allocates.
        _checks.fits("capacity", self._capacity * (1 + self._SLOT_BYTES), self._device_arg,
                     f"(at least {1 + self._SLOT_BYTES} bytes per slot)")
        self._device: torch.device | None = self._device_arg
        self._fields: list[_Field] = []
        self._names: frozenset[str] = frozenset()
        self._specs: list[tuple[str, torch.Size, torch.dtype]] = []
        self._storage_np: list[np.ndarray] = []
        self._rust_copy = False

    # -- what is stored ------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def seen(self) -> int:
        """How many items have been offered to the buffer (every ``add``'s rows)."""
        return int(self._core.seen)

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the stored fields, in the order of the first ``add`` (empty before it)."""
        return tuple(f.name for f in self._fields)

    @property
    def device(self) -> torch.device | None:
        return self._device

    def __len__(self) -> int:
        return len(self._core)

    def data(self) -> dict[str, torch.Tensor]:
        """The stored items, ``{field: tensor of len(self) rows}`` (views, not copies)."""
        n = len(self)
        return {f.name: f.storage[:n] for f in self._fields}

    def get(self, index: Any) -> dict[str, torch.Tensor]:
        """``{field: stored[index]}`` for an int, slice or index tensor into ``range(len(self))``."""
        return {k: v[index] for k, v in self.data().items()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(capacity={self._capacity}, len={len(self)}, seen={self.seen}, "
                f"fields={list(self.fields)}, device={self._device})")

    # -- add -----------------------------------------------------------------------------------
    def _check_batch(self, fields: dict[str, Any]) -> tuple[int, list[torch.Tensor]]:
        """Validate one batch against the stored fields; return its length and its tensors in
        field order, made contiguous. This runs on every ``add``: one pass, cached specs."""
        if fields.keys() != self._names:
            self._names_error(fields)
        n = -1
        out = []
        device = self._device
        for name, tail, dtype in self._specs:
            t = fields[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {_checks.describe(t)}")
            shape = t.shape
            if t.dtype is not dtype:
                raise TypeError(f"{name}: expected {_dt(dtype)} tensor as stored, got {_checks.describe(t)}")
            if not shape or shape[1:] != tail:
                raise ValueError(f"{name}: expected shape {_rows_shape(tail)} as stored, got {_checks.describe(t)}")
            if t.device != device:
                raise ValueError(f"{name}: expected a tensor on {device} like the buffer, got {_checks.describe(t)}")
            if n != shape[0]:
                if n >= 0:
                    raise ValueError(f"{name}: expected {n} rows like {self._specs[0][0]!r}, got {_checks.describe(t)}")
                n = shape[0]
            out.append(t if t.is_contiguous() else t.contiguous())
        return n, out

    def _names_error(self, fields: Mapping[str, Any]) -> None:
        stored = ", ".join(self.fields)
        missing = [k for k in self.fields if k not in fields]
        if missing:
            raise ValueError(f"{missing[0]}: missing from add(); this buffer stores the fields {stored}")
        extra = [k for k in fields if k not in self._names]
        raise ValueError(f"{extra[0]}: not a field of this buffer (it stores {stored}; "
                         "the first add fixes the fields)")

    def _first_batch(self, fields: dict[str, Any]) -> tuple[int, list[torch.Tensor]]:
        """Check the batch that defines the fields (nothing is allocated here)."""
        if not fields:
            raise ValueError("fields: expected at least one named tensor, e.g. add(x=..., y=...)")
        n = -1
        first = ""
        dev = self._device_arg
        for name, t in fields.items():
            if name == "index":
                raise ValueError("index: reserved (sample(return_index=True) returns it); rename the field")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {_checks.describe(t)}")
            if t.dim() == 0:
                raise ValueError(f"{name}: expected a batch (a leading batch dimension), got {_checks.describe(t)}")
            if dev is None:
                dev = t.device
            elif t.device != dev:
                raise ValueError(f"{name}: expected a tensor on {dev}, got {_checks.describe(t)}")
            if n < 0:
                n, first = t.shape[0], name
            elif t.shape[0] != n:
                raise ValueError(f"{name}: expected {n} rows like {first!r}, got {_checks.describe(t)}")
        return n, list(fields.values())

    def _storage_bytes(self, rows: Mapping[str, torch.Tensor], device: torch.device | None) -> None:
        """Refuse storage that cannot fit: ``capacity`` rows of every field, before allocating."""
        row = sum(math.prod(t.shape[1:]) * t.element_size() for t in rows.values())
        _checks.fits("capacity", self._capacity * (row + self._SLOT_BYTES), device,
                     f"({self._capacity} slots of {row} bytes)")

    def _allocate(self, fields: dict[str, torch.Tensor]) -> None:
        t0 = next(iter(fields.values()))
        device = self._device_arg if self._device_arg is not None else t0.device
        self._storage_bytes(fields, device)
        self._set_fields([_Field(k, t.shape[1:], t.dtype,
                                 torch.empty((self._capacity, *t.shape[1:]), dtype=t.dtype, device=device))
                          for k, t in fields.items()])

    def _set_fields(self, fields: list[_Field]) -> None:
        self._fields = fields
        self._names = frozenset(f.name for f in fields)
        self._specs = [(f.name, f.tail, f.dtype) for f in fields]
        self._storage_np = [f.storage_np for f in fields if f.storage_np is not None]
        if fields:
            self._device = fields[0].storage.device
            self._rust_copy = _backend.dispatch(f"replay.{type(self).__name__}.add", self._device) == _backend.RUST
        else:
            self._device = self._device_arg
            self._rust_copy = False
        # The one-call fast path of `add` (CPU storage only): the core matches each batch
        # against these and hands it back (None) on any difference, for the checks below.
        if self._rust_copy and self._fast_label() != -1:
            self._core.set_fields([f.name for f in fields], [list(f.tail) for f in fields],
                                  [f.dtype for f in fields], self._storage_np, self._fast_label())
        else:
            self._core.set_fields([], [], [], [])

    def _fast_label(self) -> int | None:
        """Index of the label field for the fast path, None when there is none, -1 to disable it."""
        return None

    def _unallocate(self) -> None:
        self._set_fields([])

    def _add(self, fields: dict[str, Any], return_rows: bool, labels_of=None):
        """Shared ``add``: check, allocate on first use, one core call, CUDA copies."""
        fresh = not self._fields
        n, batch = self._first_batch(fields) if fresh else self._check_batch(fields)
        if n == 0:
            empty = torch.empty(0, dtype=torch.int64, device=self._device if not fresh else None)
            return (empty, empty.clone()) if return_rows else empty
        labels = labels_of(fields, fresh) if labels_of is not None else None
        if fresh:
            batch = [t if t.is_contiguous() else t.contiguous() for t in batch]
            self._allocate(dict(zip(fields, batch)))
        try:
            if self._rust_copy:
                slots, rows = self._decide(n, labels, batch, self._storage_np)
                slots_t = torch.from_numpy(slots)
                if return_rows:
                    return slots_t, torch.from_numpy(rows)
                return slots_t
            slots, rows = self._decide(n, labels, [], [])
        except BaseException:
            if fresh:
                self._unallocate()
            raise
        slots_t = torch.from_numpy(slots).to(self._device, non_blocking=True)
        rows_t = torch.from_numpy(rows).to(self._device, non_blocking=True)
        if len(slots):
            for f, t in zip(self._fields, batch):
                scatter_rows_(f.storage, t.detach(), slots_t, rows_t)
        return (slots_t, rows_t) if return_rows else slots_t

    # -- sample --------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None,
               return_index: bool = False) -> dict[str, torch.Tensor]:
        """``n`` distinct stored items, uniformly without replacement, in random order.

        Without ``generator`` the draw uses the buffer's own stream (saved by ``state_dict``);
        with one, ``torch.randperm`` on the generator's device. Returns ``{field: tensor}``
        plus ``"index"`` (the slots drawn) when ``return_index``.
        """
        n = _checks.positive_int("n", n, allow_zero=True)
        size = len(self)
        if n > size:
            raise ValueError(f"n: expected at most len(buffer) = {size} items, got {n}")
        if generator is None:
            idx = torch.from_numpy(self._core.sample(n))
        elif isinstance(generator, torch.Generator):
            idx = torch.randperm(size, generator=generator, device=generator.device)[:n]
        else:
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if self._device is not None and idx.device != self._device:
            idx = idx.to(self._device, non_blocking=True)
        out = {f.name: f.storage.index_select(0, idx) for f in self._fields}
        if return_index:
            out["index"] = idx
        return out

    # -- state ---------------------------------------------------------------------------------
    def _base_state(self) -> dict[str, Any]:
        n = len(self)
        return {
            "type": type(self).__name__,
            "capacity": self._capacity,
            "fields": {f.name: f.storage[:n].clone() for f in self._fields},
        }

    def _check_state(self, sd: Any, extra: tuple[str, ...]) -> tuple[int, list[int]]:
        """The checks both buffers' ``load_state_dict`` share (nothing is committed here):
        keys, type, capacity, ``seen`` and the random stream. Returns (seen, rng words)."""
        _checks.state_mapping("state_dict", sd, ("type", "capacity", "fields", "seen", "rng", *extra))
        if sd["type"] != type(self).__name__:
            raise ValueError(f"state_dict['type']: expected a {type(self).__name__} state, got {sd['type']!r}")
        cap = _checks.state_int("state_dict['capacity']", sd["capacity"], low=1)
        if cap != self._capacity:
            raise ValueError(f"state_dict['capacity']: expected {self._capacity} like this buffer, got {cap}")
        # seen < 2**63: the counter can never wrap (an add of n < 2**63 rows stays below 2**64).
        seen = _checks.state_int("state_dict['seen']", sd["seen"], high=_SEEN_MAX)
        return seen, _rng_words(sd["rng"])

    def _load_fields(self, sd: Mapping[str, Any], length: int) -> list[_Field]:
        """Check and build the stored fields of a state dict (nothing is committed here)."""
        stored = sd["fields"]
        if not isinstance(stored, Mapping):
            raise TypeError(f"state_dict['fields']: expected a dict of tensors, got {type(stored).__name__}")
        if length > self._capacity:
            raise ValueError(f"state_dict: {length} items stored, more than the capacity {self._capacity}")
        dev0 = None
        for name, t in stored.items():
            key = f"state_dict['fields'][{name!r}]"
            if not isinstance(name, str) or name == "index":
                raise ValueError(f"{key}: expected a field name (a str other than 'index')")
            _checks.tensor(key, t)
            if t.dim() == 0 or t.shape[0] != length:
                raise ValueError(f"{key}: expected {length} rows (min(seen, capacity)), got {_checks.describe(t)}")
            dev = self._device_arg if self._device_arg is not None else t.device
            if dev0 is not None and dev != dev0:
                raise ValueError(f"{key}: expected a tensor on {dev0} like the other fields, got {_checks.describe(t)}")
            dev0 = dev
        if length > 0 and not stored:
            raise ValueError(f"state_dict['fields']: {length} items stored but no fields")
        if stored:
            self._storage_bytes(stored, dev0)
        out = []
        for name, t in stored.items():
            dev = self._device_arg if self._device_arg is not None else t.device
            storage = torch.empty((self._capacity, *t.shape[1:]), dtype=t.dtype, device=dev)
            storage[:length] = t
            out.append(_Field(name, t.shape[1:], t.dtype, storage))
        return out


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rows_shape(tail: torch.Size) -> str:
    return "(" + ", ".join(["*", *map(str, tail)]) + ("," if not tail else "") + ")"


class ReservoirBuffer(_Buffer):
    """A uniform sample of a stream: Vitter's Algorithm R ("Random sampling with a reservoir",
    ACM Transactions on Mathematical Software, 1985).

    The ``t``-th item offered (0-based, over all batches) takes slot ``t`` while the buffer
    fills; afterwards it draws ``r`` uniform in ``[0, t]`` and replaces slot ``r`` if
    ``r < capacity``. Every item of the stream is therefore held with probability
    ``capacity / seen``, whatever the batch sizes. A batch is decided in one Rust call in
    stream order, exactly as item by item: when two items of one batch draw the same slot,
    the later one wins and only it is copied. This is the sampling rule of Mammoth's
    ``Buffer`` (``reservoir``) and of ER (Chaudhry et al. 2019); unlike Mammoth, draws come
    from the buffer's own seeded generator (not numpy's global one), so they are saved with
    the buffer and identical on every rank and machine.

    Args:
        capacity: how many items the buffer holds (>= 1). Sizes are checked before anything is
            allocated, against the host's physical memory (the device's total memory for CUDA
            storage): at construction, one byte per slot at least (CBRS: 17, its class tables);
            at the first ``add`` (and a load), ``capacity`` rows of every field. A capacity
            that cannot fit is a ``ValueError`` naming ``capacity`` and the bytes it would need.
        seed: seeds the buffer's xoshiro256++ stream (slot decisions and ``sample``).
        device: where storage lives; default: the device of the first batch. Later batches
            must be on it (no hidden transfers).

    ``add(**fields)`` takes a batch of named tensors with one leading batch length; the first
    non-empty ``add`` fixes the field names, per-row shapes and dtypes and allocates storage
    (``capacity`` rows each). It returns the slots written (int64, unique, in batch order)
    and, with ``return_rows=True`` (a reserved name), also the batch row each slot took. An
    empty batch is a no-op. A call that raises leaves the buffer as it was (``seen`` and the
    random stream included).
    """

    def __init__(self, capacity: int, seed: int = 0, device: torch.device | str | None = None):
        super().__init__(capacity, seed, device)
        self._core = ReservoirCore(self._capacity, self._seed)

    def add(self, return_rows: bool = False, **fields: torch.Tensor):
        # CPU storage and a batch exactly like the stored fields: one Rust call does it all.
        done = self._core.add_fields(fields, return_rows)
        if done is not None:
            return (torch.from_numpy(done[0]), torch.from_numpy(done[1])) if return_rows else torch.from_numpy(done)
        return self._add(fields, return_rows)

    def _decide(self, n, labels, batch, storage):
        return self._core.add(n, batch, storage)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: stored rows, ``seen``, the random
        stream. Tensors and plain Python types only (``torch.load(weights_only=True)``)."""
        st = self._core.get_state()
        sd = self._base_state()
        sd.update(seen=int(st["seen"]), rng=_rng_tensor(st["rng"]))
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, validated whole before anything is applied: keys, type,
        capacity (must equal this buffer's), ``seen`` in ``[0, 2**63)``, ``len == min(seen,
        capacity)`` rows in every field, the random stream; a state that fails leaves the
        buffer as it was."""
        seen, rng = self._check_state(state_dict, ())
        fields = self._load_fields(state_dict, min(seen, self._capacity))
        core = ReservoirCore(self._capacity, self._seed)
        core.set_state(seen, rng)
        self._core = core
        self._set_fields(fields)


class ClassBalancedReservoir(_Buffer):
    """Class-balancing reservoir sampling, CBRS: Chrysakis and Moens, "Online Continual
    Learning from Imbalanced Data", ICML 2020 (Algorithm 1).

    While the memory is not full every item is stored. Once it is full, an item of a class
    that is not *full* overwrites a random stored item of the currently *largest* class (ties:
    uniform over all instances of the tied classes); an item of a full class ``c`` goes
    through ``c``'s own reservoir, kept with probability ``m_c / n_c`` (``m_c`` stored,
    ``n_c`` seen) in place of a random stored item of ``c``. A class becomes full once it has
    been the largest and stays full. Hence a minority class keeps every one of its items while
    the large classes share out the rest, whatever the imbalance of the stream.

    Where the paper is silent: "has been the largest" is judged only once the memory is full
    (at every step, before the item is placed), not during the filling phase; tied largest
    classes are ordered by label, so decisions depend only on the seed and the labels. Per
    class, counts and slot lists live in Rust: an item costs O(1), never a scan of the buffer.
    Under CUDA storage the labels travel to the host once per batch (the decisions need them).

    Same ``add`` / ``sample`` / ``state_dict`` API as :class:`ReservoirBuffer`; ``label_key``
    names the field holding the labels, a 1-D integer tensor.
    """

    _core: CbrsCore
    _SLOT_BYTES = 16  # the core's per-slot class tables (slot list, slot -> class, position)

    def __init__(self, capacity: int, seed: int = 0, label_key: str = "y",
                 device: torch.device | str | None = None):
        super().__init__(capacity, seed, device)
        if self._capacity > 2**32 - 1:  # the core's slot tables are 32-bit
            raise ValueError(f"capacity: expected at most 2**32 - 1 slots, got {self._capacity}")
        if not isinstance(label_key, str):
            raise TypeError(f"label_key: expected a str, got {type(label_key).__name__}")
        self._label_key = label_key
        self._core = CbrsCore(self._capacity, self._seed)

    @property
    def label_key(self) -> str:
        return self._label_key

    def add(self, return_rows: bool = False, **fields: torch.Tensor):
        done = self._core.add_fields(fields, return_rows)  # see ReservoirBuffer.add
        if done is not None:
            return (torch.from_numpy(done[0]), torch.from_numpy(done[1])) if return_rows else torch.from_numpy(done)
        return self._add(fields, return_rows, labels_of=self._labels)

    def _fast_label(self) -> int | None:
        # The fast path reads int64 labels in place; other integer dtypes take the checked path.
        for i, f in enumerate(self._fields):
            if f.name == self._label_key and f.dtype is torch.int64 and f.tail == ():
                return i
        return -1

    def _labels(self, fields: dict[str, Any], fresh: bool) -> np.ndarray:
        key = self._label_key
        if key not in fields:
            raise ValueError(f"label_key: the labels field {key!r} is not among the fields added "
                             f"({', '.join(fields)})")
        y = fields[key]
        if y.dtype not in _INT_DTYPES:
            raise TypeError(f"{key}: expected an integer tensor of class labels, got {_checks.describe(y)}")
        if y.dim() != 1:
            raise ValueError(f"{key}: expected a 1-D tensor of labels, got {_checks.describe(y)}")
        if y.dtype is torch.int64 and y.device.type == "cpu":
            return (y if y.is_contiguous() else y.contiguous()).numpy()
        if y.dtype is torch.uint64 and bool((y > torch.iinfo(torch.int64).max).any()):
            raise ValueError(f"{key}: expected labels below 2**63, got {_checks.describe(y)}")
        return y.to("cpu", torch.int64).numpy()

    def _decide(self, n, labels, views, storage):
        return self._core.add(labels, views, storage)

    def class_counts(self) -> dict[int, int]:
        """``{label: items stored}`` for every class seen (0 for a class all of whose items were replaced)."""
        labels, stored, _, _ = self._core.classes()
        return dict(zip(labels.tolist(), stored.tolist()))

    def full_classes(self) -> list[int]:
        """Labels of the classes that are full (have been the largest once the memory filled)."""
        labels, _, _, full = self._core.classes()
        return labels[full].tolist()

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`ReservoirBuffer.state_dict`, plus the per-class bookkeeping (labels,
        stream counts, full flags and slot lists, whose order decides future victims)."""
        st = self._core.get_state()
        sd = self._base_state()
        sd.update(seen=int(st["seen"]), rng=_rng_tensor(st["rng"]), label_key=self._label_key,
                  classes={k: torch.from_numpy(st[k]) for k in ("labels", "n_seen", "full", "offsets", "slots")})
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """As :meth:`ReservoirBuffer.load_state_dict`, plus the class bookkeeping (checked by the
        core before it is applied: stream counts summing to ``seen``, slot lists covering the
        stored rows)."""
        seen, rng = self._check_state(state_dict, ("label_key", "classes"))
        if state_dict["label_key"] != self._label_key:
            raise ValueError(f"state_dict['label_key']: expected {self._label_key!r}, got {state_dict['label_key']!r}")
        classes = state_dict["classes"]
        if not isinstance(classes, Mapping):
            raise TypeError(f"state_dict['classes']: expected a dict of tensors, got {type(classes).__name__}")
        parts = {}
        for key, dtype in (("labels", torch.int64), ("n_seen", torch.int64), ("full", torch.bool),
                           ("offsets", torch.int64), ("slots", torch.int64)):
            name = f"state_dict['classes'][{key!r}]"
            if key not in classes:
                raise ValueError(f"{name}: missing from the state dict")
            parts[key] = _checks.tensor(name, classes[key], dtype=dtype, ndim=1).tolist()
        n_cls = len(parts["labels"])
        for key in ("n_seen", "full"):
            if len(parts[key]) != n_cls:
                raise ValueError(f"state_dict['classes'][{key!r}]: expected one entry per class ({n_cls}), "
                                 f"got {len(parts[key])}")
        offsets, length = parts["offsets"], len(parts["slots"])
        if (len(offsets) != n_cls + 1 or offsets[0] != 0 or offsets[-1] != length
                or any(a > b for a, b in itertools.pairwise(offsets))):
            raise ValueError(f"state_dict['classes']['offsets']: expected {n_cls + 1} non-decreasing offsets "
                             f"from 0 to {length} (the slots' length)")
        if len(set(parts["labels"])) != n_cls:
            raise ValueError("state_dict['classes']['labels']: expected distinct class labels")
        if length != min(seen, self._capacity):
            raise ValueError(f"state_dict['classes']['slots']: expected min(seen, capacity) = "
                             f"{min(seen, self._capacity)} stored items, got {length}")
        if sum(parts["n_seen"]) != seen or any(v < 0 for v in parts["n_seen"]):
            raise ValueError(f"state_dict['classes']['n_seen']: expected non-negative counts summing to "
                             f"seen = {seen}, got sum {sum(parts['n_seen'])}")
        fields = self._load_fields(state_dict, length)
        core = CbrsCore(self._capacity, self._seed)
        try:
            core.set_state(seen, rng, parts["labels"], parts["n_seen"], parts["full"], parts["offsets"],
                           parts["slots"])
        except (OverflowError, RuntimeError) as e:  # a core check the Python ones above do not cover
            raise ValueError(f"state_dict['classes']: inconsistent class bookkeeping ({e})") from None
        self._core = core
        self._set_fields(fields)
