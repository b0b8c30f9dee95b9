"""The save-stall benchmark runs end to end (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from save_stall import METHODS, TRAIN_METHODS  # noqa: E402


def test_quick_benchmark_prints_every_method(tmp_path: Path) -> None:
    out = tmp_path / "stall.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "save_stall.py"), "--quick", "--json", str(out),
         "--dir", str(tmp_path)],
        cwd=tmp_path,  # runs from anywhere: the script finds the repository itself
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label in METHODS.values():
        assert f"| {label} |" in proc.stdout, proc.stdout
    assert "Machine:" in proc.stdout and "torch" in proc.stdout
    assert "Targets (ANCHORS.md)" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(METHODS)
    assert set(report["training"]) == {"none", *TRAIN_METHODS}
    assert len(report["training"]["none"]) >= 2  # no-save runs bracket the saving variants
    ours = report["results"]["ours_async"]
    assert "error" not in ours and len(ours["stalls"]) == 3  # one cold + 2 warm saves
    assert report["state_bytes"] > 8 * 2**20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lckpt-stall-")]  # cleaned up
