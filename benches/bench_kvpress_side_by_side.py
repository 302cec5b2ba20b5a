"""kvpress's presses and forgetcore's, side by side on identical prompts: one table.

Task: passkey retrieval in real prose (``forgetcore.kvcache.evaluation.needle_items``: a 5-digit
key at seeded depths in ``pydoc_data.topics`` text), kvpress's protocol: the context is
compressed by the press, the question is appended afterwards, and a prompt counts when greedy
decoding reproduces the whole key. SmolLM2-135M-Instruct (float32), the same items for both.

- forgetcore: batch 8, left padded, per-head eviction on a cache that really shrinks.
- kvpress 0.5.5: its own presses, batch 1 (its protocol; ``ObservedAttentionPress`` needs eager
  attention and is left out), question positions continuing the uncompressed context as its
  pipeline does.

kvpress pins transformers < 5.3, so it runs in a child process over an overlay of packages
installed apart from the main environment (nothing is installed into it), for example::

    pip install --no-deps --target /tmp/kvp-site kvpress==0.5.5 transformers==5.2.0 \\
        "huggingface_hub>=1.3,<2" "tokenizers>=0.22,<=0.23.0" "cachetools>=5.5.2,<6" \\
        "fire>=0.6,<0.7" termcolor typer-slim httpx httpcore h11 anyio sniffio certifi idna \\
        datasets pyarrow "dill<0.4.1" multiprocess xxhash six
    PYTHONPATH=python python benches/bench_kvpress_side_by_side.py --kvpress-site /tmp/kvp-site

(``--kvpress-python`` instead points at a separate virtualenv's python with kvpress installed.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KEEPS = (0.5, 0.2)


def _items(tok, n, tokens, seed):
    from forgetcore.kvcache.evaluation import needle_items

    return needle_items(tok, n, tokens, seed=seed)


def _kvpress_child(n, tokens, seed) -> dict:
    import kvpress
    from transformers import DynamicCache

    from forgetcore.models import load_smollm2

    model, tok = load_smollm2()
    items = _items(tok, n, tokens, seed)
    from importlib.metadata import version

    out: dict = {"kvpress_version": version("kvpress")}
    makers = {"full cache": None, "SnapKV": lambda r: kvpress.SnapKVPress(compression_ratio=r),
              "TOVA": lambda r: kvpress.TOVAPress(compression_ratio=r),
              "Knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
              "ExpectedAttention": lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
              "StreamingLLM": lambda r: kvpress.StreamingLLMPress(compression_ratio=r)}
    for name, make in makers.items():
        for keep in KEEPS if make else (1.0,):
            ok = 0
            for it in items:
                ctx = tok(it.context, return_tensors="pt", add_special_tokens=False)["input_ids"]
                tail = tok(it.question + it.answer, return_tensors="pt", add_special_tokens=False)["input_ids"]
                ans = tok(it.answer, add_special_tokens=False)["input_ids"]
                cache = DynamicCache()
                with torch.no_grad():
                    if make is None:
                        model(input_ids=ctx, past_key_values=cache)
                    else:
                        with make(1 - keep)(model):
                            model(input_ids=ctx, past_key_values=cache)
                    pos = torch.arange(ctx.shape[1], ctx.shape[1] + tail.shape[1])[None]
                    logits = model(input_ids=tail, past_key_values=cache, position_ids=pos).logits
                pred = logits[0].argmax(-1)[-len(ans) - 1:-1]
                ok += bool((pred == torch.tensor(ans)).all())
            out[f"{name}@{keep}"] = ok
    return out


def _forgetcore(n, tokens, seed) -> dict:
    from forgetcore.kvcache import A2SF, H2O, TOVA, ExpectedAttention, Knorm, RecentWindow, SnapKV
    from forgetcore.kvcache.evaluation import recall_correct
    from forgetcore.models import load_smollm2

    model, tok = load_smollm2()
    tok.padding_side = "left"
    items = _items(tok, n, tokens, seed)
    names, presses = ["full cache@1.0"], [None]
    for keep in KEEPS:
        r = 1 - keep
        for name, p in {"SnapKV": SnapKV(compression_ratio=r, window=32), "TOVA": TOVA(compression_ratio=r),
                        "Knorm": Knorm(compression_ratio=r),
                        "ExpectedAttention": ExpectedAttention(compression_ratio=r),
                        "StreamingLLM": RecentWindow(compression_ratio=r), "H2O": H2O(compression_ratio=r),
                        "A2SF(0.9)": A2SF(0.9, compression_ratio=r)}.items():
            names.append(f"{name}@{keep}")
            presses.append(p)
    ok = recall_correct(model, tok, items, presses, batch_size=8)
    return {k: sum(v) for k, v in zip(names, ok)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=24, help="test prompts")
    ap.add_argument("--tokens", type=int, default=1000, help="prose tokens around the needle")
    ap.add_argument("--seed", type=int, default=1001, help="prompt seed (the kv demo's test seed)")
    ap.add_argument("--kvpress-site", default=None, help="folder of packages laid over this environment for kvpress")
    ap.add_argument("--kvpress-python", default=None, help="a python with kvpress installed (instead of the overlay)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_kvpress_child(args.n, args.tokens, args.seed)))
        return
    t0 = time.perf_counter()
    fc = _forgetcore(args.n, args.tokens, args.seed)
    t_fc = time.perf_counter() - t0
    kp: dict = {}
    if args.kvpress_site or args.kvpress_python:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        path = [str(ROOT / "python")] + ([args.kvpress_site] if args.kvpress_site else [])
        env["PYTHONPATH"] = os.pathsep.join(path[::-1])          # the overlay first: its transformers wins
        py = args.kvpress_python or sys.executable
        t0 = time.perf_counter()
        p = subprocess.run([py, __file__, "--child", "--n", str(args.n), "--tokens", str(args.tokens), "--seed",
                            str(args.seed), "--threads", str(args.threads)], capture_output=True, text=True, env=env)
        if p.returncode:
            print(f"kvpress side failed (it is left out of the table):\n{p.stderr[-2000:]}", file=sys.stderr)
        else:
            kp = json.loads(p.stdout.strip().splitlines()[-1])
        t_kp = time.perf_counter() - t0
    print(f"Passkey retrieval, {args.n} prompts of ~{args.tokens} prose tokens (seed {args.seed}), SmolLM2-135M; "
          f"prompts answered (of {args.n}), question appended after compression")
    cols = [f"{int(k * 100)}% kept" for k in KEEPS]
    print(f"{'press':22s}" + "".join(f"{c + ' fc':>14s}{c + ' kvpress':>19s}" for c in cols))
    names = ["full cache", "SnapKV", "TOVA", "Knorm", "ExpectedAttention", "StreamingLLM", "H2O", "A2SF(0.9)"]
    for name in names:
        row = f"{name:22s}"
        for k in KEEPS:
            kk = 1.0 if name == "full cache" else k
            a, b = fc.get(f"{name}@{kk}"), kp.get(f"{name}@{kk}")
            row += f"{'-' if a is None else a:>14}{'-' if b is None else b:>19}"
        print(row)
    print(f"(forgetcore {t_fc:.0f} s" + (f", kvpress {kp.get('kvpress_version', '?')} {t_kp:.0f} s)" if kp else ")"))


if __name__ == "__main__":
    main()
