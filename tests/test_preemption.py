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
          epochs: int = 60, run: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, RUN, str(tmp / "ckpts"), str(epochs), str(tmp / "ready"), str(tmp / "out.json"),
            json.dumps(options), ckpt or "", json.dumps(run or {})]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def signal_when_ready(proc: subprocess.Popen, tmp: Path, sig: int, again_after: tuple[float, ...] = ()) -> str:
    deadline = time.monotonic() + 120
    while not (tmp / "ready").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the training run never got ready"
        time.sleep(0.1)
    proc.send_signal(sig)
    for pause in again_after:  # schedulers and impatient users signal more than once
        time.sleep(pause)
        if proc.poll() is None:
            proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return out


def finish(tmp: Path, **kwargs: object) -> dict:
    """Run to the end without signals; what the run wrote to out.json."""
    (tmp / "out.json").unlink(missing_ok=True)
    proc = start(tmp, {}, **kwargs)  # type: ignore[arg-type]
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.slow  # a training process signalled, then a rerun
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


@pytest.mark.slow  # a training process signalled, then a rerun
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


@pytest.mark.slow  # a training process signalled, then a rerun
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


@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_repeated_signals_do_not_change_the_outcome(tmp_path: Path) -> None:
    proc = start(tmp_path, {"grace_seconds": 60})
    log = signal_when_ready(proc, tmp_path, signal.SIGTERM, again_after=(0.3, 0.3, 0.3))
    assert proc.returncode == 75, log[-3000:]
    CheckpointManager(str(tmp_path / "ckpts")).verify("preempted.ckpt")


@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_sigterm_in_the_sanity_check_exits_75_and_saves_nothing(tmp_path: Path) -> None:
    proc = start(tmp_path, {}, run={"ready": "sanity", "sanity_steps": 4})
    log = signal_when_ready(proc, tmp_path, signal.SIGTERM, again_after=(0.3,))
    assert proc.returncode == 75, log[-3000:]  # never 0: the scheduler must rerun it
    assert "before the first training step" in log and "starts from scratch" in log
    assert CheckpointManager(str(tmp_path / "ckpts")).manifests() == []


@pytest.mark.slow  # three training processes, about a minute
def test_sigterm_while_the_checkpoint_loads_exits_75_and_the_rerun_resumes_it(tmp_path: Path) -> None:
    finish(tmp_path, epochs=1)
    manager = CheckpointManager(str(tmp_path / "ckpts"))
    before = [m.name for m in manager.manifests()]
    assert before == ["epoch=0-step=16.ckpt"]
    proc = start(tmp_path, {}, ckpt="last", epochs=2, run={"ready": "load", "load_seconds": 3})
    log = signal_when_ready(proc, tmp_path, signal.SIGTERM)
    assert proc.returncode == 75, log[-3000:]
    assert "before the first training step" in log and "epoch=0-step=16.ckpt" in log
    assert [m.name for m in manager.manifests()] == before  # nothing new: no step ran
    assert finish(tmp_path, ckpt="last", epochs=2)["start_step"] == 16


@pytest.mark.slow  # three training processes, about a minute
def test_sigterm_at_a_step_where_validation_is_due_continues_exactly(tmp_path: Path) -> None:
    # validation runs every 4 steps and draws random numbers (as augmentations do): the
    # preemption checkpoint must be taken after it, or the rerun (which skips it) would differ
    run = {"val_check_interval": 4, "shuffle": True, "val_draws": True}
    uninterrupted = finish(tmp_path / "full", epochs=2, run=run)
    proc = start(tmp_path, {}, epochs=2, run={**run, "signal_at_step": 12, "ready": "never"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert CheckpointManager(str(tmp_path / "ckpts")).read_manifest("preempted.ckpt").global_step == 12
    resumed = finish(tmp_path, ckpt="last", epochs=2, run=run)
    assert resumed["start_step"] == 12 and resumed["sha"] == uninterrupted["sha"]


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


@pytest.mark.parametrize("fails", [False, True], ids=["ends", "raises"])
def test_the_handlers_before_fit_are_back_after_it(tmp_path: Path, fails: bool) -> None:
    import lightning.pytorch as pl
    from helpers import fit

    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, *args):  # noqa: ANN001, ANN002
            if fails and trainer.global_step == 3:
                raise RuntimeError("boom")

    def mine(signum, frame):  # noqa: ANN001
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        cb = CheckpointCallback(dirpath=str(tmp_path), preemption=True)
        if fails:
            with pytest.raises(RuntimeError, match="boom"):
                fit(cb, max_epochs=1, extra_callbacks=[Boom()])
        else:
            fit(cb, max_epochs=1)
        assert signal.getsignal(signal.SIGTERM) is mine  # neither ours nor Lightning's left behind
    finally:
        signal.signal(signal.SIGTERM, before)
