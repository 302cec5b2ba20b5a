"""The best pure-torch formulation of every primitive.

This module is two things at once: the oracle the Rust and CUDA kernels are tested against,
and the fallback that runs on devices without a kernel (see ``_backend.py``). It is written
for clarity and for speed within torch (vectorised, no per-element Python), never the slow
way the public code does it: those baselines live in ``benches/``.

Sections follow the five primitive families. What each function promises: the semantics
of the public primitive of the same name (``forgetcore.<family>.<name>``), on arguments that
the public layer has already checked (one place for each check: the reference repeats none,
keeping only what a step needs to be defined, such as ``sample_indices``'s ``n <= size``).
Names and signatures follow the public ones, with these documented differences:

- the kvscore functions carry a ``kv_`` prefix (``kv_accumulate_`` is
  ``kvscore.accumulate_``), because one module holds every family;
- options that only choose a kernel path are absent (``method=`` of the spectral functions,
  ``check=`` of the projections, ``validated=`` of ``ssd_dampen_``): the reference has one path;
- lists are plain lists of tensors (the public layer resolves modules and name -> tensor dicts);
- ``spectral_norm`` returns ``(values, iterations, converged)``, of which the public function
  returns the values and logs the rest; ``subspace_count`` and ``kappa_from_singular_values``
  are shared pieces with no public twin;
- the replay section works on the same xoshiro256++ draws as the Rust buffers (``Xoshiro256pp``,
  ``reservoir_draws``, ``CbrsReference``): the buffers' public API is stateful
  (``ReservoirBuffer``), the reference gives its steps.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------------------------
# The buffers' random decisions come from one xoshiro256++ stream in Rust. The reference takes
# the same draws (from `Xoshiro256pp` below, which reproduces that stream in Python integers)
# and applies each algorithm to them: vectorised where the algorithm allows it (Algorithm R's
# slots, the copies), one step per item where it is sequential by nature (CBRS, whose largest
# class changes item by item; a partial Fisher-Yates shuffle).

_MASK64 = (1 << 64) - 1


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & _MASK64


class Xoshiro256pp:
    """xoshiro256++ (Blackman and Vigna 2021) seeded by SplitMix64, with Lemire's exact bounded
    draws: the same stream as ``forgetcore._core.ReplayRng`` and the buffers' generators."""

    def __init__(self, seed: int = 0):
        x = seed & _MASK64
        s = []
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & _MASK64
            z = x
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
            s.append(z ^ (z >> 31))
        self.s = s

    def next_u64(self) -> int:
        s = self.s
        result = (_rotl((s[0] + s[3]) & _MASK64, 23) + s[0]) & _MASK64
        t = (s[1] << 17) & _MASK64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result

    def below(self, n: int) -> int:
        """A uniform integer in ``[0, n)``: Lemire's multiply, rejecting the biased low products."""
        m = self.next_u64() * n
        if (m & _MASK64) < n:
            threshold = ((1 << 64) - n) % n
            while (m & _MASK64) < threshold:
                m = self.next_u64() * n
        return m >> 64


def reservoir_draws(rng: Xoshiro256pp, seen: int, capacity: int, n: int) -> torch.Tensor:
    """The draws Algorithm R makes for the next ``n`` items: ``r`` uniform in ``[0, t]`` for item
    ``t = seen + i`` once ``t >= capacity``, and -1 (no draw) while the reservoir fills."""
    return torch.tensor([rng.below(seen + i + 1) if seen + i >= capacity else -1 for i in range(n)],
                        dtype=torch.int64)


def reservoir_slots(seen: int, capacity: int, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm R for a batch, vectorised: ``(slots, rows)``, the unique slots written and the
    batch row each one takes (the last of the rows that picked it), in row order."""
    n = len(draws)
    t = seen + torch.arange(n, dtype=torch.int64)
    slot = torch.where(t < capacity, t, draws)
    keep = slot < capacity
    rows = torch.nonzero(keep).flatten()
    slot = slot[keep]
    uniq, inverse = torch.unique(slot, return_inverse=True)
    last = torch.full((len(uniq),), -1, dtype=torch.int64).scatter_reduce_(0, inverse, rows, "amax")
    order = torch.argsort(last)
    return uniq[order], last[order]


def scatter_rows_(storage: torch.Tensor, batch: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """``storage[slots] = batch[rows]`` for unique slots and increasing rows: one indexed copy,
    on any device. Every row kept (the filling phase) means ``rows`` is ``0..n``: no gather."""
    storage.index_copy_(0, slots, batch if len(rows) == len(batch) else batch.index_select(0, rows))


def sample_indices(rng: Xoshiro256pp, size: int, n: int) -> torch.Tensor:
    """``n`` distinct indices of ``range(size)`` by a partial Fisher-Yates shuffle: step ``i``
    draws ``j`` uniform in ``[i, size)`` and swaps positions ``i`` and ``j``."""
    if n > size:
        raise ValueError(f"n: expected at most {size}, got {n}")
    moved: dict[int, int] = {}
    out = []
    for i in range(n):
        j = i + rng.below(size - i)
        out.append(moved.get(j, j))
        moved[j] = moved.get(i, i)
    return torch.tensor(out, dtype=torch.int64)


class CbrsReference:
    """Class-balancing reservoir sampling (Chrysakis and Moens, ICML 2020, Algorithm 1), one item
    at a time with plain Python containers and the same draws as the Rust kernel.

    Victims are picked by position in each class's slot list (a slot leaves its class by a
    swap-remove: the last slot of the list takes its place), tied largest classes are ordered by
    label, and a class is marked full when it is largest after a step once the memory is full.
    """

    def __init__(self, capacity: int, rng: Xoshiro256pp):
        self.capacity = capacity
        self.rng = rng
        self.seen = 0
        self.slot_label: list[int] = []
        self.slots: dict[int, list[int]] = {}
        self.n_seen: dict[int, int] = {}
        self.full: set[int] = set()

    def _mark_largest(self) -> None:
        m = max(len(v) for v in self.slots.values())
        self.full.update(k for k, v in self.slots.items() if len(v) == m)

    def step(self, y: int) -> int | None:
        self.seen += 1
        self.n_seen[y] = self.n_seen.get(y, 0) + 1
        own = self.slots.setdefault(y, [])
        if len(self.slot_label) < self.capacity:
            slot = len(self.slot_label)
            self.slot_label.append(y)
            own.append(slot)
            if len(self.slot_label) == self.capacity:
                self._mark_largest()
            return slot
        if y in self.full:
            r = self.rng.below(self.n_seen[y])
            return own[r] if r < len(own) else None
        m = max(len(v) for v in self.slots.values())
        tied = sorted(k for k, v in self.slots.items() if len(v) == m)
        r = self.rng.below(len(tied) * m)
        victims = self.slots[tied[r // m]]
        pos = r % m
        slot = victims[pos]
        last = victims.pop()
        if pos < len(victims):
            victims[pos] = last
        own.append(slot)
        self.slot_label[slot] = y
        self._mark_largest()
        return slot

    def add(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: ``(slots, rows)`` with later rows winning a slot, in row order."""
        written: dict[int, int] = {}
        for row, y in enumerate(labels.tolist()):
            slot = self.step(int(y))
            if slot is not None:
                written.pop(slot, None)
                written[slot] = row
        pairs = sorted(written.items(), key=lambda p: p[1])
        return (torch.tensor([p[0] for p in pairs], dtype=torch.int64),
                torch.tensor([p[1] for p in pairs], dtype=torch.int64))



# ---------------------------------------------------------------------------------------------
# importance
# ---------------------------------------------------------------------------------------------


def accumulate_(acc: list[torch.Tensor], grads: list[torch.Tensor], scale: float = 1.0,
                mode: str = "sq") -> None:
    """``acc[t] += (g[t] * g[t]) * scale`` (``"sq"``) or ``|g[t]| * scale`` (``"abs"``), in place.

    float32 accumulators; the products are rounded in this order, which the kernels copy.
    """
    for a, g in zip(acc, grads, strict=True):
        g = g.to(torch.float32)
        a.add_((g * g if mode == "sq" else g.abs()) * scale)


def ssd_dampen_(params: list[torch.Tensor], imp_full: list[torch.Tensor],
                imp_forget: list[torch.Tensor], alpha: float, lam: float) -> torch.Tensor:
    """SSD dampening (Foster et al., AAAI 2024), one vectorised pass per tensor, in place.

    Where ``imp_forget > alpha * imp_full``: ``theta *= min(lam * imp_full / imp_forget, 1)``.
    float32 throughout, ``(lam * imp_full) / imp_forget`` in that order, as the official code.
    Returns the number of selected elements per tensor (int64, on the parameters' device).
    """
    counts = []
    for p, d, f in zip(params, imp_full, imp_forget, strict=True):
        sel = f > alpha * d
        beta = (lam * d).div_(f).clamp_(max=1.0)
        # Multiplying the unselected elements by exactly 1 leaves them bit-for-bit as they were;
        # torch.where keeps it free of host synchronisation (no boolean indexing) on CUDA.
        p.mul_(torch.where(sel, beta, 1.0))
        counts.append(sel.sum())
    if not counts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack(counts)



# ---------------------------------------------------------------------------------------------
# subspace
# ---------------------------------------------------------------------------------------------


def project_out_(grads: list[torch.Tensor], bases: list[torch.Tensor]) -> None:
    """``G <- G - (G U) U^T`` per layer: two thin matmuls, never the dense ``U U^T``."""
    for g, u in zip(grads, bases):
        if u.shape[1] and g.numel():
            g.sub_((g @ u) @ u.T)


def project_out_flat_(g: torch.Tensor, vectors: torch.Tensor) -> None:
    """``g <- g - V^T (V g)`` for orthonormal rows ``V`` (rank, n)."""
    if vectors.shape[0] and g.numel():
        g.sub_(vectors.T @ (vectors @ g))


def orthonormalize(vectors: torch.Tensor, tol: float) -> tuple[torch.Tensor, list[int]]:
    """Gram-Schmidt twice over the rows (float64 dots); drops rows whose residual <= tol * norm."""
    v64 = vectors.to(torch.float64)
    kept: list[int] = []
    out: list[torch.Tensor] = []
    for i in range(v64.shape[0]):
        v = v64[i].clone()
        n0 = torch.linalg.vector_norm(v)
        for _ in range(2):
            for q in out:
                v -= (v @ q) * q
        n = torch.linalg.vector_norm(v)
        if n == 0 or n <= tol * n0:
            continue
        out.append(v / n)
        kept.append(i)
    res = torch.stack(out) if out else v64.new_zeros((0, v64.shape[1]))
    return res.to(vectors.dtype), kept


def subspace_count(lam: torch.Tensor, total: float, res: float, old_rank: int, threshold: float,
                   criterion: str, count: str, ratio: float | None) -> int:
    """How many of the descending energies ``lam`` a criterion adds (see ``extend_basis``)."""
    lam = lam.to(torch.float64)
    avail = int((lam > 0).sum())
    if criterion == "energy":
        if old_rank == 0 and count == "official":
            # GPM's first task: sum(cumsum(sigma^2)/total < threshold).
            k = int((torch.cumsum(lam, 0) / total < threshold).sum())
        else:
            acc = (total - res) / total + torch.cat([lam.new_zeros(1), torch.cumsum(lam, 0)[:-1]]) / total
            # add direction j while the energy captured before it is still below threshold
            below = (acc < threshold).to(torch.int64)
            k = int(torch.cumprod(below, 0).sum())
    else:
        r_bar = ratio if ratio is not None else (res / total) ** 0.5
        eps_p = (r_bar - (1.0 - threshold)) / r_bar if r_bar > 0 else -1.0
        over = torch.cumsum(lam, 0) / res > eps_p
        k = int(torch.nonzero(over)[0, 0]) + 1 if bool(over.any()) else len(lam)
        k = max(k, 1)
    return min(k, avail)


def extend_basis(basis: torch.Tensor, reps: torch.Tensor, threshold: float, *, criterion: str = "energy",
                 count: str = "official", ratio: float | None = None) -> torch.Tensor:
    """Grow ``basis`` (dim, rank) from ``reps`` (dim, n): residual, SVD, criterion, re-orthonormalise.

    Computed in float64 with one SVD of the residual (GPM's code takes two, the second only for
    the total energy, which is ``||A||_F^2``). New columns are made orthonormal to the old ones
    by projecting twice and a QR; the old columns come back unchanged.
    """
    d, r0 = basis.shape
    if r0 >= d or reps.shape[1] == 0:
        return basis.clone()
    u = basis.to(torch.float64)
    a = reps.to(torch.float64)
    res = a - u @ (u.T @ a) if r0 else a
    total = float((a * a).sum())
    res_e = float((res * res).sum())
    if total == 0 or res_e <= total * 1e-12:
        return basis.clone()
    left, sig, _ = torch.linalg.svd(res, full_matrices=False)
    lam = sig * sig
    m = min(res.shape)
    lam = torch.where(lam > lam.max() * m * torch.finfo(torch.float32).eps, lam, torch.zeros_like(lam))
    k = min(subspace_count(lam, total, res_e, r0, threshold, criterion, count, ratio), d - r0)
    if k == 0:
        return basis.clone()
    w = left[:, :k]
    for _ in range(2):
        if r0:
            w = w - u @ (u.T @ w)
    q, _ = torch.linalg.qr(w)
    return torch.cat([basis, q.to(basis.dtype)], dim=1)


# ---------------------------------------------------------------------------------------------
# kvscore
# ---------------------------------------------------------------------------------------------


def kv_accumulate_(scores: torch.Tensor, attn: torch.Tensor, alpha: float, group: int = 1, *,
                   renorm: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
    """S <- alpha^q S + sum_i alpha^(q-1-i) A_i in place (float32), GQA groups summed.

    ``scores`` (B, H, T) float32; ``attn`` (B, H*group, q, T). ``renorm`` divides each query
    head's row by its sum over the ``valid`` slots (A2SF's lm-eval rule); invalid slots get
    nothing. ``alpha == 0`` keeps +inf entries (the "evicted" sentinel) and zeroes the rest.
    """
    b, h, t = scores.shape
    q = attn.shape[2]
    a = attn.to(torch.float32).reshape(b, h, group, q, t)
    if valid is not None:
        a = a * valid[:, :, None, None, :]
    if renorm:
        total = a.sum(-1, keepdim=True)
        # a / total even for subnormal totals (a clamp would shrink such rows below summing to 1)
        a = torch.where(total > 0, a / total, torch.zeros_like(a))
    rows = a.sum(2)  # (B, H, q, T)
    if q == 0:
        return scores
    if alpha == 0.0:
        scores.masked_fill_(torch.isfinite(scores), 0.0)
        scores.add_(rows[:, :, -1])
        return scores
    w = alpha ** torch.arange(q - 1, -1, -1, dtype=torch.float64, device=scores.device)
    scores.mul_(alpha ** q).add_((rows * w.to(torch.float32)[:, None]).sum(2))
    return scores


def kv_rows_needed(alpha: float, tol: float, q_len: int) -> int:
    """Newest query rows that can move alpha-weighted scores by more than ``tol``: the smallest W
    with alpha^W / (1 - alpha) <= tol (``q_len`` for alpha = 1 or tol = 0; 1 for alpha = 0)."""
    if alpha >= 1.0 or tol <= 0.0:
        return q_len
    if alpha <= 0.0:
        return min(q_len, 1)
    w = math.ceil(math.log(tol * (1.0 - alpha)) / math.log(alpha))
    return min(max(w, 1), q_len)


def kv_attention_scores_(scores: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, scaling: float,
                         alpha: float, key_pos: torch.Tensor, key_valid: torch.Tensor, query_pos: torch.Tensor,
                         query_valid: torch.Tensor, tol: float = 0.0, block: int = 256) -> torch.Tensor:
    """S <- alpha^Lq S + sum_i alpha^(Lq-1-i) sum_g softmax(scaling q_gi . K) in place, blocked over
    query rows (never the Lq x S matrix), float32; the newest :func:`kv_rows_needed` rows only.

    Query row i sees slot j when ``key_valid[j]`` and ``key_pos[j] <= query_pos[i]``; rows with
    ``query_valid`` false, or that see nothing, add nothing.
    """
    b, hq, lq, d = query.shape
    hkv, s = keys.shape[1], keys.shape[2]
    g = hq // hkv
    acc = torch.zeros(b, hkv, s, dtype=torch.float32, device=scores.device)
    first = lq - kv_rows_needed(alpha, tol, lq)
    qg = query.float().reshape(b, hkv, g, lq, d)
    kt = keys.float().transpose(-1, -2)[:, :, None]                      # (B, Hkv, 1, D, S)
    for i0 in range(first, lq, block):
        i1 = min(lq, i0 + block)
        logits = torch.matmul(qg[:, :, :, i0:i1], kt) * scaling            # (B, Hkv, g, r, S)
        vis = key_valid[:, :, None, :] & (key_pos[:, :, None, :] <= query_pos[:, None, i0:i1, None])
        logits = logits.masked_fill(~vis[:, :, None], float("-inf"))
        p = torch.softmax(logits, -1).nan_to_num(0.0) * query_valid[:, None, None, i0:i1, None]
        exps = torch.arange(lq - 1 - i0, lq - 1 - i1, -1, dtype=torch.float64, device=scores.device)
        w = (exps == 0).double() if alpha == 0.0 else alpha ** exps
        acc += (p * w.to(torch.float32)[:, None]).sum((2, 3))
    if alpha == 0.0:
        scores.masked_fill_(torch.isfinite(scores), 0.0)
    else:
        scores.mul_(alpha ** lq)
    return scores.add_(acc)


def _kv_tiers(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
              n_sink: int, n_recent: int) -> torch.Tensor:
    """0 = invalid, 1 = candidate, 2 = protected (first n_sink / last n_recent valid positions)."""
    big = torch.iinfo(torch.int64).max
    asc = torch.where(valid, positions, torch.full_like(positions, big)).argsort(dim=-1, stable=True)
    rank_asc = torch.empty_like(asc).scatter_(-1, asc, torch.arange(asc.shape[-1], device=asc.device).expand_as(asc))
    n_valid = valid.sum(-1, keepdim=True)
    ns = torch.clamp(n_valid, max=n_sink)
    nr = torch.minimum(n_valid - ns, torch.full_like(n_valid, n_recent))
    sink = valid & (rank_asc < ns)
    recent = valid & (rank_asc >= n_valid - nr)
    return valid.long() + (sink | recent).long()


def kv_select_keep(scores: torch.Tensor, budget: int, n_sink: int = 0, n_recent: int = 0,
                   positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Slots to keep per (batch, kv-head), ascending: int64 (B, H, budget).

    Sinks (first ``n_sink`` valid positions) and recent tokens (``n_recent`` highest valid
    positions) first, then the highest scores (ties: the later position), then, where a row
    has fewer valid slots than ``budget``, its lowest invalid slots.
    """
    b, h, t = scores.shape
    if positions is None:
        positions = torch.arange(t, device=scores.device).expand(b, h, t)
    if valid is None:
        valid = torch.ones(b, h, t, dtype=torch.bool, device=scores.device)
    tier = _kv_tiers(scores, positions, valid, n_sink, n_recent)
    slot = torch.arange(t, device=scores.device).expand(b, h, t)
    k3 = torch.where(tier == 0, -slot, positions)          # invalid: lowest slot first
    order = k3.argsort(dim=-1, descending=True, stable=True)
    k2 = torch.where(tier == 1, scores, torch.zeros_like(scores)).gather(-1, order)
    order = order.gather(-1, k2.argsort(dim=-1, descending=True, stable=True))
    order = order.gather(-1, tier.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    return order[..., :budget].sort(-1).values


def kv_evict_one(scores: torch.Tensor, n_sink: int = 0, n_recent: int = 0,
                 positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per (batch, kv-head) the lowest-scoring evictable slot (ties: the older token), or -1."""
    b, h, t = scores.shape
    if positions is None:
        positions = torch.arange(t, device=scores.device).expand(b, h, t)
    if valid is None:
        valid = torch.ones(b, h, t, dtype=torch.bool, device=scores.device)
    if t == 0:
        return torch.full((b, h), -1, dtype=torch.int64, device=scores.device)
    cand = _kv_tiers(scores, positions, valid, n_sink, n_recent) == 1
    order = positions.argsort(dim=-1, stable=True)
    s = torch.where(cand, scores, torch.full_like(scores, float("inf"))).gather(-1, order)
    order = order.gather(-1, s.argsort(dim=-1, stable=True))
    order = order.gather(-1, (~cand.gather(-1, order)).long().argsort(dim=-1, stable=True))
    first = order[..., 0]
    return torch.where(cand.any(-1), first, torch.full_like(first, -1))



# ---------------------------------------------------------------------------------------------
# spectral
# ---------------------------------------------------------------------------------------------

# Singular values in float64 (the spec's pitfall: a bf16/float32 SVD is unreliable for kappa),
# matrices of one shape batched into one call; >= 3-D tensors are read as (out, in*k*k).


_INF = float("inf")


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    rest = 1
    for d in w.shape[1:]:
        rest *= d
    return w.detach().reshape(w.shape[0], rest)


def singular_values(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values, descending, float64, of every matrix (on its own device)."""
    mats = [_as_matrix(w) for w in matrices]
    out: list[torch.Tensor | None] = [None] * len(mats)
    groups: dict[tuple[int, int, torch.device], list[int]] = {}
    for i, w in enumerate(mats):
        groups.setdefault((w.shape[0], w.shape[1], w.device), []).append(i)
    for (m, n, dev), idx in groups.items():
        if m == 0 or n == 0:
            for i in idx:
                out[i] = torch.zeros(0, dtype=torch.float64, device=dev)
            continue
        s = torch.linalg.svdvals(torch.stack([mats[i] for i in idx]).to(torch.float64))
        for j, i in enumerate(idx):
            out[i] = s[j]
    return [s for s in out if s is not None]


def kappa_from_singular_values(s: torch.Tensor, shape: tuple[int, int], resolution: float | None = None) -> float:
    """sigma_max / sigma_min; inf when sigma_min <= resolution * sigma_max.

    The default resolution, max(m, n) * eps(float64), is the rounding noise of a float64 SVD:
    a smaller sigma_min carries no information (the matrix is singular to working precision).
    """
    if s.numel() == 0:
        return _INF
    res = max(shape) * torch.finfo(torch.float64).eps if resolution is None else resolution
    smax, smin = float(s[0]), float(s[-1])
    return _INF if smax <= 0.0 or smin <= smax * res else smax / smin


def kappa(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Condition number of every matrix, float64 on the CPU (inf when singular, see above)."""
    svs = singular_values(matrices)
    shapes = [_as_matrix(w).shape for w in matrices]
    return torch.tensor([kappa_from_singular_values(s, (m, n)) for s, (m, n) in zip(svs, shapes)],
                        dtype=torch.float64)


def spectral_norm(matrices: list[torch.Tensor], tol: float = 1e-6, max_iter: int = 100,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Power iteration on W^T W per matrix: (estimates, iterations, converged), float64 math.

    Same stopping rule as the Rust kernel: successive estimates ||W v|| within ``tol`` relative.
    """
    g = torch.Generator().manual_seed(int(seed))
    vals, iters, conv = [], [], []
    for w in matrices:
        a = _as_matrix(w).to(torch.float64)
        v = (torch.rand(a.shape[1], generator=g, dtype=torch.float64) - 0.5).to(a.device)
        v = v / v.norm()
        prev, est, done, it = 0.0, 0.0, False, 0
        for it in range(1, max_iter + 1):
            u = a @ v
            est = float(u.norm())
            wv = a.T @ u
            nw = float(wv.norm())
            if nw == 0.0:
                done = est == 0.0
                break
            if it > 1 and abs(est - prev) <= tol * est:
                done = True
                break
            prev = est
            v = wv / nw
        else:
            est = prev
        vals.append(est)
        iters.append(it)
        conv.append(done)
    return (torch.tensor(vals, dtype=torch.float64), torch.tensor(iters, dtype=torch.int64),
            torch.tensor(conv, dtype=torch.bool))
