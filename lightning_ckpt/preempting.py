"""Preemption on the Trainer: catch the signal, save what fits at the next safe point, exit with 75.

Part of :class:`~lightning_ckpt.callback.CheckpointCallback` (a mixin). The policy, the signal
latch and the save plan are :mod:`lightning_ckpt.preemption`'s (no Lightning there); this module
is the glue to Lightning: its SIGTERM notifier silenced and its handler bookkeeping kept honest
(through :mod:`lightning_ckpt._lightning`), the preemption save, requeue and exit.

Owns: when a preemption save happens and how the process ends. Must not: choose what to save
beyond the plan, or keep the signals once ``fit`` ends.
"""

from __future__ import annotations

import signal
import warnings

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_ckpt import _lightning
from lightning_ckpt.errors import (
    CheckpointWarning,
)
from lightning_ckpt.io import ManagedCheckpointIO, SaveRequest
from lightning_ckpt.preemption import RUN_KEY, Preemption, SignalLatch, plan_save, requeue_slurm_job

__all__: list[str] = []  # a part of CheckpointCallback: nothing to import from here

class _PreemptionMixin:
    """Preemption glue (see the module docstring); state lives on the callback."""

    def _install_signals(self, trainer: pl.Trainer) -> None:
        """Catch the preemption signals from now until the end of ``fit`` (idempotent).

        Lightning installs its own SIGTERM handler when training starts, which would record the
        signal and end the run at its next check with ``SystemExit`` -- status 0, no checkpoint.
        It keeps calling the handler it found (ours), so its own notifier is turned off instead.
        """
        if self.preemption is None:
            return
        if self._latch is None:
            self._latch = SignalLatch(self.preemption.signal_numbers)
            self._exiting = False
            if not self._latch.install():
                self._latch = None
                warnings.warn("preemption signals can only be caught on the main thread; not installed",
                              CheckpointWarning, stacklevel=2)
                return
        if signal.SIGTERM in self.preemption.signal_numbers:
            _lightning.silence_sigterm_notifier(trainer)

    def _release_signals(self, trainer: pl.Trainer | None = None) -> None:
        latch, self._latch = self._latch, None
        if latch is None:
            return
        originals = _lightning.signal_handlers_to_restore(trainer) if trainer is not None else {}
        # Lightning restores, at its teardown, the handlers it found when training started
        # (ours): have it restore the ones we found instead
        for sig, previous in latch.previous_handlers.items():
            if sig in originals:
                originals[sig] = previous
        latch.uninstall()
        if trainer is not None:
            _lightning.unsilence_sigterm_notifier(trainer)

    def _exit(self, trainer: pl.Trainer, policy: Preemption) -> None:
        """End the process with the preemption status, which a repeated signal can no longer change.

        The signals are ignored from here to the process's end: a Python handler would not do, as
        the interpreter restores the default action (death by the signal, status 143) while it
        shuts down -- though never for an ignored signal. Lightning's teardown is told the same.
        """
        if policy.requeue and trainer.is_global_zero:
            rank_zero_info(f"lightning-ckpt: {requeue_slurm_job()}")
        self._exiting = True
        originals = _lightning.signal_handlers_to_restore(trainer)
        for sig in policy.signal_numbers:
            signal.signal(sig, signal.SIG_IGN)
            if sig in originals:
                originals[sig] = signal.SIG_IGN
        raise SystemExit(policy.exit_code)

    def _exit_before_training(self, trainer: pl.Trainer) -> None:
        """A signal while the checkpoint loaded or the sanity check ran: exit at once, saving nothing.

        No training step ran yet, so there is nothing new to keep: the checkpoint the run resumed
        from (or none, for a fresh run) is where the rerun starts again.
        """
        latch, policy = self._latch, self.preemption
        if latch is None or policy is None or self._exiting:
            return
        if not bool(trainer.strategy.reduce_boolean_decision(latch.triggered, all=False)):
            return
        signame = signal.Signals(latch.received).name if latch.received else "a peer rank's signal"
        rank_zero_info(f"lightning-ckpt: {signame} received before the first training step (while loading or in "
                       "the sanity check): nothing new to save; the rerun starts from "
                       f"{self._resume_source(trainer)}")
        self._exit(trainer, policy)

    @staticmethod
    def _resume_source(trainer: pl.Trainer) -> str:
        io = _lightning.checkpoint_io(trainer.strategy)
        loaded = io.last_loaded if isinstance(io, ManagedCheckpointIO) else None
        return loaded or (trainer.ckpt_path or "scratch (no checkpoint was loaded)")

    def _maybe_preempt(self, trainer: pl.Trainer) -> None:
        """At a safe point after a termination signal: save what fits, requeue, exit."""
        latch, policy = self._latch, self.preemption
        if latch is None or policy is None or self._exiting:
            return
        received = bool(trainer.strategy.reduce_boolean_decision(latch.triggered, all=False))
        if not received:
            return
        self._settle(trainer, wait=True)  # a background save in flight finishes first
        left = latch.seconds_left(policy.grace_seconds) - policy.safety_margin
        size = self._last_full_size
        weights = sum(t.numel() * t.element_size() for t in trainer.lightning_module.state_dict().values())
        plan = plan_save(left, self._full_save_seconds, weights / size if size else 0.5, self._has_fallback)
        plan = trainer.strategy.broadcast(plan)  # rank 0 measured the saves: every rank follows its plan
        signame = signal.Signals(latch.received).name if latch.received else "a peer rank's signal"
        message = (f"lightning-ckpt: {signame} received at epoch {trainer.current_epoch}, step "
                   f"{trainer.global_step}; {plan.reason}")
        rank_zero_info(message)  # the log line, whatever the warning filters
        if plan.kind != "full":
            rank_zero_warn(message, category=CheckpointWarning)
        io = self._install_io(trainer)
        manager = self._fallback_manager(io) if plan.kind == "fallback" else self.manager
        name = "preempted.ckpt"
        request = SaveRequest(
            manager.url, name, epoch=trainer.current_epoch, global_step=trainer.global_step,
            metrics=self._candidates(trainer), monitor=self.monitor,
            mode=self.mode if self.monitor is not None else None, owner=self.owner + "/preempted",
            weights_only=plan.kind == "weights",
            extra={"preempted_by": signame, "plan": plan.kind, RUN_KEY: {"dirpath": self.manager.url}})
        self._last_global_step_saved = trainer.global_step
        _, error = self._write(trainer, request)
        self._save_succeeded(trainer, name, error, must_succeed=True)
        rank_zero_info(f"lightning-ckpt: preemption checkpoint committed: {manager.url_of(name)}")
        self._exit(trainer, policy)
