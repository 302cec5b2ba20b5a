"""The replay family: reservoir (Algorithm R), class-balancing reservoir (CBRS), power-law rehearsal.

The Rust kernels are checked against ``forgetcore.reference`` draw for draw: the reference
reproduces the buffers' xoshiro256++ stream in Python integers, so every slot decision, every
sample and every stored byte must agree exactly. Distributional claims (inclusion probability
capacity/seen) are checked by a seeded chi-square test whose power is checked too.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from forgetcore import _core, datasets, reference
from forgetcore.replay import ClassBalancedReservoir, PowerLawScheduler, ReservoirBuffer

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def roundtrip(sd):
    """Save and load the way a checkpoint does, refusing anything but tensors and plain types."""
    f = io.BytesIO()
    torch.save(sd, f)
    f.seek(0)
    return torch.load(f, weights_only=True)


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(
            (a.view(torch.uint8) == b.view(torch.uint8)).all() if a.numel() else True)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bitwise view (NaN == NaN, -0.0 != 0.0), so stored bytes are compared exactly."""
    return t.contiguous().view(torch.uint8)


def batch_of(n: int, start: int, shape=(3,), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + start)
    x = (torch.randn((n, *shape), generator=g) * 1e3).to(dtype) if dtype.is_floating_point or dtype.is_complex \
        else torch.randint(-100, 100, (n, *shape), generator=g).to(dtype)
    return {"x": x, "id": torch.arange(start, start + n, dtype=torch.int64)}


# ---------------------------------------------------------------------------------------------
# the random stream
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5, 2**64 - 1])
def test_rust_generator_matches_reference_stream(seed):
    ours, ref = _core.ReplayRng(seed), reference.Xoshiro256pp(seed)
    assert ours.next_u64(50).tolist() == [ref.next_u64() for _ in range(50)]
    bounds = np.array([1, 2, 3, 7, 10**9, 2**40 + 3, 2**62 + 1, 2**63 - 1] * 20, dtype=np.int64)
    assert ours.below(bounds).tolist() == [ref.below(int(b)) for b in bounds]
    assert ours.get_state() == [w - 2**64 if w >= 2**63 else w for w in ref.s]


# ---------------------------------------------------------------------------------------------
# ReservoirBuffer against the reference
# ---------------------------------------------------------------------------------------------


@given(capacity=st.integers(1, 40), seed=st.integers(0, 2**64 - 1),
       sizes=st.lists(st.integers(0, 60), min_size=1, max_size=8),
       shape=st.sampled_from([(), (3,), (2, 5), (0,)]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool,
                              torch.complex64, torch.float64]),
       n_sample=st.integers(0, 40))
def test_reservoir_matches_reference_draw_for_draw(capacity, seed, sizes, shape, dtype, n_sample):
    buf = ReservoirBuffer(capacity, seed=seed)
    rng = reference.Xoshiro256pp(seed)
    store: dict[str, torch.Tensor] = {}
    seen = 0
    for n in sizes:
        b = batch_of(n, seen, shape, dtype, seed % 1000)
        if dtype is torch.bool:
            b["x"] = b["x"] > 0
        slots, rows = buf.add(return_rows=True, **b)
        draws = reference.reservoir_draws(rng, seen, capacity, n)
        want_slots, want_rows = reference.reservoir_slots(seen, capacity, draws)
        assert torch.equal(slots, want_slots) and torch.equal(rows, want_rows)
        if n:
            if not store:
                store = {k: torch.zeros((capacity, *v.shape[1:]), dtype=v.dtype) for k, v in b.items()}
            for k, v in b.items():
                reference.scatter_rows_(store[k], v, want_slots, want_rows)
        seen += n
    assert buf.seen == seen and len(buf) == min(seen, capacity)
    for k, v in buf.data().items():
        assert torch.equal(bits(v), bits(store[k][:len(buf)]))
    n_sample = min(n_sample, len(buf))
    got = buf.sample(n_sample, return_index=True)
    want = reference.sample_indices(rng, len(buf), n_sample)
    assert torch.equal(got["index"], want)
    if store:
        assert torch.equal(bits(got["x"]), bits(store["x"][want]))


def test_one_batched_call_equals_the_sequential_algorithm():
    stream = batch_of(500, 0, (4,))
    batched = ReservoirBuffer(37, seed=9)
    for i in range(0, 500, 64):
        batched.add(x=stream["x"][i:i + 64], id=stream["id"][i:i + 64])
    single = ReservoirBuffer(37, seed=9)
    for i in range(500):
        single.add(x=stream["x"][i:i + 1], id=stream["id"][i:i + 1])
    assert same_state(batched.state_dict(), single.state_dict())
    # The same result from the textbook loop on the same draws.
    rng = reference.Xoshiro256pp(9)
    held = list(range(37))
    for t in range(37, 500):
        r = rng.below(t + 1)
        if r < 37:
            held[r] = t
    assert batched.data()["id"].tolist() == held


@pytest.mark.parametrize("cls", [ReservoirBuffer, ClassBalancedReservoir])
def test_ranks_with_one_seed_make_the_same_decisions(cls):
    # Two "ranks" with different data but the same seed, batch sizes (and labels, for CBRS)
    # choose the same slots and draw the same samples: what a replicated DDP buffer relies on.
    a, b = cls(20, seed=11), cls(20, seed=11)
    for i in range(12):
        y = torch.arange(i * 9, i * 9 + 9) % 4
        sa = a.add(x=torch.randn(9, 3), y=y)
        sb = b.add(x=torch.randn(9, 3) + 100, y=y)
        assert torch.equal(sa, sb)
    assert torch.equal(a.sample(10, return_index=True)["index"], b.sample(10, return_index=True)["index"])


def test_within_batch_collision_keeps_the_later_item():
    # capacity 1: every item after the first replaces slot 0 with probability 1/(t+1); whatever
    # happens, the stored item is the last one of the batch that drew slot 0.
    for seed in range(50):
        buf = ReservoirBuffer(1, seed=seed)
        slots, rows = buf.add(return_rows=True, id=torch.arange(20))
        assert slots.tolist() == [0] and len(rows) == 1
        assert buf.data()["id"].tolist() == rows.tolist()


def inclusion_statistic(counts: np.ndarray, runs: int, capacity: int) -> float:
    """Chi-square statistic of per-item inclusion counts for a uniform sample of ``capacity`` out
    of ``N``: the indicators have variance p(1-p) and covariance -p(1-p)/(N-1), so
    sum (O - E)^2 / (runs p (1-p) N/(N-1)) follows chi-square with N-1 degrees of freedom."""
    n = len(counts)
    p = capacity / n
    return float(((counts - runs * p) ** 2).sum() / (runs * p * (1 - p) * n / (n - 1)))


def _biased_inclusion(runs: int, n: int, capacity: int, batch: int, bug: str) -> np.ndarray:
    """Inclusion counts of two classic wrong implementations: ``off-by-one`` draws r in [0, t)
    instead of [0, t]; ``batch-start`` uses the batch's first position for all its items."""
    rng = np.random.default_rng(0)
    counts = np.zeros(n)
    for _ in range(runs):
        held = list(range(capacity))
        for t in range(capacity, n):
            top = t if bug == "off-by-one" else max(t - t % batch, capacity - 1) + 1
            r = rng.integers(0, top)
            if r < capacity:
                held[r] = t
        counts[held] += 1
    return counts


def test_every_item_is_kept_with_probability_capacity_over_seen():
    # 3,000 seeded runs of a 24-item stream in batches of 5 into 8 slots; significance 0.001.
    runs, n, capacity, batch = 3000, 24, 8, 5
    threshold = stats.chi2.ppf(0.999, n - 1)
    counts = np.zeros(n)
    ids = torch.arange(n)
    for seed in range(runs):
        buf = ReservoirBuffer(capacity, seed=seed)
        for i in range(0, n, batch):
            buf.add(id=ids[i:i + batch])
        counts[buf.data()["id"].numpy()] += 1
    assert counts.sum() == runs * capacity
    assert inclusion_statistic(counts, runs, capacity) < threshold
    # Power: the same test rejects the two classic mistakes, by a wide margin.
    for bug in ("off-by-one", "batch-start"):
        assert inclusion_statistic(_biased_inclusion(runs, n, capacity, batch, bug), runs, capacity) > 2 * threshold


# ---------------------------------------------------------------------------------------------
# ClassBalancedReservoir
# ---------------------------------------------------------------------------------------------

labels_strategy = st.lists(st.sampled_from([0, 1, 2, 3, -7, 2**62, -(2**62)]), min_size=0, max_size=120)


@given(capacity=st.integers(1, 25), seed=st.integers(0, 2**64 - 1), labels=labels_strategy,
       cut=st.integers(1, 40), n_sample=st.integers(0, 25))
def test_cbrs_matches_reference_draw_for_draw(capacity, seed, labels, cut, n_sample):
    buf = ClassBalancedReservoir(capacity, seed=seed)
    rng = reference.Xoshiro256pp(seed)
    ref = reference.CbrsReference(capacity, rng)
    y = torch.tensor(labels, dtype=torch.int64)
    x = torch.randn(len(labels), 2)
    for i in range(0, max(len(labels), 1), cut):
        slots, rows = buf.add(return_rows=True, x=x[i:i + cut], y=y[i:i + cut])
        want_slots, want_rows = ref.add(y[i:i + cut])
        assert slots.tolist() == want_slots.tolist() and rows.tolist() == want_rows.tolist()
    assert buf.seen == ref.seen == len(labels)
    assert buf.data().get("y", torch.empty(0)).tolist() == ref.slot_label
    assert buf.class_counts() == {k: len(v) for k, v in ref.slots.items()}
    assert sorted(buf.full_classes()) == sorted(ref.full)
    n_sample = min(n_sample, len(buf))
    assert buf.sample(n_sample, return_index=True)["index"].tolist() == \
        reference.sample_indices(rng, len(buf), n_sample).tolist()


def test_cbrs_keeps_minority_classes_whole_and_balances_the_rest():
    # 1,000 items: class 0 is 90 %, classes 1 and 2 share the rest; memory of 60.
    g = torch.Generator().manual_seed(0)
    y = torch.where(torch.rand(1000, generator=g) < 0.9, 0, torch.randint(1, 3, (1000,), generator=g))
    buf = ClassBalancedReservoir(60, seed=1)
    for i in range(0, 1000, 32):
        buf.add(y=y[i:i + 32])
    assert torch.bincount(y).tolist() == [888, 43, 69]
    # Reservoir sampling would keep about 53 / 3 / 4; CBRS ends with the balanced split.
    assert buf.class_counts() == {0: 20, 1: 20, 2: 20}
    assert sorted(buf.full_classes()) == [0, 1, 2]
    # While a class is not full it loses nothing: stop the stream early and class 1 has all of its items.
    early = ClassBalancedReservoir(60, seed=1)
    early.add(y=y[:300])
    n1 = int((y[:300] == 1).sum())
    assert early.class_counts()[1] == n1 < 20


def test_cbrs_single_class_is_a_uniform_reservoir():
    # With one class, CBRS is its class's reservoir: inclusion probability capacity/seen again.
    runs, n, capacity = 2000, 40, 8
    counts = np.zeros(n)
    ids = torch.arange(n)
    ones = torch.zeros(n, dtype=torch.int64)
    for seed in range(runs):
        buf = ClassBalancedReservoir(capacity, seed=seed)
        for i in range(0, n, 5):
            buf.add(id=ids[i:i + 5], y=ones[i:i + 5])
        counts[buf.data()["id"].numpy()] += 1
    assert inclusion_statistic(counts, runs, capacity) < stats.chi2.ppf(0.999, n - 1)


def _fit_and_score(x, y, x_test, y_test, steps=300):
    """Softmax regression trained on the buffer only; balanced accuracy on a balanced test set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: worker threads only add contention on a shared CI box
    try:
        w = torch.zeros(x.shape[1], 10, requires_grad=True)
        b = torch.zeros(10, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(x @ w + b, y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    pred = (x_test @ w + b).argmax(1)
    return float(torch.stack([(pred[y_test == c] == c).float().mean() for c in range(10)]).mean())


def test_claim_cbrs_memory_beats_reservoir_memory_on_an_imbalanced_stream():
    """Chrysakis and Moens (2020): under class imbalance a reservoir memory mirrors the stream,
    starving minority classes; CBRS keeps them, so a learner trained from memory does better on
    the minority classes. In miniature on real digits (sklearn's 1,797 8x8 images): class c keeps
    a fraction 0.6**c of its training images, memory of 100; a softmax regression trained on the
    memory alone gains at least 8 points of balanced test accuracy (mean over 3 seeds)."""
    x, y = datasets.load("digits")
    x = x.flatten(1)
    train, _, test = datasets.stratified_split(y, [0.7, 0.0, 0.3], seed=0)
    keep = torch.cat([train[y[train] == c][: max(2, int(len(train[y[train] == c]) * 0.6**c))] for c in range(10)])
    gaps = []
    for seed in range(3):
        order = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))]
        res, cb = ReservoirBuffer(100, seed=seed), ClassBalancedReservoir(100, seed=seed)
        for i in range(0, len(order), 10):
            res.add(x=x[order[i:i + 10]], y=y[order[i:i + 10]])
            cb.add(x=x[order[i:i + 10]], y=y[order[i:i + 10]])
        acc_res = _fit_and_score(**{"x": res.data()["x"], "y": res.data()["y"]}, x_test=x[test], y_test=y[test])
        acc_cb = _fit_and_score(**{"x": cb.data()["x"], "y": cb.data()["y"]}, x_test=x[test], y_test=y[test])
        gaps.append(acc_cb - acc_res)
    assert sum(gaps) / len(gaps) >= 0.08, gaps


# ---------------------------------------------------------------------------------------------
# state: save, resume, continue bit-identically
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ReservoirBuffer, ClassBalancedReservoir])
def test_resume_continues_bit_identically(cls):
    stream = batch_of(600, 0, (3, 2))
    stream["y"] = (stream["id"] * 7919 % 11) % 5
    batches = [{k: v[i:i + 40] for k, v in stream.items()} for i in range(0, 600, 40)]

    def run(buf, bs):
        out = []
        for b in bs:
            out.append(buf.add(return_rows=True, **b))
            out.append(buf.sample(min(7, len(buf)), return_index=True))
        return out

    straight = cls(50, seed=3)
    first = run(straight, batches[:7])
    sd = roundtrip(straight.state_dict())
    rest = run(straight, batches[7:])

    resumed = cls(50, seed=123)  # the saved stream replaces the constructor's seed
    resumed.load_state_dict(sd)
    assert same_state(resumed.state_dict(), sd)
    assert same_state(run(resumed, batches[7:]), rest)
    assert same_state(resumed.state_dict(), straight.state_dict())
    assert first  # the first half ran


@pytest.mark.parametrize("cls", [ReservoirBuffer, ClassBalancedReservoir])
def test_empty_state_round_trip(cls):
    a = cls(5, seed=1)
    b = cls(5, seed=2)
    b.load_state_dict(roundtrip(a.state_dict()))
    assert b.fields == () and len(b) == 0
    x, y = torch.randn(9, 2), torch.arange(9) % 3
    assert same_state(a.add(x=x, y=y), b.add(x=x, y=y))


def test_scheduler_resume_continues_bit_identically():
    s = PowerLawScheduler(50, reset_on_rehearsal=True, seed=4)
    sizes = [30, 5, 60, 44, 8, 19]
    outs = []
    for t in range(3):
        c = s.step()
        outs.append(s.sample_indices(c, sizes[:t]))
    sd = roundtrip(s.state_dict())
    tail = []
    for t in range(3, 6):
        c = s.step()
        tail.append((c, s.sample_indices(c, sizes[:t])))
    r = PowerLawScheduler(50, reset_on_rehearsal=True, seed=4)
    r.load_state_dict(sd)
    for t in range(3, 6):
        c = r.step()
        assert same_state((c, r.sample_indices(c, sizes[:t])), tail[t - 3])
    with pytest.raises(ValueError, match=r"^state_dict\[.config.\]: expected the configuration"):
        PowerLawScheduler(51, reset_on_rehearsal=True).load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# dtypes, layouts, devices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                   torch.uint8, torch.int32, torch.bool, torch.complex64])
def test_any_dtype_is_stored_bit_exactly(dtype):
    x = torch.tensor([math.nan, -0.0, math.inf, -math.inf, 3.4e38, 1e-45, 1.0, -2.5])
    x = x.to(dtype) if dtype.is_floating_point or dtype.is_complex else torch.arange(8).to(dtype)
    x = x.view(8, 1).expand(8, 3).contiguous()
    buf = ReservoirBuffer(6, seed=0)
    slots, rows = buf.add(return_rows=True, v=x)
    want = torch.zeros((6, 3), dtype=dtype)
    reference.scatter_rows_(want, x, slots, rows)
    assert torch.equal(bits(buf.data()["v"]), bits(want))


def test_non_contiguous_grad_and_aliased_inputs():
    buf = ReservoirBuffer(8, seed=2)
    w = torch.randn(6, 4, requires_grad=True)
    buf.add(x=(w * 2)[:, ::2], id=torch.arange(6))  # non-contiguous, part of a graph
    assert not buf.data()["x"].requires_grad
    assert torch.equal(buf.data()["x"][:6], (w * 2)[:, ::2].detach())
    # Re-adding stored rows (views of the buffer's own storage) behaves as adding a copy.
    twin = ReservoirBuffer(8, seed=2)
    twin.load_state_dict(buf.state_dict())
    again = buf.get(slice(0, 5))
    buf.add(**again)
    twin.add(**{k: v.clone() for k, v in again.items()})
    assert same_state(buf.state_dict(), twin.state_dict())


def test_large_batch_uses_the_parallel_copy_and_matches_reference():
    x = torch.randn(3000, 256)  # 3 MB: above the parallel threshold
    buf = ReservoirBuffer(2000, seed=5)
    slots, rows = buf.add(return_rows=True, x=x)
    want = torch.zeros(2000, 256)
    reference.scatter_rows_(want, x, slots, rows)
    assert torch.equal(buf.data()["x"], want)


def test_reference_backend_gives_the_same_buffer(monkeypatch):
    # The backend is chosen when storage is allocated (the first add).
    stream = batch_of(300, 0, (5,))
    batches = [{k: v[i:i + 32] for k, v in stream.items()} for i in range(0, 300, 32)]
    rust, ref = ReservoirBuffer(40, seed=8), ReservoirBuffer(40, seed=8)
    rust.add(**batches[0])
    monkeypatch.setenv("FORGETCORE_BACKEND", "reference")
    ref.add(**batches[0])
    for b in batches[1:]:
        assert torch.equal(rust.add(**b), ref.add(**b))
    assert not ref._rust_copy and rust._rust_copy
    assert same_state(rust.state_dict(), ref.state_dict())


def test_sample_with_a_generator_leaves_the_buffer_stream_alone():
    buf = ReservoirBuffer(30, seed=1)
    buf.add(id=torch.arange(100))
    before = buf.state_dict()
    a = buf.sample(10, generator=torch.Generator().manual_seed(3), return_index=True)
    b = buf.sample(10, generator=torch.Generator().manual_seed(3), return_index=True)
    assert torch.equal(a["index"], b["index"]) and len(set(a["index"].tolist())) == 10
    assert torch.equal(a["id"], buf.data()["id"][a["index"]])
    assert same_state(buf.state_dict(), before)
    assert buf.sample(0)["id"].shape == (0,)
    assert sorted(buf.sample(30)["id"].tolist()) == sorted(buf.data()["id"].tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [ReservoirBuffer, ClassBalancedReservoir])
def test_cuda_storage_matches_cpu(cls):
    stream = batch_of(400, 0, (3, 4))
    stream["y"] = stream["id"] % 7
    cpu, gpu = cls(50, seed=6), cls(50, seed=6, device="cuda")
    for i in range(0, 400, 32):
        b = {k: v[i:i + 32] for k, v in stream.items()}
        assert torch.equal(cpu.add(**b), gpu.add(**{k: v.cuda() for k, v in b.items()}).cpu())
    for k, v in cpu.data().items():
        assert torch.equal(v, gpu.data()[k].cpu())
    assert torch.equal(cpu.sample(20)["x"], gpu.sample(20)["x"].cpu())
    with pytest.raises(ValueError, match="^x: expected a tensor on cuda"):
        gpu.add(**{k: v[:4] for k, v in stream.items()})


# ---------------------------------------------------------------------------------------------
# PowerLawScheduler
# ---------------------------------------------------------------------------------------------


def test_power_law_weights_and_counts_by_hand():
    s = PowerLawScheduler(100)  # d = 1, c = 1: g(delta) = 1 / (delta + 1)
    assert s.step() == [] and s.step() == [100]
    # Phase 2: ages 2 and 1 -> weights 1/3 and 1/2 -> 40 / 60.
    assert torch.allclose(s.weights(), torch.tensor([1 / 3, 1 / 2], dtype=torch.float64))
    assert s.step() == [40, 60]
    # Phase 3: 1/4, 1/3, 1/2 -> quotas 23.08, 30.77, 46.15 -> floors 23, 30, 46, the spare one to 30.77.
    assert s.step() == [23, 31, 46]
    e = PowerLawScheduler(100, schedule="exponential")
    assert math.isclose(e.lam, math.log(2)) and math.isclose(float(e.g(1.0)), float(s.g(1.0)))
    b = PowerLawScheduler(10, variant="per_task", d=0.5, c=0.0)
    for _ in range(4):
        b.step()
    # ages 4, 3, 2, 1 -> 10 / sqrt(age), rounded half up: 5, 5.77, 7.07, 10.
    assert b.step() == [5, 6, 7, 10]


@given(budget=st.integers(0, 500), phases=st.integers(1, 14), d=st.floats(0, 3), c=st.floats(0, 4),
       schedule=st.sampled_from(["power", "exponential", "uniform"]), reset=st.booleans())
def test_total_budget_is_split_exactly(budget, phases, d, c, schedule, reset):
    lam = None if schedule != "exponential" else 0.3
    s = PowerLawScheduler(budget, schedule=schedule, c=c, d=d, lam=lam, reset_on_rehearsal=reset)
    for t in range(phases):
        w = s.weights()
        counts = s.step()
        assert len(counts) == t
        if t:
            assert sum(counts) == budget
            quota = budget * w / w.sum()
            assert all(math.floor(q) <= n <= math.floor(q) + 1 for q, n in zip(quota.tolist(), counts))


def test_reset_on_rehearsal_changes_ages():
    no, yes = PowerLawScheduler(3), PowerLawScheduler(3, reset_on_rehearsal=True)
    for _ in range(5):
        no.step()
        yes.step()
    # Without reset, ages count from each task's phase; with it, a rehearsed task is one phase old.
    assert no.last_seen == [0, 1, 2, 3, 4]
    assert yes.last_seen[-1] == 4 and yes.last_seen != no.last_seen
    assert all(s in (i, 4, 3, 2) for i, s in enumerate(yes.last_seen))


def test_power_law_keeps_more_old_rehearsal_than_exponential():
    # The schedules' defining difference: the power law's heavy tail rehearses the oldest task
    # far more than the exponential control at the same total budget.
    p, e = PowerLawScheduler(1000), PowerLawScheduler(1000, schedule="exponential")
    for _ in range(10):
        cp, ce = p.step(), e.step()
    assert cp[0] >= 5 * max(ce[0], 1)
    assert sum(cp) == sum(ce) == 1000


def test_area_matched_lambda():
    lam = PowerLawScheduler.area_matched_lambda(1.0, 1.0, 10)
    deltas = torch.arange(1, 11, dtype=torch.float64)
    assert math.isclose(float(torch.exp(-lam * deltas).sum()), float((1 / (deltas + 1)).sum()), rel_tol=1e-9)


def test_sample_indices_are_distinct_and_wrap_in_whole_passes():
    s = PowerLawScheduler(10, seed=1)
    a, b, z = s.sample_indices([5, 7, 0], [5, 3, 0])
    assert sorted(a.tolist()) == list(range(5))
    assert sorted(b.tolist()) == [0, 0, 1, 1, 2, 2, 2] or sorted(torch.bincount(b).tolist()) == [2, 2, 3]
    assert z.numel() == 0 and a.dtype == torch.int64
    t = PowerLawScheduler(10, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(t.sample_indices([5, 7, 0], [5, 3, 0]), [a, b, z]))


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, and nothing changed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,exc,msg", [
    (lambda: ReservoirBuffer(0), ValueError, "^capacity: expected an int >= 1, got 0"),
    (lambda: ReservoirBuffer(-3), ValueError, "^capacity"),
    (lambda: ReservoirBuffer(2.0), TypeError, "^capacity"),
    (lambda: ClassBalancedReservoir(0), ValueError, "^capacity"),
    (lambda: ReservoirBuffer(4, seed=-1), ValueError, "^seed"),
    (lambda: ReservoirBuffer(4, seed=2**64), ValueError, "^seed"),
    (lambda: ClassBalancedReservoir(4, label_key=3), TypeError, "^label_key"),
    (lambda: PowerLawScheduler(10, d=-1.0), ValueError, "^d: expected a number >= 0"),
    (lambda: PowerLawScheduler(10, d=math.inf), ValueError, "^d: expected a finite number"),
    (lambda: PowerLawScheduler(10, d=math.nan), ValueError, "^d: expected a finite number"),
    (lambda: PowerLawScheduler(10, c=-0.5), ValueError, "^c:"),
    (lambda: PowerLawScheduler(10, schedule="exponential", lam=math.nan), ValueError, "^lam:"),
    (lambda: PowerLawScheduler(10, schedule="exponential", c=0.0), ValueError, "^lam:"),
    (lambda: PowerLawScheduler(-1), ValueError, "^budget"),
    (lambda: PowerLawScheduler(10, schedule="zipf"), ValueError, "^schedule"),
    (lambda: PowerLawScheduler(10, variant="A"), ValueError, "^variant"),
    (lambda: PowerLawScheduler(10, reset_on_rehearsal=1), TypeError, "^reset_on_rehearsal"),
    (lambda: PowerLawScheduler(10).sample_indices([3], [0]), ValueError, r"^sizes\[0\]"),
    (lambda: PowerLawScheduler(10).sample_indices([3], [4, 5]), ValueError, "^sizes"),
    (lambda: PowerLawScheduler.area_matched_lambda(0.0, 0.0, 5), ValueError, "^d:"),
])
def test_bad_construction(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


def _filled(cls):
    buf = cls(6, seed=1)
    buf.add(x=torch.randn(9, 2, generator=torch.Generator().manual_seed(0)), y=torch.arange(9) % 3)
    return buf


BAD_ADDS = [
    (
        "different batch lengths",
        lambda: dict(x=torch.randn(4, 2), y=torch.arange(3)),
        ValueError,
        "^y: expected 4 rows like 'x'",
    ),
    ("missing field", lambda: dict(x=torch.randn(4, 2)), ValueError, "^y: missing from add"),
    (
        "extra field",
        lambda: dict(x=torch.randn(4, 2), y=torch.arange(4), z=torch.ones(4)),
        ValueError,
        "^z: not a field",
    ),
    ("shape", lambda: dict(x=torch.randn(4, 3), y=torch.arange(4)), ValueError, r"^x: expected shape \(\*, 2\)"),
    ("rank", lambda: dict(x=torch.randn(4, 2, 1), y=torch.arange(4)), ValueError, "^x: expected shape"),
    (
        "dtype",
        lambda: dict(x=torch.randn(4, 2, dtype=torch.float64), y=torch.arange(4)),
        TypeError,
        "^x: expected float32",
    ),
    ("label dtype", lambda: dict(x=torch.randn(4, 2), y=torch.arange(4).float()), TypeError, "^y: expected"),
    (
        "device",
        lambda: dict(x=torch.randn(4, 2, device="meta"), y=torch.arange(4)),
        ValueError,
        "^x: expected a tensor on cpu",
    ),
    ("not a tensor", lambda: dict(x=[[1.0, 2.0]], y=torch.arange(1)), TypeError, "^x: expected a torch.Tensor"),
    ("scalar", lambda: dict(x=torch.tensor(1.0), y=torch.arange(1)), ValueError, "^x: expected shape"),
]


@pytest.mark.parametrize("cls", [ReservoirBuffer, ClassBalancedReservoir])
@pytest.mark.parametrize("name,batch,exc,msg", BAD_ADDS, ids=[b[0] for b in BAD_ADDS])
def test_bad_add_raises_and_changes_nothing(cls, name, batch, exc, msg):
    buf = _filled(cls)
    before = buf.state_dict()
    with pytest.raises(exc, match=msg):
        buf.add(**batch())
    assert same_state(buf.state_dict(), before)
    # It still works afterwards, exactly like a twin that never saw the bad call.
    twin = _filled(cls)
    b = dict(x=torch.randn(5, 2), y=torch.arange(5) % 4)
    assert torch.equal(buf.add(**b), twin.add(**b))
    assert torch.equal(buf.sample(4)["x"], twin.sample(4)["x"])
    assert same_state(buf.state_dict(), twin.state_dict())


@pytest.mark.parametrize("batch,exc,msg", [
    (dict(x=torch.randn(4, 2), y=torch.arange(3)), ValueError, "^y: expected 4 rows"),
    (dict(x=torch.tensor(1.0), y=torch.arange(1)), ValueError, "^x: expected a batch"),
    (dict(x=torch.randn(3, 2), y=torch.randn(3)), TypeError, "^y: expected an integer tensor"),
    (dict(x=torch.randn(3, 2), y=torch.ones(3, dtype=torch.bool)), TypeError, "^y: expected an integer tensor"),
    (dict(x=torch.randn(3, 2), y=torch.zeros(3, 1, dtype=torch.int64)), ValueError, "^y: expected a 1-D tensor"),
    (dict(x=torch.randn(3, 2), z=torch.zeros(3, dtype=torch.int64)), ValueError, "^label_key: the labels field 'y'"),
    (dict(x=torch.randn(3, 2), index=torch.zeros(3)), ValueError, "^index: reserved"),
    (dict(), ValueError, "^fields: expected at least one"),
])
def test_bad_first_add_allocates_nothing(batch, exc, msg):
    buf = ClassBalancedReservoir(5)
    with pytest.raises(exc, match=msg):
        buf.add(**batch)
    assert buf.fields == () and len(buf) == 0 and buf.seen == 0 and buf.device is None


def test_bad_device_argument():
    with pytest.raises(ValueError, match="^device: expected a usable torch device"):
        ReservoirBuffer(4, device="nonsense")


def test_device_argument_is_enforced_on_the_first_add():
    buf = ReservoirBuffer(5, device="meta")
    with pytest.raises(ValueError, match="^x: expected a tensor on meta"):
        buf.add(x=torch.randn(3, 2))
    assert buf.fields == ()


@pytest.mark.parametrize("cls", [ReservoirBuffer, ClassBalancedReservoir])
def test_empty_batch_is_a_no_op(cls):
    buf = cls(4, seed=0)
    out = buf.add(x=torch.empty(0, 2), y=torch.empty(0, dtype=torch.int64))
    assert out.numel() == 0 and buf.fields == () and buf.seen == 0
    buf = _filled(cls)
    before = buf.state_dict()
    slots, rows = buf.add(return_rows=True, x=torch.empty(0, 2), y=torch.empty(0, dtype=torch.int64))
    assert slots.numel() == rows.numel() == 0
    assert same_state(buf.state_dict(), before)


@pytest.mark.parametrize("cls", [ReservoirBuffer, ClassBalancedReservoir])
def test_bad_sample_and_state(cls):
    buf = _filled(cls)
    before = buf.state_dict()
    with pytest.raises(ValueError, match=r"^n: expected at most len\(buffer\) = 6 items, got 7"):
        buf.sample(7)
    with pytest.raises(ValueError, match="^n"):
        buf.sample(-1)
    with pytest.raises(TypeError, match="^n"):
        buf.sample(2.0)
    with pytest.raises(TypeError, match="^generator"):
        buf.sample(2, generator=np.random.default_rng(0))
    assert cls(3).sample(0) == {}
    with pytest.raises(ValueError, match=r"^state_dict\['capacity'\]: expected 5"):
        cls(5).load_state_dict(before)
    bad = dict(before, rng=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="^rng"):
        buf.load_state_dict(bad)
    bad = dict(before, fields={k: v[:3] for k, v in before["fields"].items()})
    with pytest.raises(ValueError, match="^state_dict"):
        buf.load_state_dict(bad)
    with pytest.raises(ValueError, match="^state_dict"):
        buf.load_state_dict({**before, "type": "Other"})
    assert same_state(buf.state_dict(), before)


def test_bad_cbrs_state_is_refused():
    buf = _filled(ClassBalancedReservoir)
    sd = buf.state_dict()
    slots = sd["classes"]["slots"].clone()
    slots[0] = slots[1]
    with pytest.raises(ValueError, match="^state_dict"):
        buf.load_state_dict({**sd, "classes": {**sd["classes"], "slots": slots}})
    assert same_state(buf.state_dict(), sd)


# ---------------------------------------------------------------------------------------------
# issue 11: sizes before allocation, strict state, numerics (regressions)
# ---------------------------------------------------------------------------------------------


def test_power_law_huge_sample_is_refused_before_allocating():
    """Issue 11 item 2: this aborted the process (an 8 TiB allocation, SIGABRT), so it runs in a
    subprocess; now a ValueError naming counts[0] and the bytes."""
    import subprocess
    import sys

    code = ("from forgetcore.replay import PowerLawScheduler\n"
            "try:\n    PowerLawScheduler(5).sample_indices([2**40], [2**40])\n"
            "except ValueError as e:\n    print('ValueError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ValueError counts[0]: would need 26388279066624 bytes")


def test_power_law_sizes_and_passes_bounded():
    import time

    sch = PowerLawScheduler(5, seed=3)
    before = sch.state_dict()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"^counts\[0\]: would need \d+ bytes"):  # looped for minutes
        sch.sample_indices([10**12], [10])
    with pytest.raises(ValueError, match=r"^counts\[1\]: .* whole passes"):
        sch.sample_indices([3, 2**21 * 4 + 1], [5, 4])
    assert time.perf_counter() - t0 < 5
    assert same_state(sch.state_dict(), before)
    with pytest.raises(TypeError, match="^counts"):
        sch.sample_indices(5, [5])


@pytest.mark.parametrize("make, need", [
    (lambda: ReservoirBuffer(10**12), "1000000000000 bytes"),
    (lambda: ReservoirBuffer(capacity=2**63), "9223372036854775808 bytes"),
    (lambda: ClassBalancedReservoir(2**32 - 1), "73014444015 bytes"),  # 17 bytes a slot at least
])
def test_buffer_capacity_that_cannot_fit_is_refused(make, need):
    """Issue 11 items 2 and 8: accepted (then an allocator RuntimeError at the first add) or an
    OverflowError; the bound is the host's physical memory (the device's for CUDA storage)."""
    from forgetcore import _checks

    if int(need.split()[0]) <= _checks.memory_bytes():  # a huge host: refused at the first add
        with pytest.raises(ValueError, match="^capacity: would need"):
            make().add(x=torch.zeros(1, 10**6), y=torch.zeros(1, dtype=torch.int64))
        return
    with pytest.raises(ValueError, match=f"^capacity: would need {need}"):
        make()


def test_first_add_checks_storage_size_before_allocating():
    from forgetcore import _checks

    cap = _checks.memory_bytes() // 64  # constructible (>= 1 byte a slot), far too big at 256 B a row
    for buf in (ReservoirBuffer(cap), ClassBalancedReservoir(min(cap, 2**32 - 1))):
        with pytest.raises(ValueError, match=r"^capacity: would need \d+ bytes \(\d+ slots of 264 bytes\)"):
            buf.add(x=torch.zeros(3, 64), y=torch.zeros(3, dtype=torch.int64))
        assert len(buf) == 0 and buf.seen == 0 and buf.fields == ()


@pytest.mark.parametrize("cls", [ReservoirBuffer, ClassBalancedReservoir])
def test_corrupt_buffer_state_is_refused(cls):
    """Issue 11 item 5: seen = 2**64 - 2 wrapped the counter (len fell from 10 to 2 after one add);
    len > capacity and seen < len were accepted; a missing key was a KeyError."""
    buf = _filled(cls)
    sd = buf.state_dict()
    cases = [
        ({**sd, "seen": 2**64 - 2}, ValueError, r"^state_dict\['seen'\]"),
        ({**sd, "seen": 3}, ValueError, r"^state_dict"),  # seen < len
        ({**sd, "seen": 1.5}, TypeError, r"^state_dict\['seen'\]"),
        ({**sd, "capacity": 4}, ValueError, r"^state_dict\['capacity'\]"),
        ({k: v for k, v in sd.items() if k != "rng"}, ValueError, r"^state_dict\['rng'\]"),
        ({k: v for k, v in sd.items() if k != "fields"}, ValueError, r"^state_dict\['fields'\]"),
        ([1, 2], TypeError, "^state_dict"),
    ]
    big = {k: torch.cat([v, v[:1]]) for k, v in sd["fields"].items()}  # len > capacity
    cases.append(({**sd, "fields": big, "seen": 100}, ValueError, "^state_dict"))
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            buf.load_state_dict(bad)
        assert same_state(buf.state_dict(), sd)


def test_exponential_weights_that_underflow_are_refused():
    """Issue 11 item 7: accepted, then "cannot convert float NaN to integer" in counts()."""
    with pytest.raises(ValueError, match="^lam: .*underflows"):
        PowerLawScheduler(10, schedule="exponential", lam=1000.0)
    with pytest.raises(ValueError, match="^d: .*underflows"):
        PowerLawScheduler(10, d=5000.0)
    sch = PowerLawScheduler(10)
    for bad in (-5.0, float("nan"), float("inf"), torch.tensor([1.0, -0.5])):
        with pytest.raises(ValueError, match="^delta"):
            sch.g(bad)
