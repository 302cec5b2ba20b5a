"""The ``forgetcore`` command: runs the experiments behind the README.

``forgetcore demo`` runs the continual-learning demo; ``forgetcore demo NAME`` runs another
family's demo and ``forgetcore demo all`` runs them all. Each demo prints its table and
writes its PNG(s) to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .demos import DEMOS, resolve

    names = list(DEMOS) if args.name == "all" else [args.name]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        demo = resolve(name)
        options = {o.dest: getattr(args, o.dest) for o in demo.options}
        if demo.jobs:
            options["jobs"] = args.jobs
        elif args.jobs > 1:
            print(f"== note: demo {name} runs its seeds in one process (--jobs applies to: "
                  f"{', '.join(k for k, v in DEMOS.items() if v.jobs)})", flush=True)
        print(f"== forgetcore demo {name}: {demo.description}", flush=True)
        t0 = time.perf_counter()
        demo.load()(out_dir=out, seeds=args.seeds, quick=args.quick, progress=not args.no_progress, **options)
        print(f"== {name} finished in {time.perf_counter() - t0:.1f} s; outputs in {out}/", flush=True)
    return 0


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"jobs: expected an int >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"jobs: expected an int >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from .demos import ALIASES, DEMOS

    p = argparse.ArgumentParser(prog="forgetcore", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log at INFO level; -vv at DEBUG (which backend each primitive ran, and why)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a demo experiment on embedded data")
    d.add_argument("name", nargs="?", default="cl", choices=[*DEMOS, *ALIASES, "all"],
                   help="which demo (default: cl); " + "; ".join(f"{k}: {v.description}" for k, v in DEMOS.items()))
    d.add_argument("--out", default="forgetcore-out", help="folder for tables and plots (default: %(default)s)")
    d.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the demo's own)")
    d.add_argument("--quick", action="store_true", help="a smaller run for smoke tests")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.add_argument("--jobs", type=_jobs, default=1, metavar="N",
                   help="run independent seeds in N spawned processes, one torch thread each (same results; "
                        "demos: " + ", ".join(k for k, v in DEMOS.items() if v.jobs) + ")")
    seen: set[str] = set()
    for name, demo in DEMOS.items():  # each demo's own flags (e.g. `demo subspace --flower`)
        for o in demo.options:
            if o.flag in seen:
                continue
            seen.add(o.flag)
            kwargs: dict = {"help": f"[{name}] {o.help}", "default": o.default, "dest": o.dest}
            if o.action == "store_true":
                d.add_argument(o.flag, action="store_true", **kwargs)
            else:
                d.add_argument(o.flag, type=o.type, **kwargs)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
