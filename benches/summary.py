"""Run every ``benches/bench_*.py`` in turn and end with ONE table: each target, met or missed.

Each benchmark prints its own tables and appends its targets (value, target, unit) as JSON
lines to a shared file (``--summary-json``, see benches/harness.py); this script collects them.
A benchmark that fails is listed with its exit code (its targets as not measured).

    PYTHONPATH=python python benches/summary.py [--quick] [--only importance,fisher] [--skip unlearning]

Exit status 0 even when a target is missed (the table says so); ``--strict`` makes a missed or
unmeasured target an error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import Target, fmt_value, table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The order the lead runs them in; the slow, target-free ones last.
ORDER = ["importance", "fisher", "replay", "subspace", "spectral", "kvscore", "unlearning"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed or not measured")
    args = ap.parse_args()
    # Benchmarks on the shared harness report targets here; the others (multi-process, SmolLM2
    # end to end, kvpress in its own environment, long sweeps) keep their own protocol and are
    # run directly (each one's docstring says how).
    scripts = sorted(HERE.glob("bench_*.py"))
    found = [p.stem.removeprefix("bench_") for p in scripts if "from harness import" in p.read_text()]
    own = [p.name for p in scripts if p.stem.removeprefix("bench_") not in found]
    names = [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    names = [n for n in names if n not in args.skip.split(",")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    targets: list[Target] = []
    failed: list[tuple[str, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.jsonl"
            cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--summary-json", str(out)]
            if args.quick:
                cmd.append("--quick")
            print(f"\n######## {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, env=env, cwd=ROOT)
            print(f"######## {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
            if rc != 0:
                failed.append((name, rc))
            if out.exists():
                targets += [Target(**json.loads(line)) for line in out.read_text().splitlines() if line.strip()]
    print("\n==================== benchmark summary ====================")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
          + (" (--quick: smaller sizes)" if args.quick else ""))
    rows = []
    for t in targets:
        measured = t.value == t.value
        status = ("met" if t.met else "MISSED") if measured else "not run"
        sign = ">=" if t.higher_is_better else "<="
        rows.append([t.bench, t.name, fmt_value(t.value, t.unit), f"{sign} {fmt_value(t.target, t.unit)}", status,
                     t.note])
    for name, rc in failed:
        rows.append([name, "(benchmark failed)", "-", "-", f"exit {rc}", ""])
    print(table(["bench", "what", "measured", "target", "status", "note"], rows))
    met = sum(1 for t in targets if t.value == t.value and t.met)
    print(f"{met} of {len(targets)} targets met" + (f"; {len(failed)} benchmark(s) failed" if failed else ""))
    if own:
        print("run on their own (not in this table): " + ", ".join(own))
    bad = failed or any(not (t.value == t.value and t.met) for t in targets)
    return 1 if (args.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
