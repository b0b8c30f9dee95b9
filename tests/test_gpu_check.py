"""benchmarks/gpu_check.py stays runnable: the files, tests and benchmark options it names exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_every_phase_names_tests_and_options_that_exist(tmp_path: Path) -> None:
    help_text = subprocess.run([sys.executable, gpu_check.SAVE_STALL, "--help"], capture_output=True, text=True,
                               check=True, timeout=120).stdout
    assert re.search(r"--device \{cpu,cuda\}", help_text)
    for smoke in (False, True):
        for phase in gpu_check.phases(tmp_path, smoke):
            if gpu_check.SAVE_STALL in phase.argv:
                for option in (a for a in phase.argv if a.startswith("--")):
                    assert re.search(rf"(^|\s){re.escape(option)}\b", help_text), (phase.name, option)
            for target in (a for a in phase.argv if a.startswith("tests/")):
                path, _, name = target.partition("::")
                assert (REPO / path).is_file(), target
                assert not name or f"def {name}(" in (REPO / path).read_text(), target
    full = gpu_check.phases(tmp_path, smoke=False)
    stall = next(ph for ph in full if ph.name == "stall").argv
    assert stall[stall.index("--params") + 1] == "386M" and stall[stall.index("--device") + 1] == "cuda"
    overhead = next(ph for ph in full if ph.name == "overhead").argv
    assert overhead[overhead.index("--interval-steps") + 1] == "100"
    assert gpu_check.BUDGET_S <= 580 and all(ph.limit_s <= gpu_check.BUDGET_S for ph in full)  # one device command


def test_what_it_leaves_fits_what_the_device_tool_brings_back(tmp_path: Path) -> None:
    full = gpu_check.phases(tmp_path, smoke=False)
    files = {f"{ph.name}.log" for ph in full} | {ph.json_name for ph in full if ph.json_name} | {"summary.json"}
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)


def test_a_missing_package_stops_it_before_any_phase(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(gpu_check, "NEEDED", ["json", "no_such_module_for_gpu_check"])
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 2
    assert "no_such_module_for_gpu_check" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # imports every package it checks, then torch and Lightning again (~30 s on 2 cores)
def test_a_phase_leaves_its_log_and_the_summary(tmp_path: Path) -> None:
    assert gpu_check.main(["--smoke", "--only", "env", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["phases"]["env"]["rc"] == 0 and list(summary["phases"]) == ["env"]
    assert '"torch"' in (tmp_path / "env.log").read_text()


GRANDCHILD = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"


@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_a_phase_past_its_limit_is_stopped_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys; subprocess.run([sys.executable, '-c', {GRANDCHILD!r}, {str(pid_file)!r}]); "
            "print('never')")
    result = gpu_check.run_phase(gpu_check.Phase("sleepy", 1, [sys.executable, "-c", code]), tmp_path, 10)
    assert str(result["rc"]).startswith("timed out")
    assert "never" not in (tmp_path / "sleepy.log").read_text().splitlines()[1:]
    pid = int(pid_file.read_text())
    for _ in range(100):  # the group was sent SIGKILL: wait for the grandchild to die
        if not _alive(pid):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the grandchild {pid} survived the phase's timeout")


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
