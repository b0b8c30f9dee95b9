"""benchmarks/incremental.py runs end to end in its --short mode (a smoke test: no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_short_incremental_benchmark_reports_both_models_and_modes(tmp_path: Path) -> None:
    out = tmp_path / "incr.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "incremental.py"), "--short", "--json", str(out),
         "--dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    modes = {(r["frozen"], r["mode"]) for r in report["results"]}
    assert modes == {(0.95, "full"), (0.95, "incremental"), (0.0, "full"), (0.0, "incremental")}
    # what the benchmark measures must be real: incremental saves of a mostly frozen model write less
    assert report["ratios"]["95%"]["bytes_per_save"] < 1.0
    assert report["ratios"]["0%"]["bytes_per_save"] > 0.9  # nothing to share: about a full save
    assert "| 95% | incremental |" in proc.stdout
