"""End-to-end KV press benchmark on SmolLM2-135M-Instruct: does a press pay for itself?

For each prompt length (1k, 2k, 4k, 8k tokens of ``pydoc_data.topics`` prose; ``--quick``:
256 and 512) it runs, in this one invocation and alternating the sides:

- the full cache (transformers' ``DynamicCache`` with the model's own SDPA attention), and
- A2SF(0.9) keeping 20 % of the prompt (one-shot prefill compression, the default mode;
  ``--modes prefill decode`` adds the step-wise mode),

each in its own subprocess (so peak memory is per side), and reports:

- prefill seconds (one forward over the prompt, the press compressing layer by layer),
- decode milliseconds per new token (median over ``--new-tokens`` greedy steps),
- total generation seconds (prefill + every decode step),
- KV bytes after prefill and the worst ratio to the full cache's bytes at any step after
  prefill (the full cache's bytes are exact: layers x 2 x kv_heads x head_dim x tokens x 4),
- the process peak (max RSS) as the increase over the RSS after loading the model.

Targets: decode <= 0.9x the full cache at 4k and <= 0.8x at 8k, prefill <= 1.3x,
KV bytes <= 25 % at every point after prefill. The machine is shared: say so when quoting.

    PYTHONPATH=python python benches/bench_kv_e2e.py            # 1k/2k/4k/8k
    PYTHONPATH=python python benches/bench_kv_e2e.py --quick    # a smoke run in about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _child(side: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from transformers import DynamicCache

    from forgetcore.kvcache import A2SF, cache_bytes
    from forgetcore.kvcache.evaluation import prose_chunks
    from forgetcore.kvcache.presses import cache_kwarg
    from forgetcore.models import load_smollm2

    model, tok = load_smollm2()
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * hd * 4   # float32 K + V
    ids = prose_chunks(tok, 1, prompt_tokens, 0, seed=5)
    key = cache_kwarg(model)
    press = None if side == "full" else A2SF(0.9, compression_ratio=0.8, mode=side)

    def run(ids, n_new, record):
        cache = DynamicCache() if press is None else press.make_cache()
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{key: cache})
        t_prefill = time.perf_counter() - t0
        ratios, steps = [cache_bytes(cache) / (per_token * ids.shape[1])], []
        kv_after_prefill = cache_bytes(cache)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for k in range(n_new):
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            t = time.perf_counter()
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{key: cache})
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t)
            ratios.append(cache_bytes(cache) / (per_token * (ids.shape[1] + k + 1)))
        if record:
            return {"prefill_s": t_prefill, "decode_ms_per_token": 1e3 * statistics.median(steps),
                    "total_s": t_prefill + sum(steps), "kv_MB_after_prefill": kv_after_prefill / 2**20,
                    "kv_ratio_max_after_prefill": max(ratios), "new_tokens": n_new}
        return None

    with torch.no_grad():
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if press is None:
            run(ids[:, :64], 2, False)      # warm-up: first-call overheads out of the timings
            res = run(ids, new_tokens, True)
        else:
            with press(model):
                run(ids[:, :64], 2, False)
                res = run(ids, new_tokens, True)
        res["peak_rss_increase_MB"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="prompts of 256 and 512 tokens, 8 new tokens")
    ap.add_argument("--lengths", type=int, nargs="*", default=None, help="prompt lengths (default 1000 2000 4000 8000)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps timed (default 32; --quick 8)")
    ap.add_argument("--modes", nargs="*", default=["prefill"], choices=["prefill", "decode"],
                    help="press modes measured beside the full cache")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in each child")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        side, n, new = args.child
        print(json.dumps(_child(side, int(n), int(new), args.threads)))
        return
    lengths = args.lengths or ([256, 512] if args.quick else [1000, 2000, 4000, 8000])
    new = args.new_tokens or (8 if args.quick else 32)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "python") + os.pathsep + env.get("PYTHONPATH", "")
    results: dict = {}
    t0 = time.perf_counter()
    for n in lengths:
        for side in ["full", *args.modes]:
            p = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", side, str(n),
                                str(new)], capture_output=True, text=True, env=env)
            if p.returncode:
                sys.exit(f"child {side} {n} failed:\n{p.stderr[-3000:]}")
            results[f"{side}@{n}"] = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"  done {side:8s} {n:6d} tokens ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    hdr = (f"{'prompt':>7} {'side':>14} {'prefill s':>10} {'x full':>7} {'decode ms/tok':>14} {'x full':>7} "
           f"{'total s':>8} {'KV MB':>8} {'KV max ratio':>13} {'peak +MB':>9}")
    print(f"SmolLM2-135M-Instruct float32, A2SF(0.9) keeping 20 %, {new} new tokens, torch threads {args.threads}")
    print(hdr)
    for n in lengths:
        f = results[f"full@{n}"]
        for side in ["full", *args.modes]:
            r = results[f"{side}@{n}"]
            name = "full cache" if side == "full" else f"A2SF {side}"
            print(f"{n:>7} {name:>14} {r['prefill_s']:10.2f} {r['prefill_s'] / f['prefill_s']:7.2f} "
                  f"{r['decode_ms_per_token']:14.1f} {r['decode_ms_per_token'] / f['decode_ms_per_token']:7.2f} "
                  f"{r['total_s']:8.2f} {r['kv_MB_after_prefill']:8.1f} {r['kv_ratio_max_after_prefill']:13.3f} "
                  f"{r['peak_rss_increase_MB']:9.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
