"""The one benchmark harness every ``benches/bench_*.py`` uses.

- :func:`time_in_turns`: every side of a comparison timed round robin (one run of each, then
  the next round), best of ``reps``, so all sides see the same machine; page faults counted
  per call (a torch formulation that allocates pays them, and they are half its time on a
  fresh heap).
- :func:`pin_allocator`: glibc keeps freed memory instead of returning it to the OS (no
  ``mmap`` per large tensor, no trimming), so torch's temporaries stop page-faulting after
  the first call. Call it before timing torch; every side of the run then runs on it.
- :class:`Run`: the context of one benchmark script: prints the threads and the load average,
  measures the stream triad (Rust, on the kernels' rayon threads) at the start and at the end,
  warns when the two moved more than 20 %, and collects :meth:`Run.target` results.
- :func:`table`: a plain aligned table printer.

Targets are written as JSON lines to the file named by ``--summary-json`` (``summary.py`` sets
it) so that one table can list every ratio, its target, and whether it was met.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TRIAD_N = 32 * 2**20  # 3 x 128 MiB: far beyond the caches of the machines we run on
TRIAD_BYTES = 12 * TRIAD_N  # counted as streams: read b, read c, write a
DRIFT_WARN = 0.20


def _faults() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt


@dataclass
class Timing:
    best: float  # seconds, best of the runs
    median: float
    faults: float  # page faults per call (mean over the timed runs)


def time_in_turns(runs: dict[str, Callable[[], Any]], reps: int, *, setup: Callable[[], Any] | None = None,
                  warmup: int = 1) -> dict[str, Timing]:
    """Time each callable ``reps`` times, taking turns; ``setup`` runs (untimed) before every call."""
    for f in runs.values():
        for _ in range(warmup):
            if setup is not None:
                setup()
            f()
    times: dict[str, list[float]] = {k: [] for k in runs}
    faults: dict[str, int] = {k: 0 for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            if setup is not None:
                setup()
            f0 = _faults()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            faults[k] += _faults() - f0
    out = {}
    for k, ts in times.items():
        ts = sorted(ts)
        out[k] = Timing(ts[0], ts[len(ts) // 2], faults[k] / max(1, reps))
    return out


def pin_allocator() -> bool:
    """Keep freed heap memory mapped (glibc): no mmap per large block, no trim. Returns success."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1  # every block from the heap, none mmapped
        ok &= libc.mallopt(m_trim_threshold, 2**31 - 1) == 1  # and the heap never handed back
        return bool(ok)
    except (OSError, AttributeError):
        return False


_triad_arrays: tuple[Any, ...] | None = None


def triad_gbs(reps: int = 5) -> float:
    """Stream triad ``a = b + 3c`` in Rust on the kernels' threads: GB/s counting 12 B per element."""
    global _triad_arrays
    from forgetcore import _checks, _core

    if _triad_arrays is None:
        ts = (torch.zeros(TRIAD_N), torch.rand(TRIAD_N), torch.rand(TRIAD_N))
        _triad_arrays = tuple(_checks.numpy_view(t) for t in ts)
    a, b, c = _triad_arrays
    t = time_in_turns({"triad": lambda: _core.stream_triad_(a, b, c, 3.0)}, reps)["triad"].best
    return TRIAD_BYTES / t / 1e9


def triad_call() -> Callable[[], None]:
    """The triad as a callable, to time in turns with the kernels (bytes: ``TRIAD_BYTES``)."""
    from forgetcore import _core

    triad_gbs(1)
    assert _triad_arrays is not None
    a, b, c = _triad_arrays
    return lambda: _core.stream_triad_(a, b, c, 3.0)


@dataclass
class Target:
    bench: str
    name: str
    value: float
    target: float
    unit: str  # "x" (a ratio) or "%" (of the triad)
    higher_is_better: bool = True
    note: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


class Run:
    """One benchmark script's run: header, triad at start and end, targets, summary output."""

    def __init__(self, name: str, description: str, *, triad: bool = True, argv: Sequence[str] | None = None,
                 add_args: Callable[[argparse.ArgumentParser], None] | None = None):
        ap = argparse.ArgumentParser(description=description)
        ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (seconds)")
        ap.add_argument("--summary-json", default=os.environ.get("FORGETCORE_BENCH_SUMMARY"),
                        help="append the targets as JSON lines to this file (summary.py sets it)")
        if add_args is not None:
            add_args(ap)
        self.args = ap.parse_args(argv)
        self.name = name
        self.targets: list[Target] = []
        self.triads: list[float] = []
        self.use_triad = triad
        from forgetcore import _core

        load = os.getloadavg()
        print(f"== {name}: threads torch {torch.get_num_threads()}, rayon {_core.num_threads()}; load average "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
              + ("; --quick" if self.args.quick else ""))
        if load[0] > 0.5 * (os.cpu_count() or 1):
            print(f"warning: the machine is loaded (load {load[0]:.1f}): every time below is inflated")
        if triad:
            self.triads.append(triad_gbs())
            print(f"stream triad at start: {self.triads[0]:.1f} GB/s (Rust, {TRIAD_N * 4 >> 20} MiB x 3)")

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    def target(self, name: str, value: float, target: float, unit: str = "x", *, higher_is_better: bool = True,
               note: str = "") -> None:
        t = Target(self.name, name, float(value), float(target), unit, higher_is_better, note)
        self.targets.append(t)
        print(f"target: {name}: {fmt_value(t.value, unit)} (target {'>=' if higher_is_better else '<='} "
              f"{fmt_value(target, unit)}) {'met' if t.met else 'MISSED'}{'; ' + note if note else ''}")

    def skipped(self, name: str, target: float, unit: str, why: str) -> None:
        """A target this run does not measure (for example in --quick): listed as not run."""
        self.targets.append(Target(self.name, name, float("nan"), float(target), unit, True, why))

    def finish(self) -> None:
        if self.use_triad:
            self.triads.append(triad_gbs())
            a, b = self.triads[0], self.triads[-1]
            drift = abs(b - a) / max(a, 1e-9)
            print(f"stream triad at end: {b:.1f} GB/s ({100 * drift:.0f} % from the start)")
            if drift > DRIFT_WARN:
                print(f"warning: the triad moved {100 * drift:.0f} % (> {100 * DRIFT_WARN:.0f} %) during the run: "
                      "the machine's load changed; repeat the run before quoting it")
                for t in self.targets:
                    t.note = (t.note + "; " if t.note else "") + f"triad moved {100 * drift:.0f} %"
        if self.args.summary_json:
            with open(self.args.summary_json, "a") as fh:
                for t in self.targets:
                    fh.write(json.dumps(asdict(t)) + "\n")


def fmt_value(v: float, unit: str) -> str:
    if v != v:
        return "-"
    return f"{v:.0f} %" if unit == "%" else f"{v:.2f}x"


def _numeric(cell: str) -> bool:
    c = cell.strip().removesuffix("%").removesuffix("x").removeprefix("x").strip()
    try:
        float(c)
        return True
    except ValueError:
        return c in ("", "-")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned plain-text table: numeric columns right-aligned, text columns left-aligned."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = [all(_numeric(r[i]) for r in cells[1:]) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        parts = [c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ms(t: float) -> str:
    return f"{1e3 * t:.1f}"
