"""`forgetcore demo cl --quick` end to end through the CLI: the table, the PNG and the JSON."""

import json
import subprocess
import sys

import pytest

from forgetcore import cli
from forgetcore.demos import DEMOS, Demo, Option, resolve


def test_help_lists_the_cl_demo(capsys):
    assert "cl" in DEMOS
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0 and "Split-Digits" in capsys.readouterr().out


def test_demo_cl_quick(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "forgetcore.cli", "demo", "cl", "--quick",
                        "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = ("Finetune", "ER", "UER", "WA", "ViewBatch", "PowerLaw", "DER++", "Refresh", "k-FPF", "Joint")
    for row in ("avg accuracy", "avg forgetting", "BWT", *rows, "stability gap"):
        assert row in r.stdout
    png = out / "cl.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    res = json.loads((out / "cl_results.json").read_text())
    assert set(res["summary"]) == set(rows)
    gap = out / "cl_stability_gap.png"
    assert gap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 <= res["stability_gap"]["metrics"]["min_acc"] <= 1
    assert res["config"]["seeds"] == 1 and len(res["runs"]["ER"]) == 1
    assert len(res["runs"]["ER"][0]["R"]) == 5


def test_demo_options_reach_run(monkeypatch, tmp_path):
    got = {}

    def fake_run(out_dir, seeds, quick, progress, **options):
        got.update(options, quick=quick)
        return {}

    demo = Demo("continual", "a test demo", (Option("--fancy", "a flag"),))
    monkeypatch.setitem(DEMOS, "fancy-test", demo)
    monkeypatch.setattr(Demo, "load", lambda self: fake_run)
    assert cli.main(["demo", "fancy-test", "--fancy", "--quick", "--out", str(tmp_path)]) == 0
    assert got == {"fancy": True, "quick": True}


def test_resolve_unknown_demo_names_the_argument():
    with pytest.raises(ValueError, match="name: expected one of"):
        resolve("nope")


def test_jobs_reaches_demos_whose_seeds_are_independent(monkeypatch, tmp_path, capsys):
    got = {}

    def fake_run(out_dir, seeds, quick, progress, **options):
        got.update(options)
        return {}

    monkeypatch.setattr(Demo, "load", lambda self: fake_run)
    assert DEMOS["subspace"].jobs
    assert cli.main(["demo", "subspace", "--jobs", "2", "--flower", "--out", str(tmp_path)]) == 0
    assert got == {"flower": True, "jobs": 2}
    got.clear()
    assert cli.main(["demo", "kv", "--jobs", "2", "--out", str(tmp_path)]) == 0  # not a jobs demo: a note
    assert "jobs" not in got and "runs its seeds in one process" in capsys.readouterr().out
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            cli.main(["demo", "subspace", "--jobs", bad, "--out", str(tmp_path)])
        assert "jobs: expected an int >= 1" in capsys.readouterr().err


def test_subspace_seeds_across_processes_equal_the_sequential_run():
    """The demo's per-seed work (`--jobs`) in 2 spawned workers gives the sequential numbers
    (a shortened schedule: 2 tasks, 1 epoch, 1 round, to stay within the test budget)."""
    import torch

    from forgetcore.demos import subspace
    from forgetcore.distributed import sweep

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what every worker runs with
    try:
        seq = sweep(subspace.one_seed, [0, 1], processes=1, progress=False, epochs=1, rounds=1, n_tasks=2)
    finally:
        torch.set_num_threads(threads)
    par = sweep(subspace.one_seed, [0, 1], processes=2, progress=False, epochs=1, rounds=1, n_tasks=2)
    assert seq == par
    assert set(seq[0]) == {"Finetune", "ER", "GPM", "FedAvg", "FOT"} and seq[0] != seq[1]
