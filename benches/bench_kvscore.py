"""kvscore benchmark: forgetcore (Rust) vs the reference (best torch) vs the public code's way.

Shapes from the issue: batch 1, 32 heads, head_dim 128, budget 1,024 selected + 128 recent.
- decode step: accumulate the new attention row and evict. Baseline = A2SF's real-drop code
  (and kvpress's ScorerPress): top-k over the non-recent part and re-gather K, V and scores
  every step. Ours: accumulate_ + evict_one, then overwrite the evicted slot in place.
- one-shot select from T = 4,096 slots to 1,152 (+ gathering K and V).
- prefill chunk: q = 512 new rows over T = 4,096 keys (memory-bound: GB/s against a stream
  triad measured in the same run). Baseline = A2SF HEAD's alpha^(L-1-q) weighted sum.
- fused scoring (``attention_scores_``) against torch eager: a decode step at batch 8, 32 heads,
  budget 4,096, and A2SF's prefill scoring at T = 32,768 (``--fused-only``; ``--quick`` small).
- end to end (``--e2e``): SmolLM2, ~2,000-token prompt, 20 % budget vs full cache, generation
  time and cache bytes / peak RSS (each config in its own subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from baselines.official_kv import official_decode_step
from forgetcore import kvscore, reference
from harness import Run, table, time_in_turns


class Deferred:
    """A side of a comparison, timed later by :func:`resolve` in turns with the others."""

    def __init__(self, fn, reps: int):
        self.fn, self.reps = fn, reps


def timeit(fn, reps: int) -> Deferred:
    return Deferred(fn, reps)


def resolve(res: dict[str, Deferred]) -> dict[str, float]:
    """Median time of every side, taken in turns (benches/harness.py) after two warm-ups each."""
    reps = max(d.reps for d in res.values())
    times = time_in_turns({k: d.fn for k, d in res.items()}, reps, warmup=2)
    return {k: t.median for k, t in times.items()}


def decode_step(h=32, d=128, n_select=1024, n_recent=128, alpha=0.9, reps=30):
    s = n_select + n_recent + 1
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, h, s, d, generator=g), torch.randn(1, h, s, d, generator=g)
    scores = torch.rand(1, h, s, generator=g)
    row = torch.softmax(torch.randn(1, h, 1, s, generator=g), -1)
    pos = torch.arange(s).expand(1, h, s).contiguous()
    valid = torch.ones(1, h, s, dtype=torch.bool)
    knew, vnew = torch.randn(1, h, 1, d, generator=g), torch.randn(1, h, 1, d, generator=g)

    def base():
        official_decode_step(keys, values, scores.clone(), row[:, :, 0], alpha, n_select, n_recent)

    def inplace(acc, ev):
        sc = scores.clone()
        acc(sc, row, alpha)
        e = ev(sc, 0, n_recent, pos, valid)[..., None]
        keys.scatter_(2, e[..., None].expand(1, h, 1, d), knew)
        values.scatter_(2, e[..., None].expand(1, h, 1, d), vnew)
        sc.scatter_(-1, e, 0.0)

    return {"baseline (official/kvpress re-gather)": timeit(base, reps),
            "reference (torch, in place)": timeit(
                lambda: inplace(reference.kv_accumulate_, reference.kv_evict_one), reps),
            "forgetcore (Rust, in place)": timeit(lambda: inplace(kvscore.accumulate_, kvscore.evict_one), reps)}


def one_shot(h=32, d=128, t=4096, n_select=1024, n_recent=128, reps=10):
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, h, t, d, generator=g), torch.randn(1, h, t, d, generator=g)
    scores = torch.rand(1, h, t, generator=g)

    def gather(idx):
        ix = idx[..., None].expand(*idx.shape, d)
        return keys.gather(2, ix), values.gather(2, ix)

    def base():
        idx = scores[..., :-n_recent].topk(n_select, -1).indices.sort(-1).values
        gather(torch.cat([idx, torch.arange(t - n_recent, t).expand(1, h, n_recent)], -1))

    b = n_select + n_recent
    return {"baseline (topk + cat + gather)": timeit(base, reps),
            "reference (torch select_keep + gather)": timeit(
                lambda: gather(reference.kv_select_keep(scores, b, 0, n_recent)), reps),
            "forgetcore (Rust select_keep + gather)": timeit(
                lambda: gather(kvscore.select_keep(scores, b, 0, n_recent)), reps)}


def prefill_chunk(h=32, t=4096, q=512, alpha=0.9, reps=5):
    g = torch.Generator().manual_seed(2)
    attn = torch.rand(1, h, q, t, generator=g)
    scores = torch.zeros(1, h, t)
    w = alpha ** torch.arange(q - 1, -1, -1, dtype=torch.float32)

    def base():   # A2SF HEAD: S = sum_q alpha^(L-1-q) A[q, :]
        scores.mul_(alpha ** q).add_((attn * w[:, None]).sum(2))
    res = {"baseline (weighted sum, torch)": timeit(base, reps),
           "reference (torch kv_accumulate_)": timeit(lambda: reference.kv_accumulate_(scores, attn, alpha), reps),
           "forgetcore (Rust accumulate_)": timeit(lambda: kvscore.accumulate_(scores, attn, alpha), reps)}
    return res, attn.numel() * 4 + 2 * scores.numel() * 4


def _e2e_child(budget_frac: float | None, prompt_tokens: int, new_tokens: int) -> dict:
    from transformers import DynamicCache

    from forgetcore.kvcache import A2SF, cache_bytes
    from forgetcore.kvcache.evaluation import prose_chunks
    from forgetcore.kvcache.presses import cache_kwarg
    from forgetcore.models import load_smollm2

    model, tok = load_smollm2()
    ids = prose_chunks(tok, 1, prompt_tokens, 0, seed=5)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        t = time.perf_counter()
        if budget_frac is None:
            cache = DynamicCache()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, **{cache_kwarg(model): cache})
        else:
            press = A2SF(0.9, compression_ratio=1 - budget_frac, mode="decode")
            with press(model):
                cache = press.make_cache()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False, **{cache_kwarg(model): cache})
        dt = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": dt, "cache_MB": cache_bytes(cache) / 2**20, "peak_rss_growth_MB": (rss1 - rss0) / 1024,
            "new_tokens": int(out.shape[1] - ids.shape[1])}


def fused(b=8, hq=32, hkv=32, t=32_768, budget=4096, d=128, alpha=0.9, reps=5):
    """Fused scoring (``attention_scores_``, no T x T) against torch eager, which forms the
    probabilities explicitly and sums them:

    - decode step: one query row per head over the budget's keys, (b, hq, 1, d) x (b, hkv, budget, d);
    - A2SF prefill scoring of a T-token prompt: the fused kernel computes only the newest
      ``rows_needed(alpha, 1e-7, T)`` rows; eager computes the same rows (the official HEAD
      code computes all T, out of reach at T = 32k) with the weights alpha^(T-1-q).
    """
    g = torch.Generator().manual_seed(0)
    group = hq // hkv
    res = {}
    q1 = torch.randn(b, hq, 1, d, generator=g)
    kb = torch.randn(b, hkv, budget, d, generator=g)

    def eager_step():
        p = torch.softmax(torch.matmul(q1, kb.repeat_interleave(group, 1).transpose(-1, -2)) * d ** -0.5, -1)
        s = torch.zeros(b, hkv, budget)
        s.mul_(alpha).add_(p.reshape(b, hkv, group, 1, budget).sum((2, 3)))

    res.update(resolve({
        "decode step: torch eager (softmax rows)": timeit(eager_step, reps),
        "decode step: forgetcore fused": timeit(
            lambda: kvscore.attention_scores_(torch.zeros(b, hkv, budget), q1, kb, d ** -0.5, alpha), reps)}))
    w = kvscore.rows_needed(alpha, 1e-7, t)
    qw = torch.randn(b, hq, w, d, generator=g)
    kt = torch.randn(b, hkv, t, d, generator=g)
    qpos = (t - w + torch.arange(w)).expand(b, w)

    def eager_prefill():
        wts = alpha ** torch.arange(w - 1, -1, -1, dtype=torch.float64)
        s = torch.zeros(b, hkv, t)
        for i0 in range(0, w, 64):   # chunks of rows, else (b, hq, w, T) floats at once
            lg = torch.matmul(qw[:, :, i0:i0 + 64], kt.repeat_interleave(group, 1).transpose(-1, -2)) * d ** -0.5
            vis = torch.arange(t)[None, :] <= qpos[0, i0:i0 + 64, None]
            p = torch.softmax(lg.masked_fill(~vis, float("-inf")), -1) * wts[i0:i0 + 64].float()[:, None]
            s += p.reshape(b, hkv, group, -1, t).sum((2, 3))

    res.update(resolve({
        f"prefill scoring T={t} ({w} rows): torch eager": timeit(eager_prefill, 2),
        f"prefill scoring T={t} ({w} rows): forgetcore fused": timeit(
            lambda: kvscore.attention_scores_(torch.zeros(b, hkv, t), qw, kt, d ** -0.5, alpha,
                                              query_positions=qpos), 2)}))
    return res


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--e2e", action="store_true", help="also run the SmolLM2 end-to-end comparison")
        ap.add_argument("--e2e-only", action="store_true", help="only the SmolLM2 end-to-end comparison")
        ap.add_argument("--fused-only", action="store_true", help="only the fused scoring benchmark")
        ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
        ap.add_argument("--prompt-tokens", type=int, default=2000)
        ap.add_argument("--new-tokens", type=int, default=32)
        ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (rayon follows RAYON_NUM_THREADS); 1 avoids oversubscription")

    if "--child" in sys.argv:  # one end-to-end configuration, in its own process: JSON out only
        ap = argparse.ArgumentParser()
        extra(ap)
        ap.add_argument("--quick", action="store_true")
        args = ap.parse_args()
        frac = None if args.child == "full" else float(args.child)
        print(json.dumps(_e2e_child(frac, args.prompt_tokens, args.new_tokens)))
        return
    run = Run("kvscore", __doc__.split("\n\n")[0], add_args=extra)
    args = run.args
    torch.set_num_threads(args.threads)
    if args.e2e_only:
        _e2e(args)
        run.finish()
        return
    sizes = dict(b=2, hq=8, hkv=8, t=4096, budget=512, d=64) if run.quick else {}
    full = dict(b=8, hq=32, t=32_768, budget=4096)
    print(
        "\nfused scoring vs torch eager (batch {b}, {hq} heads, T = {t}, budget {budget})".format(**{**full, **sizes})
    )
    print(table(["side", "ms"], [[k, f"{v * 1e3:.2f}"] for k, v in fused(**sizes).items()]))
    if args.fused_only:
        run.finish()
        return
    bw = run.triads[0]
    div = 3 if run.quick else 1  # --quick: a third of the repetitions
    for title, res in [("decode step (1 x 32 heads, budget 1024 + 128 recent, head_dim 128)",
                        resolve(decode_step(reps=30 // div))),
                       ("one-shot select (1 x 32 heads, T = 4096 -> 1152, + K/V gather)", resolve(one_shot()))]:
        base = next(iter(res.values()))
        print(f"\n{title}")
        print(table(["side", "us", "vs baseline"], [[k, f"{v * 1e6:.1f}", f"x{base / v:.2f}"] for k, v in res.items()]))
    deferred, nbytes = prefill_chunk(reps=5 if not run.quick else 3)
    res = resolve(deferred)
    base = next(iter(res.values()))
    print("\nprefill chunk accumulate (1 x 32 heads, q = 512, T = 4096)")
    print(table(["side", "ms", "vs baseline", "GB/s", "% of triad"],
                [[k, f"{v * 1e3:.2f}", f"x{base / v:.2f}", f"{nbytes / v / 1e9:.1f}",
                  f"{nbytes / v / 1e9 / bw * 100:.0f} %"] for k, v in res.items()]))
    if args.e2e or args.e2e_only:
        _e2e(args)
    run.finish()


def _e2e(args) -> None:
    print(f"\nend to end: SmolLM2-135M, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens")
    for cfg in ("full", "0.2"):
        r = subprocess.run([sys.executable, __file__, "--child", cfg, "--prompt-tokens", str(args.prompt_tokens),
                            "--new-tokens", str(args.new_tokens)], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if not line:
            print(f"  {cfg}: failed: {r.stderr[-500:]}")
            continue
        d = json.loads(line[-1])
        name = "full cache" if cfg == "full" else "A2SF 20% (decode mode)"
        print(f"  {name:25s} {d['seconds']:7.1f} s   cache {d['cache_MB']:7.1f} MB   "
              f"peak RSS growth {d['peak_rss_growth_MB']:7.1f} MB")


if __name__ == "__main__":
    main()
