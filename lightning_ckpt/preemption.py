"""Preemption: notice a termination signal, and plan a save that fits the grace period.

Clusters warn before they kill: SLURM sends ``--signal=USR1@90`` ninety seconds ahead, spot
instances and ``scancel`` send SIGTERM. A :class:`Preemption` policy names the signals, the grace
budget and what to do; :class:`SignalLatch` only records that a signal arrived (a handler must do
nothing more), and the callback acts at the next safe point. :func:`plan_save` decides, from the
time left and measured save costs, whether the full checkpoint still fits, or a copy to a faster
local directory, or only the weights — and says which, so the log explains what was kept.

Owns: the policy, the latch and the plan (no Lightning here; the Trainer glue is
:mod:`lightning_ckpt.preempting`). Must not: save, exit or touch Lightning's signal handling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from lightning_ckpt.errors import ConfigurationError

#: the manifest's ``extra`` record of the run a preemption checkpoint belongs to (its ``dirpath``)
RUN_KEY = "run"

__all__ = ["Preemption", "SavePlan", "SignalLatch", "plan_save", "requeue_slurm_job"]

#: EX_TEMPFAIL: "temporary failure, try again" -- a preempted run that should be rerun.
DEFAULT_EXIT_CODE = 75


def _signal_number(sig: int | str | signal.Signals) -> int:
    if isinstance(sig, str):
        name = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
        if not hasattr(signal, name):
            raise ConfigurationError(f"unknown signal {sig!r}")
        return int(getattr(signal, name))
    return int(sig)


@dataclass(frozen=True)
class Preemption:
    """What to do when the job is told to stop.

    Args:
        signals: signals that mean "you are about to be stopped" (names or numbers).
        grace_seconds: time from the signal until the hard kill; the save must fit in it.
        safety_margin: seconds kept in reserve for flushing and exiting.
        fallback_dirpath: a fast local directory for the full checkpoint when the primary storage
            is too slow for the time left; ``ckpt_path="last"`` looks there too, at this run's
            checkpoints only (each records its run's ``dirpath``). Give each run its own.
        requeue: under SLURM, ``scontrol requeue`` the job after saving.
        exit_code: the process exit status after a preemption save.
    """

    signals: Sequence[int | str] = ("SIGTERM", "SIGUSR1")
    grace_seconds: float = 60.0
    safety_margin: float = 5.0
    fallback_dirpath: str | None = None
    requeue: bool = False
    exit_code: int = DEFAULT_EXIT_CODE
    signal_numbers: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        numbers = tuple(_signal_number(s) for s in self.signals)
        if not numbers:
            raise ConfigurationError("Preemption needs at least one signal")
        if signal.SIGKILL in numbers:
            raise ConfigurationError("SIGKILL cannot be caught: it cannot announce a preemption")
        if self.grace_seconds < 0 or self.safety_margin < 0:
            raise ConfigurationError("grace_seconds and safety_margin must not be negative")
        if not 0 <= self.exit_code <= 255:
            raise ConfigurationError(f"exit_code={self.exit_code} must be in 0..255")
        object.__setattr__(self, "signal_numbers", numbers)


class SignalLatch:
    """Remembers the first of ``signals`` to arrive; restores the previous handlers on uninstall."""

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Install the handlers; only possible on the main thread (returns False elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    @property
    def previous_handlers(self) -> dict[int, Any]:
        """The handlers that were in place before :meth:`install`, by signal number."""
        return dict(self._previous)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # only the first signal counts: a repeated one (schedulers often send two) changes nothing
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()

    @property
    def triggered(self) -> bool:
        return self.received is not None

    def seconds_left(self, grace_seconds: float) -> float:
        """Grace time left since the signal (the full budget before any signal)."""
        if self.received_at is None:
            return grace_seconds
        return grace_seconds - (time.monotonic() - self.received_at)


@dataclass(frozen=True)
class SavePlan:
    """Where the preemption checkpoint goes and what it holds."""

    kind: str  # "full", "fallback" or "weights"
    reason: str


def plan_save(
    seconds_left: float,
    full_seconds: float | None,
    weights_fraction: float,
    has_fallback: bool,
    fallback_speedup: float = 4.0,
) -> SavePlan:
    """Choose the most complete save that fits in ``seconds_left``.

    ``full_seconds`` is the measured cost of a full save on the primary storage (``None`` before
    any save was measured: then a full save is tried). ``weights_fraction`` is the share of the
    checkpoint's bytes that are model weights. The fallback directory is assumed local and
    ``fallback_speedup`` times faster.
    """
    if full_seconds is None:
        return SavePlan("full", "no save was measured yet in this run: trying the full checkpoint")
    if full_seconds <= seconds_left:
        return SavePlan("full", f"a full save takes ~{full_seconds:.1f} s, {seconds_left:.1f} s left")
    if has_fallback and full_seconds / fallback_speedup <= seconds_left:
        return SavePlan("fallback", f"a full save takes ~{full_seconds:.1f} s but only {seconds_left:.1f} s are "
                                    "left: writing it to the local fallback directory")
    return SavePlan("weights", f"a full save takes ~{full_seconds:.1f} s but only {seconds_left:.1f} s are left: "
                               f"keeping the model weights only (~{full_seconds * weights_fraction:.1f} s); "
                               "optimizer and loop state are lost")


def requeue_slurm_job(run: Callable[..., Any] = subprocess.run) -> str:
    """Requeue the current SLURM job (array jobs too); returns a line for the log."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not running under SLURM (no SLURM_JOB_ID): not requeued"
    try:
        result = run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not requeue SLURM job {job}: {exc}"
    if result.returncode != 0:
        return f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}"
    return f"requeued SLURM job {job}"
