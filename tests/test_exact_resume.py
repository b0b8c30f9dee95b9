"""Resumed runs are bit-identical to uninterrupted ones, each resume in a fresh process.

The run (tests/exact_run.py) shuffles with a plain DataLoader, uses dropout, numpy/python
randomness in the dataset, a StepLR schedule and a validation loop every 5 steps (10 batches an
epoch). Interruption points: mid-epoch, just after validation, exactly at an epoch end, near the
end — with 0 and 2 loader worker processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ckpt import CheckpointManager

RUN = str(Path(__file__).with_name("exact_run.py"))
TOTAL = 25


def run(dirpath: Path, max_steps: int, workers: int, out: Path, ckpt: str | None = None) -> dict:
    args = [sys.executable, RUN, str(dirpath), str(max_steps), str(workers), str(out)] + ([ckpt] if ckpt else [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == TOTAL
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)


@pytest.mark.slow  # tests/test_exact_matrix.py covers these points (and more) in the default run
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(tmp_path: Path, workers: int) -> None:
    full = run(tmp_path / "full", TOTAL, workers, tmp_path / "full.pt")
    manager = CheckpointManager(str(tmp_path / "full"))
    points = [3, 5, 10, 24] if workers == 0 else [7, 15]
    for k in points:  # the checkpoint an interrupted run would have left at step k
        resumed = run(tmp_path / f"r{k}", TOTAL, workers, tmp_path / f"r{k}.pt", manager.url_of(f"step={k}.ckpt"))
        assert_identical(full, resumed)


@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_really_interrupted_run_resumes_identically(tmp_path: Path) -> None:
    full = run(tmp_path / "full", TOTAL, 0, tmp_path / "full.pt")
    run(tmp_path / "cut", 13, 0, tmp_path / "cut.pt")  # the process ends at step 13, mid-epoch
    resumed = run(tmp_path / "cut", TOTAL, 0, tmp_path / "resumed.pt", str(tmp_path / "cut" / "step=13.ckpt"))
    assert_identical(full, resumed)
