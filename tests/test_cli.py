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
