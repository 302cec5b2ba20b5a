"""`forgetcore demo cl --quick` end to end through the CLI: the table, the PNG and the JSON."""

import json
import subprocess
import sys

import pytest

from forgetcore import cli


def test_help_lists_the_cl_demo(capsys):
    assert "cl" in cli.DEMOS
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0 and "Split-Digits" in capsys.readouterr().out


def test_demo_cl_quick(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "forgetcore.cli", "demo", "cl", "--quick",
                        "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for row in ("avg accuracy", "avg forgetting", "BWT", "Finetune", "ER", "Joint"):
        assert row in r.stdout
    png = out / "cl.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    res = json.loads((out / "cl_results.json").read_text())
    assert set(res["summary"]) == {"Finetune", "ER", "Joint"}
    assert res["config"]["seeds"] == 1 and len(res["runs"]["ER"]) == 1
    assert len(res["runs"]["ER"][0]["R"]) == 5
