"""A run that moves between machines: GPU -> CPU-only -> GPU, each leg a fresh process.

Every leg resumes from the previous leg's ``last.ckpt`` with no ``map_location`` anywhere and
must start from exactly the weights and optimizer state that checkpoint holds. The CPU-only leg
hides the GPUs (``CUDA_VISIBLE_DEVICES=""``), as a machine without one. Without CUDA the same
three legs run on the CPU (the plumbing, and bit-exactness against an uninterrupted run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cuda_files import storage_locations

from lightning_ckpt import CheckpointManager

pytestmark = pytest.mark.slow  # three or four training processes (~2 minutes on 2 cores)

RUN = str(Path(__file__).with_name("device_run.py"))
CUDA = torch.cuda.is_available()


def leg(directory: Path, accelerator: str, epochs: int, out: Path, ckpt: str | None = None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if accelerator == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a machine without a GPU
    args = [sys.executable, RUN, str(directory), accelerator, str(epochs), str(out)] + ([ckpt] if ckpt else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)


def saved(directory: Path) -> dict[str, Any]:
    checkpoint = CheckpointManager(str(directory)).load("last.ckpt")
    return {"model": checkpoint["state_dict"], "optimizer": checkpoint["optimizer_states"][0],
            "step": checkpoint["global_step"]}


@pytest.mark.parametrize("devices", [
    pytest.param(("gpu", "cpu", "gpu"), marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")),
    ("cpu", "cpu", "cpu"),
], ids="-".join)
def test_a_run_moves_between_machines_and_resumes_exactly_where_it_stopped(tmp_path: Path,
                                                                             devices: tuple[str, ...]) -> None:
    run = tmp_path / "run"
    first = leg(run, devices[0], 1, tmp_path / "1.pt")
    assert first["step"] == 8 and first["start"]["step"] == 0
    tags = set(storage_locations(run / "last.ckpt").values())
    assert ("cuda:0" in tags) == (devices[0] == "gpu"), tags  # a GPU run writes CUDA locations
    before = saved(run)
    second = leg(run, devices[1], 2, tmp_path / "2.pt", "last")
    assert not second["cuda_available"] or devices[1] == "gpu"
    assert second["start"]["step"] == 8 and second["resumed_from"].endswith("last.ckpt")
    assert_same(second["start"], before)
    assert second["start"]["devices"] == (["cuda:0"] if devices[1] == "gpu" else ["cpu"])
    assert set(second["start"]["optimizer_devices"]) == set(second["start"]["devices"])
    before = saved(run)
    third = leg(run, devices[2], 3, tmp_path / "3.pt", "last")
    assert third["start"]["step"] == 16 and third["step"] == 24
    assert_same(third["start"], before)
    assert third["start"]["devices"] == (["cuda:0"] if devices[2] == "gpu" else ["cpu"])
    if set(devices) == {"cpu"}:  # same device all the way: bit-exact with a run that never stopped
        assert_same(third, leg(tmp_path / "straight", "cpu", 3, tmp_path / "straight.pt"))
