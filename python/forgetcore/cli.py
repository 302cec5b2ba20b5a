"""The ``forgetcore`` command: runs the experiments behind the README.

``forgetcore demo`` runs the continual-learning demo; ``forgetcore demo NAME`` runs another
family's demo and ``forgetcore demo all`` runs them all. Each demo prints its table and
writes its PNG(s) to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

# name -> (module, function, one-line description). Functions take (out_dir, seeds, quick,
# progress) and return a dict of results; imports are lazy so `forgetcore --help` is instant.
DEMOS: dict[str, tuple[str, str, str]] = {
    "cl": ("forgetcore.continual.demo", "run", "Split-Digits class-incremental: Finetune, ER, Joint"),
    "unlearn": ("forgetcore.unlearning.demo", "run", "SSD vs Retrain/Finetune/GradientAscent, full-class and random, with MIA"),
    "kv": ("forgetcore.kvcache.demo", "run", "KV-cache eviction on SmolLM2: A2SF vs H2O vs RecentWindow"),
    "subspace": ("forgetcore.continual.subspace_demo", "run",
                 "Permuted-Digits: GPM vs Finetune vs ER; federated FOT vs FedAvg"),
    "kappa": ("forgetcore.finetune.demo", "run", "KappaTune on SmolLM2-135M: kappa of every matrix, fine-tune vs full"),
}


def _demo(args: argparse.Namespace) -> int:
    names = list(DEMOS) if args.name == "all" else [args.name]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        module, func, desc = DEMOS[name]
        print(f"== forgetcore demo {name}: {desc}", flush=True)
        t0 = time.perf_counter()
        fn = getattr(importlib.import_module(module), func)
        fn(out_dir=out, seeds=args.seeds, quick=args.quick, progress=not args.no_progress)
        print(f"== {name} finished in {time.perf_counter() - t0:.1f} s; outputs in {out}/", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forgetcore", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a demo experiment on embedded data")
    d.add_argument("name", nargs="?", default="cl", choices=[*DEMOS, "all"],
                   help="which demo (default: cl); " + "; ".join(f"{k}: {v[2]}" for k, v in DEMOS.items()))
    d.add_argument("--out", default="forgetcore-out", help="folder for tables and plots (default: %(default)s)")
    d.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the demo's own)")
    d.add_argument("--quick", action="store_true", help="a smaller run for smoke tests")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
