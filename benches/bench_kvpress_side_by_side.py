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
    """(dev, test): 2n prompts of one seed, alternate ones to each side, so the two sets use
    disjoint prose windows and span the same needle depths."""
    from forgetcore.kvcache.evaluation import needle_items

    both = needle_items(tok, 2 * n, tokens, seed=seed)
    return both[0::2], both[1::2]


def _grids(keep: float) -> dict:
    """Each forgetcore press's hyper-parameter candidates (fixed before any result was seen);
    the first is the default, which also wins ties."""
    from forgetcore.kvcache import A2SF, H2O, TOVA, ExpectedAttention, Knorm, RecentWindow, SnapKV

    r = 1 - keep
    return {
        "SnapKV": {f"window={w}": SnapKV(compression_ratio=r, window=w) for w in (64, 8, 16, 32)},
        "TOVA": {f"n_sink={s}": TOVA(compression_ratio=r, n_sink=s) for s in (0, 4)},
        "Knorm": {f"n_sink={s}": Knorm(compression_ratio=r, n_sink=s) for s in (4, 0)},
        "ExpectedAttention": {f"n_queries={nq},use_vnorm={v}": ExpectedAttention(compression_ratio=r, n_queries=nq,
                                                                                  use_vnorm=v)
                              for nq in (64, 16) for v in (True, False)},
        "StreamingLLM": {"-": RecentWindow(compression_ratio=r)},
        "H2O": {"-": H2O(compression_ratio=r)},
        "A2SF": {f"alpha={a}": A2SF(a, compression_ratio=r) for a in (0.9, 0.5, 0.8, 0.95, 0.99)},
    }


def _kvpress_child(n, tokens, seed) -> dict:
    import kvpress
    from transformers import DynamicCache

    from forgetcore.models import load_smollm2

    model, tok = load_smollm2()
    items = _items(tok, n, tokens, seed)[1]
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


def _forgetcore(n, tokens, seed) -> tuple[dict, dict]:
    """Per press and budget: the candidate with the most dev prompts answered, then its count
    on the test prompts. Returns (test counts, {press@keep: (chosen, dev count)})."""
    from forgetcore.kvcache.evaluation import recall_correct
    from forgetcore.models import load_smollm2

    model, tok = load_smollm2()
    tok.padding_side = "left"
    dev, test = _items(tok, n, tokens, seed)
    chosen: dict = {}
    names, presses = ["full cache@1.0"], [None]
    for keep in KEEPS:
        grids = _grids(keep)
        flat = [(name, label, p) for name, g in grids.items() for label, p in g.items()]
        ok = recall_correct(model, tok, dev, [p for _, _, p in flat], batch_size=8)
        for name in grids:
            best = max(((label, p, sum(o)) for (nm, label, p), o in zip(flat, ok) if nm == name),
                       key=lambda x: x[2])          # max keeps the first of equals: the default
            chosen[f"{name}@{keep}"] = (best[0], best[2])
            names.append(f"{name}@{keep}")
            presses.append(best[1])
    full_dev = sum(recall_correct(model, tok, dev, [None], batch_size=8)[0])
    chosen["full cache@1.0"] = ("-", full_dev)
    ok = recall_correct(model, tok, test, presses, batch_size=8)
    return {k: sum(v) for k, v in zip(names, ok)}, chosen


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
    fc, chosen = _forgetcore(args.n, args.tokens, args.seed)
    t_fc = time.perf_counter() - t0
    # forgetcore's side as soon as it is known: the kvpress side (batch 1) takes as long again
    print("forgetcore (test counts; chosen on dev):", json.dumps({"test": fc, "chosen": chosen}), flush=True)
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
    print(f"Passkey retrieval, {args.n} test prompts of ~{args.tokens} prose tokens (seed {args.seed}, odd items; "
          f"the even items are the {args.n} dev prompts), SmolLM2-135M; test prompts answered (of {args.n}), "
          "question appended after compression; forgetcore's hyper-parameters chosen on the dev prompts "
          "(chosen value, dev count), kvpress's at its defaults")
    cols = [f"{int(k * 100)}% kept" for k in KEEPS]
    print(f"{'press':22s}" + "".join(f"{c + ' fc':>14s}{c + ' kvpress':>19s}" for c in cols))
    names = ["full cache", "SnapKV", "TOVA", "Knorm", "ExpectedAttention", "StreamingLLM", "H2O", "A2SF"]
    for name in names:
        row = f"{name:22s}"
        for k in KEEPS:
            kk = 1.0 if name == "full cache" else k
            a, b = fc.get(f"{name}@{kk}"), kp.get(f"{name}@{kk}")
            row += f"{'-' if a is None else a:>14}{'-' if b is None else b:>19}"
        print(row)
    for k, (label, n_dev) in chosen.items():
        print(f"  chosen on dev: {k:28s} {label:34s} dev {n_dev}/{args.n}")
    print(f"(forgetcore {t_fc:.0f} s" + (f", kvpress {kp.get('kvpress_version', '?')} {t_kp:.0f} s)" if kp else ")"))


if __name__ == "__main__":
    main()
