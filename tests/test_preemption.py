"""Preemption: real signals to real training processes, then a rerun with ckpt_path="last"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_ckpt import CheckpointCallback, CheckpointManager, ConfigurationError
from lightning_ckpt.preemption import Preemption, SignalLatch, plan_save, requeue_slurm_job

RUN = str(Path(__file__).with_name("preempt_run.py"))


def start(tmp: Path, options: dict, env: dict | None = None, ckpt: str | None = None,
          epochs: int = 60) -> subprocess.Popen:
    args = [sys.executable, RUN, str(tmp / "ckpts"), str(epochs), str(tmp / "ready"), str(tmp / "out.json"),
            json.dumps(options)] + ([ckpt] if ckpt else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def signal_when_ready(proc: subprocess.Popen, tmp: Path, sig: int) -> str:
    deadline = time.monotonic() + 120
    while not (tmp / "ready").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the training run never got ready"
        time.sleep(0.1)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return out


def test_sigterm_saves_exits_75_and_the_rerun_resumes(tmp_path: Path) -> None:
    proc = start(tmp_path, {"grace_seconds": 60})
    log = signal_when_ready(proc, tmp_path, signal.SIGTERM)
    assert proc.returncode == 75, log[-3000:]
    assert "SIGTERM received" in log and "preemption checkpoint committed" in log
    manager = CheckpointManager(str(tmp_path / "ckpts"))
    preempted = manager.read_manifest("preempted.ckpt")
    manager.verify("preempted.ckpt")
    assert preempted.global_step >= 20 and not preempted.weights_only
    assert preempted.extra["preempted_by"] == "SIGTERM" and preempted.extra["plan"] == "full"

    (tmp_path / "out.json").unlink(missing_ok=True)
    rerun = start(tmp_path, {}, ckpt="last", epochs=3)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-3000:]
    steps = json.loads((tmp_path / "out.json").read_text())
    assert steps["start_step"] == preempted.global_step  # continued where the signal stopped it
    assert steps["end_step"] == 3 * 16


def test_sigusr1_requeues_under_slurm(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # a real executable standing in for SLURM's
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol-args'}\n")
    scontrol.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = start(tmp_path, {"signals": ["SIGUSR1"], "requeue": True, "exit_code": 99}, env=env)
    log = signal_when_ready(proc, tmp_path, signal.SIGUSR1)
    assert proc.returncode == 99, log[-3000:]
    assert (tmp_path / "scontrol-args").read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in log


def test_no_time_left_keeps_weights_and_last_skips_them(tmp_path: Path) -> None:
    proc = start(tmp_path, {"grace_seconds": 0, "safety_margin": 0})
    log = signal_when_ready(proc, tmp_path, signal.SIGTERM)
    assert proc.returncode == 75, log[-3000:]
    assert "keeping the model weights only" in log
    manager = CheckpointManager(str(tmp_path / "ckpts"))
    assert manager.read_manifest("preempted.ckpt").weights_only
    full = [m for m in manager.manifests() if not m.weights_only]
    # the weights-only file cannot continue training: "last" resumes from the newest full one
    rerun = start(tmp_path, {}, ckpt="last", epochs=3)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["start_step"] == full[-1].global_step


def test_plan_save_prefers_the_most_complete_save_that_fits() -> None:
    assert plan_save(10, None, 0.3, False).kind == "full"
    assert plan_save(10, 8, 0.3, False).kind == "full"
    assert plan_save(10, 20, 0.3, True).kind == "fallback"
    assert plan_save(10, 20, 0.3, False).kind == "weights"
    assert plan_save(1, 20, 0.3, True).kind == "weights"
    assert "optimizer" in plan_save(1, 20, 0.3, False).reason


def test_signal_latch_catches_a_real_signal_and_restores_handlers() -> None:
    previous = signal.getsignal(signal.SIGUSR2)
    latch = SignalLatch([signal.SIGUSR2])
    assert latch.install()
    assert latch.seconds_left(30) == 30
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0)  # let the interpreter run the handler
    assert latch.triggered and latch.received == signal.SIGUSR2
    assert latch.seconds_left(30) <= 30
    latch.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == previous


def test_requeue_outside_slurm_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    assert "not running under SLURM" in requeue_slurm_job()


@pytest.mark.parametrize(
    "kwargs",
    [{"signals": ["SIGNOPE"]}, {"signals": []}, {"signals": ["SIGKILL"]}, {"grace_seconds": -1},
     {"exit_code": 300}],
)
def test_bad_preemption_settings(kwargs: dict) -> None:
    with pytest.raises(ConfigurationError):
        Preemption(**kwargs)


def test_preemption_argument_is_validated() -> None:
    with pytest.raises(ConfigurationError):
        CheckpointCallback(dirpath="memory://p", preemption="yes")  # type: ignore[arg-type]
    assert CheckpointCallback(dirpath="memory://p", preemption=True).preemption == Preemption()
