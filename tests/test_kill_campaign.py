"""The kill campaign's quick mode: SIGKILL a checkpointing run 5 times at random moments, resume.

benchmarks/kill_campaign.py runs the exact-resume training in a fresh process per attempt, kills
it, checks every committed checkpoint verifies and nothing committed is lost, that the next run
resumes from the newest committed step and cleans the leftovers first, and that the final model
equals an uninterrupted run's bit for bit. The long campaign (hundreds of kills, local and S3)
is run by hand; its figures are in docs/robustness.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kill_campaign.py"


def test_quick_kill_campaign_loses_nothing_and_resumes_bit_identically(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads(out.read_text())
    assert stats["kills"] == 5
    assert sum(stats["landing"].values()) == 5
    assert stats["checkpoints_lost"] == 0
    assert stats["verify_failures"] == 0
    assert stats["checkpoints_verified"] > 0
    assert stats["resume_mismatches"] == 0
    assert stats["leftovers_remaining_at_start"] == 0
    assert stats["leftovers_cleaned"] == stats["leftovers_found"]
    assert stats["final_identical"] and stats["rounds_identical"] == stats["rounds"] >= 1
    assert stats["ok"]


def test_quick_incremental_kill_campaign_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--incremental", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads(out.read_text())
    assert stats["kills"] == 5 and stats["checkpoints_verified"] > 0
    assert stats["checkpoints_lost"] == 0 and stats["verify_failures"] == 0 and stats["resume_mismatches"] == 0
    assert stats["leftovers_remaining_at_start"] == 0  # unreferenced packs of killed saves included
    assert stats["final_identical"] and stats["ok"]
