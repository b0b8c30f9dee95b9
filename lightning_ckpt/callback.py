"""The Lightning callback: decides *when* to save and *what to keep*; the manager does the rest.

:class:`CheckpointCallback` takes ModelCheckpoint's keyword arguments with their meaning, plus
``storage_options``. At every save it hands the Trainer's full checkpoint (weights, optimizer
and scheduler states, loops, callbacks, epoch, step) to :class:`ManagedCheckpointIO`, which
commits it crash-safely with a manifest; retention then deletes only committed checkpoints this
callback wrote, never the newest one nor the one the run resumed from. ``ckpt_path="last"``
resolves to the newest checkpoint that verifies (or a fresh start when there is none yet);
``"best"`` to the best one, also in a new process.

The callback is one object (Lightning finds its hooks there), written in modules named for their
jobs: this one holds the constructor and the hooks -- *when* a save is due, following Lightning's
trigger semantics; :mod:`~lightning_ckpt.saving` builds and hands over the save and accounts for
its outcome; :mod:`~lightning_ckpt.save_names` picks file names; :mod:`~lightning_ckpt.resume`
answers ``ckpt_path="last"`` and continues a resumed run; :mod:`~lightning_ckpt.preempting` is
the preemption glue; :mod:`~lightning_ckpt.bookkeeping` (pure) says what counts and what goes;
:mod:`~lightning_ckpt.configuration` turns the keywords into the policy objects (or takes them
as ``trigger=`` / ``retention=``). Lightning's private API only through :mod:`~lightning_ckpt._lightning`.

Owns: the hooks and the settings. Must not: write, read or delete bytes (the IO and the manager do),
rank or prune by itself (bookkeeping, policies).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.checkpoint import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_ckpt import _lightning, distributed
from lightning_ckpt.bookkeeping import Bookkeeping
from lightning_ckpt.configuration import check_arguments, incremental_of, keeping, schedule
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointWarning,
    ConfigurationError,
)
from lightning_ckpt.incremental import Incremental
from lightning_ckpt.integrity import Manifest
from lightning_ckpt.io import ManagedCheckpointIO, attach_sharded
from lightning_ckpt.layout import History
from lightning_ckpt.manager import CheckpointManager
from lightning_ckpt.policies import OverheadBudget, RetentionPolicy, SaveTrigger
from lightning_ckpt.preempting import _PreemptionMixin
from lightning_ckpt.preemption import Preemption, SignalLatch
from lightning_ckpt.progress import terminal_bar
from lightning_ckpt.resume import _make_train_loader_stateful, _mute_last_hint, _ResumeMixin
from lightning_ckpt.save_names import _SaveNamesMixin
from lightning_ckpt.saving import _InFlight, _SavingMixin
from lightning_ckpt.security import Encryptor, Signer
from lightning_ckpt.storage import RetryPolicy, Storage

__all__ = ["CheckpointCallback"]


class CheckpointCallback(_ResumeMixin, _SavingMixin, _SaveNamesMixin, _PreemptionMixin, ModelCheckpoint):
    """Save Lightning checkpoints to any fsspec URL, crash-safely and verified.

    Every argument of the installed Lightning's :class:`lightning.pytorch.callbacks.ModelCheckpoint`
    is accepted, in the same order and with the same default and meaning (a test compares the two
    signatures); ours follow as keyword-only arguments. Where the behaviour deliberately differs
    (only committed checkpoints count, files we did not write are never touched) the README's
    "where we differ, and why" table says so.

    Args:
        dirpath: directory path or URL (``/runs/x``, ``file://``, ``memory://``, ``s3://``, ``gs://``,
            ``az://`` ...). ``None``: ``<log_dir>/checkpoints`` as in Lightning.
        filename: name template, e.g. ``"{epoch}-{val_loss:.3f}"``; default ``"{epoch}-{step}"``.
        monitor: logged metric to rank checkpoints by (also ``"epoch"`` or ``"step"``);
            ``None`` keeps the latest.
        mode: ``"min"`` or ``"max"``.
        save_top_k: how many to keep: ``k`` best, ``-1`` all, ``0`` none (with ``monitor=None``
            only ``-1``, ``0`` or ``1``).
        save_last: also keep ``last.ckpt`` whenever a checkpoint is saved (as Lightning). ``True``:
            when the same state was just saved under its own name, a hard link to it on a local
            disk (a server-side copy on object stores) -- the same bytes, so not a backup;
            ``"copy"``: always an independent file; ``"link"`` (Lightning's): ``last.ckpt`` points at
            the newest checkpoint saved (a hard link locally, a server-side copy on object stores).
        save_on_exception: when another callback or the training step raises, save the state first
            (as Lightning: ``{filename}`` plus ``last.ckpt``); never masks the error.
        auto_insert_metric_name: ``"{epoch}"`` formats as ``epoch=3``; ``False``: as ``3``.
        enable_version_counter: a name already taken gets ``-v1``, ``-v2``, ... (as Lightning);
            ``False`` replaces our own file of that name (never a file we did not write).
        every_n_epochs: save at the end of every n-th epoch (default 1 when no other trigger).
        every_n_train_steps: save every n optimizer steps.
        train_time_interval: save when this much wall time passed since the last save.
        overhead_budget: the fraction of training time saving may cost, e.g. ``0.01`` (1 %): the
            interval between saves is derived from each save's measured blocking cost
            (``cost / budget``, at least a minute; the first save at the first epoch end or after
            10 minutes). An :class:`~lightning_ckpt.policies.OverheadBudget` sets those bounds.
            Exclusive with the three triggers above.
        save_weights_only: save only the model weights (no optimizer, loops or callbacks).
        save_on_train_epoch_end: save at train-epoch end rather than after validation
            (``None``: decided as in Lightning).
        storage_options: fsspec options (endpoint, credentials, ...) used for every operation.
        verbose: log Lightning's line at every top-k decision (``'val_loss' reached 0.12345
            (best 0.12345), saving model to ... as top 3`` / ``was not in top 3``).
        retry: retry policy for transient storage errors.
        fail_on_save_error: fail the run on any failed save. By default a failed periodic save warns
            loudly (older checkpoints stay intact) and the next save tries again; the final save of
            a run and a preemption save always fail the run.
        async_save: block training only for a snapshot of the state into host buffers (allocated once,
            reused); serialize, write, commit and retention run in a background thread. At most one
            save persists at a time.
        when_busy: with ``async_save``, what a save does while the previous one still persists:
            ``"wait"`` for it, or ``"skip"`` this save (counted, with a warning).
        exact_resume: store every random stream and the train loader's position, so a resumed
            run is bit-identical to an uninterrupted one; plain ``DataLoader``s are rebuilt as
            torchdata ``StatefulDataLoader``s (same batches) to make their position restorable.
            A save due before a validation, at an epoch's last batch or inside a
            gradient-accumulation window is taken at the next point a resume can be exact from;
            where one cannot be (README, "Exact resume"), the first such save warns.
        preemption: on SIGTERM/SIGUSR1 (see :class:`~lightning_ckpt.preemption.Preemption`), save at the
            next safe point within the grace period, optionally requeue under SLURM, and exit with a
            distinct status (75). ``True`` uses the defaults.
        signer: sign manifests (HMAC-SHA256) and refuse unsigned or tampered checkpoints.
        encryptor: encrypt payloads at rest (AES-256-GCM); stock ``torch.load`` can then no longer
            read them.
        incremental: store a tensor only once per directory while its bytes do not change; every
            checkpoint stays complete (README, "Incremental checkpoints"). Sharded saves stay full.

    Attributes ``best_model_path``, ``best_model_score``, ``last_model_path``, ``best_k_models`` and
    ``kth_best_model_path`` are maintained as in Lightning and rebuilt from storage on resume.

    This class subclasses ``ModelCheckpoint`` only so that ``Trainer.fit(ckpt_path="last")`` asks
    it for the last checkpoint; it does not run ModelCheckpoint's constructor or saving code.
    """

    #: With several processes, how long a rank waits for the others where they exchange what a
    #: save decision depends on; a rank that does not come by then fails the run with
    #: :class:`~lightning_ckpt.errors.RanksDisagreeError` instead of leaving the others hanging.
    decision_timeout: timedelta = timedelta(minutes=5)

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link", "copy"] | None = None,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        *,
        overhead_budget: float | OverheadBudget | None = None,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        fail_on_save_error: bool = False,
        async_save: bool = False,
        when_busy: str = "wait",
        exact_resume: bool = True,
        preemption: Preemption | bool | None = None,
        signer: Signer | None = None,
        encryptor: Encryptor | None = None,
        trigger: SaveTrigger | None = None,
        retention: RetentionPolicy | None = None,
        incremental: bool | Incremental = False,
    ) -> None:
        Checkpoint.__init__(self)
        _lightning.require_last_checkpoint_hook()
        check_arguments(mode=mode, save_last=save_last, filename=filename, storage_options=storage_options,
                        when_busy=when_busy, preemption=preemption, preemption_type=Preemption)
        kept = keeping(save_top_k, monitor, mode, retention)
        monitor, mode, save_top_k = kept.monitor, kept.mode, kept.save_top_k
        when = schedule(every_n_epochs, every_n_train_steps, train_time_interval, overhead_budget, trigger)
        budget = when.budget

        self.save_on_exception = bool(save_on_exception)
        self.auto_insert_metric_name = bool(auto_insert_metric_name)
        self._enable_version_counter = bool(enable_version_counter)
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.save_weights_only = save_weights_only
        self.filename = filename
        self.verbose = verbose
        self.storage_options = dict(storage_options or {})
        self.retry = retry
        self.exact_resume = exact_resume
        self.signer, self.encryptor = signer, encryptor
        self.fail_on_save_error = fail_on_save_error
        self.async_save = bool(async_save)
        self.incremental = incremental_of(incremental)  #: the run's shortcut cache (None: full saves)
        self.when_busy = when_busy
        self._pending: list[_InFlight] = []
        self._last_copied: str | None = None  # the save whose background copy to last.ckpt succeeded
        self._last_waiting: tuple[str, str] | None = None  # (last's name, the save it waits for)
        self._decision_group: tuple[Any, Any] | None = None  # (the world group it belongs to, the group)
        self.failed_saves = 0
        self.preemption: Preemption | None = Preemption() if preemption is True else (preemption or None)
        self._latch: SignalLatch | None = None
        self._exiting = False  # a preemption exit is under way
        self._full_save_seconds: float | None = None
        self._last_full_size = 0
        self._rng_to_restore: dict[str, Any] | None = None
        self._generators_to_restore: list[torch.Tensor] | None = None
        self._inexact_warned: set[str] = set()
        self._deferred_validation_save = False  # a validation-end save due after the optimizer step
        self._loader_states: list[dict[str, Any]] | None = None
        self._deferred_step: int | None = None
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self._every_n_train_steps = when.every_n_train_steps
        self._train_time_interval = when.train_time_interval
        self.overhead_budget = budget
        self._every_n_epochs = when.every_n_epochs
        self.trigger: SaveTrigger | None = when.trigger
        self._schedule = when  # being due depends on the wall clock (when.clocked): rank 0 decides
        self._provisional: Manifest | None = None
        # the budget's clock both times saves and says when one is due (injectable in tests)
        self._clock: Callable[[], float] = budget.clock if budget is not None else time.monotonic
        self.retention: RetentionPolicy = kept.retention

        self.dirpath: str | None = None
        self._dirpath_arg = os.fspath(dirpath) if dirpath is not None else None
        self._resumed_earlier_version: str | None = None  # see _earlier_version_checkpoint
        self._manager: CheckpointManager | None = None
        if self._dirpath_arg is not None:
            # parse the URL now: an unknown protocol or a missing backend fails here (manager: on first use)
            self.dirpath = Storage(self._dirpath_arg, self.storage_options, retry).url

        # Lightning-compatible bookkeeping
        self.best_k_models: dict[str, torch.Tensor] = {}
        self.kth_best_model_path = ""
        self.best_model_score: torch.Tensor | None = None
        self._best_model_path = ""
        self.last_model_path = ""
        self.current_score: torch.Tensor | None = None
        self.kth_value = torch.tensor(math.inf if mode == "min" else -math.inf)
        self.resumed_from: str | None = None
        self._loaded_epoch: int | None = None  # the resumed checkpoint's epoch, for the resume log line
        #: top-k / best / last: our records and what retention keeps of them
        self._book = Bookkeeping(self.retention, monitor, mode, save_top_k)
        self._last_global_step_saved = 0
        self._last_time_saved = self._clock()
        self._last_saved_name: tuple[int, str] | None = None
        # Lightning's own names for the same facts (its hooks and tests read them)
        self._last_checkpoint_saved = ""
        self._last_time_checked: float | None = None
        self._defer_save_until_validation = False
        self._migrated: dict[str, Any] | None = None
        #: this fit's training history (a fresh run, continuing what it resumed from)
        self.history: History = History.new()
        self._versioned_names: set[str] = set()  # names already reported as taken (warned once)

    # -- identity -------------------------------------------------------------------------

    def format_checkpoint_name(
        self,
        metrics: dict[str, Any],
        filename: str | None = None,
        ver: int | None = None,
        prefix: str | None = None,
    ) -> str:
        """Lightning's name, as saved: a ``/`` from a metric name (``{val/loss}``) becomes ``_``."""
        path = super().format_checkpoint_name(metrics, filename, ver, prefix)
        head = os.path.join(self.dirpath, "") if self.dirpath else ""
        return head + path[len(head):].replace("/", "_")

    @property
    def state_key(self) -> str:
        """Lightning's own key for a ``ModelCheckpoint`` of these settings.

        So a checkpoint written by stock ``ModelCheckpoint`` restores this callback's bookkeeping,
        code reading ``checkpoint["callbacks"]`` by Lightning's key finds ours, and stock
        ``ModelCheckpoint`` restores from ours. An ``overhead_budget`` (which stock Lightning lacks)
        joins the key only when set.
        """
        return "ModelCheckpoint" + repr(self._state_key_fields())

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        # the key older versions of this callback wrote; Lightning looks it up when state_key is absent
        return type(self).__qualname__ + repr(self._state_key_fields())

    def _state_key_fields(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "every_n_train_steps": self._every_n_train_steps,
            "every_n_epochs": self._every_n_epochs,
            "train_time_interval": self._train_time_interval,
            **self._schedule.key_fields(),
        }

    @property
    def _fs(self) -> Any:
        """ModelCheckpoint's ``_fs`` (for its inherited helpers): Lightning's filesystem of ``dirpath``
        with our storage options. Our own code never uses it: all I/O goes through ``manager.storage``."""
        from lightning.fabric.utilities.cloud_io import get_filesystem

        return get_filesystem(self.manager.url, **self.storage_options)

    @property
    def owner(self) -> str:
        """The tag written into manifests so retention only ever touches this callback's files."""
        return f"{type(self).__name__}{{monitor={self.monitor},mode={self.mode},filename={self.filename}}}"

    def _open_directory(self, path: str) -> None:
        """``dirpath`` parsed once: its manager (the one Storage of it) says its URL."""
        self._manager = CheckpointManager(path, self.storage_options, self.retry,
                                          signer=self.signer, encryptor=self.encryptor)
        self.dirpath = self._manager.url

    @property
    def manager(self) -> CheckpointManager:
        """The manager of ``dirpath`` (available once the trainer set the callback up)."""
        if self._manager is None:
            if self.dirpath is None:
                raise ConfigurationError("dirpath is not resolved yet: the callback has not been set up")
            self._manager = CheckpointManager(self.dirpath, self.storage_options, self.retry,
                                              signer=self.signer, encryptor=self.encryptor)
        return self._manager

    @property
    def best_model_path(self) -> str:
        """Path of the best checkpoint; in a new process, looked up in storage on first use."""
        if not self._best_model_path and self.monitor is not None and self.dirpath is not None:
            best = self._discover_best()
            if best is not None:
                self._best_model_path = self.manager.url_of(best.name)
        return self._best_model_path

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        self._best_model_path = value

    # -- setup and resume -----------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _mute_last_hint(False)
        if stage == TrainerFn.FITTING.value:
            self._install_signals(trainer)
        if distributed.active():
            world = torch.distributed.group.WORLD
            if self._decision_group is None or self._decision_group[0] is not world:
                self._decision_group = (world, distributed.decision_group(self.decision_timeout))
        if self.dirpath is None:
            self._open_directory(self._resolve_dirpath(trainer))
        io = self._install_io(trainer)
        io.model = pl_module
        if _lightning.bypasses_checkpoint_io(trainer.strategy):
            attach_sharded(trainer.strategy, io)
        if stage == TrainerFn.FITTING.value and self.exact_resume:
            _make_train_loader_stateful(trainer)
        if stage == TrainerFn.FITTING.value:
            if trainer.global_step == 0:  # a second fit() on the same trainer continues its state: same history
                self.history = History.new()
            self._versioned_names = set()
        if stage == TrainerFn.FITTING.value and trainer.is_global_zero:
            self.manager.storage.check_directory()
            removed = self.manager.cleanup()
            if removed:
                rank_zero_info(f"lightning-ckpt: removed leftovers of interrupted saves: {', '.join(removed)}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_before_training(trainer)
        self._continue_after_load(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse an optimizer state that does not fit, naming what differs, before Lightning loads it."""
        self._check_optimizer_fits(trainer, pl_module)

    # -- triggers (Lightning's semantics) -------------------------------------------------

    def _should_skip_saving_checkpoint(self, trainer: pl.Trainer) -> bool:
        return (
            bool(getattr(trainer, "fast_dev_run", False))
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_global_step_saved == trainer.global_step
        )

    def _should_save_on_train_epoch_end(self, trainer: pl.Trainer) -> bool:
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        if _lightning.val_check_time_interval(trainer) is not None:
            return False  # time-based validation: save after it, as Lightning
        if trainer.check_val_every_n_epoch != 1:
            return False
        num_val_batches = trainer.num_val_batches
        total = sum(num_val_batches) if isinstance(num_val_batches, list) else num_val_batches
        if total == 0:
            return True
        return trainer.val_check_interval == 1.0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.exact_resume and _lightning.accumulating(trainer):
            # the gradients accumulated so far are in no checkpoint: save (or stop) after the step
            return
        if self._deferred_validation_save:  # a validation ended inside this accumulation window
            self._deferred_validation_save = False
            self._save_on_validation(trainer)
        # Lightning skips a validation that was due at the restart point, so a checkpoint taken
        # now would resume without the random draws (and metrics) of that validation; and after an
        # epoch's last batch it resumes into the next epoch with a loader iterator made before the
        # random streams are restored. So take it right after the validation or at the epoch's end
        # instead (same weights, fresher metrics); so does preemption
        later = self.exact_resume and (_lightning.validation_follows(trainer) or _lightning.epoch_ends(trainer))
        if self.trigger is None or self._should_skip_saving_checkpoint(trainer):
            if not later:
                self._maybe_preempt(trainer)
            return
        due = self.trigger.due_on_step(trainer.global_step, self._clock(), self._last_time_saved)
        if self._schedule.clocked:
            due = bool(trainer.strategy.broadcast(due))  # ranks' clocks differ; rank 0 decides
        if not due:
            if not later:
                self._maybe_preempt(trainer)
            return
        self._last_time_checked = self._clock()
        if self.monitor is not None and self.monitor not in self._candidates(trainer):
            # as Lightning: the monitored value is not logged yet (validation-only): save after validation
            self._defer_save_until_validation = True
            return
        lightning_defers = (self.monitor is not None and not self._should_save_on_train_epoch_end(trainer)
                            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if later or (lightning_defers and _lightning.validation_follows(trainer)):
            self._deferred_step = trainer.global_step
            return
        self._save_step(trainer)
        self._maybe_preempt(trainer)

    def _save_step(self, trainer: pl.Trainer) -> None:
        self._deferred_step = None
        candidates = self._candidates(trainer)
        self._save_topk(trainer, candidates)
        self._save_last(trainer, candidates)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._deferred_step is not None:  # the predicted validation did not run: save now
            self._save_step(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred_step is not None:
            self._save_step(trainer)
        if self._deferred_validation_save:
            self._deferred_validation_save = False
            self._save_on_validation(trainer)
        if not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._save_on_epoch(trainer)
        self._maybe_preempt(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred_step is not None and not trainer.sanity_checking:
            self._save_step(trainer)
        if (self.exact_resume and not trainer.sanity_checking and _lightning.accumulating(trainer)
                and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)):
            # a validation inside a gradient-accumulation window: the gradients accumulated so far
            # are in no checkpoint, so take this save right after the window's optimizer step
            self._deferred_validation_save = True
            return
        self._save_on_validation(trainer)
        if not trainer.sanity_checking:
            self._maybe_preempt(trainer)

    def _save_on_validation(self, trainer: pl.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            if self._defer_save_until_validation:
                self._defer_save_until_validation = False
                self._save_step(trainer)
            else:
                self._save_on_epoch(trainer)

    def _save_on_epoch(self, trainer: pl.Trainer) -> None:
        candidates = self._candidates(trainer)
        if self.trigger is not None and self.trigger.due_on_epoch(trainer.current_epoch):
            self._save_topk(trainer, candidates)
        # as Lightning: last.ckpt follows a save of this event ("link": it points at the newest saved)
        if self._last_global_step_saved == trainer.global_step or (
            self.save_last == "link" and self._last_checkpoint_saved
        ):
            self._save_last(trainer, candidates)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wait for background saves: a run ends with its checkpoints durable (or fails saying why).

        As Lightning, a run that never saved anything still ends with ``last.ckpt`` when asked for.
        """
        if self.save_last and not self._last_checkpoint_saved:
            self._save_last(trainer, self._candidates(trainer))
        self._settle(trainer, wait=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Abandon background saves (nothing half-written becomes visible); with ``save_on_exception``
        save the state as Lightning does; never mask the error."""
        if not self._exiting:  # a preemption exit keeps its handlers: a second signal changes nothing
            self._release_signals(trainer)
        io = _lightning.checkpoint_io(trainer.strategy)
        if self._pending and isinstance(io, ManagedCheckpointIO):
            io.abandon()
        self._pending, self._last_waiting = [], None
        if self.dirpath is None or self._exiting or not self._should_save_on_exception(trainer):
            return
        candidates = self._candidates(trainer)
        try:
            name = self._unique_name(trainer, candidates, None)
            record = self._save(trainer, name, candidates, self.owner + "/exception", sync=True)
            if record is not None:
                self._save_last(trainer, candidates)
        except CheckpointError as exc:  # the run fails with its own error, not ours
            rank_zero_warn(f"lightning-ckpt: could not save on {type(exception).__name__}: {exc}",
                           category=CheckpointWarning)
            return
        if record is not None:
            rank_zero_info(f"An {type(exception).__name__} was raised with message: {exception}, "
                           f"saved checkpoint to {self.manager.url_of(name)}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        latch, policy = self._latch, self.preemption
        if latch is not None and policy is not None and latch.triggered and not self._exiting:
            # the signal came after the last safe point (during the final save, or Lightning's own
            # teardown): every checkpoint of the run is committed, and the exit says preempted
            signame = signal.Signals(latch.received).name if latch.received else "a signal"
            rank_zero_info(f"lightning-ckpt: {signame} received while the run ended; its checkpoints are committed")
            self._exit(trainer, policy)
        self._release_signals(trainer)

    # -- signals ------------------------------------------------------------------------------

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_before_training(trainer)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # a sanity check can take long: do not wait for its end -- with one process only, since with
        # several the ranks' numbers of validation batches need not match (the decision is a collective)
        if trainer.sanity_checking and trainer.world_size == 1:
            self._exit_before_training(trainer)

    # -- preemption -----------------------------------------------------------------------

    # -- saving -----------------------------------------------------------------------------

    # -- Lightning state --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best_model_score": self.best_model_score,
            "best_model_path": self._best_model_path,
            "current_score": self.current_score,
            "dirpath": self.dirpath,
            "best_k_models": self.best_k_models,
            "kth_best_model_path": self.kth_best_model_path,
            "kth_value": self.kth_value,
            "last_model_path": self.last_model_path,
            "world_size": distributed.world_size(),
            **(self._rng_state() if self.exact_resume else {}),
        }

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Add the train loaders' own generators (``DataLoader(generator=...)``) to this callback's state."""
        self._add_loader_generators(trainer, checkpoint)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """At another world size, drop the train loader's position (it belongs to another sharding).

        Each rank's share of an epoch depends on the number of ranks (``DistributedSampler``), so a
        position inside an epoch cannot carry over exactly: the interrupted epoch's data starts over
        on the new ranks, with a warning. Steps already taken stay taken (``global_step`` goes on).
        At the same world size the positions are kept: a mid-epoch resume may have to load them again.
        """
        self._loaded_epoch = checkpoint.get("epoch")
        self._adapt_to_world_size(trainer, checkpoint)
        if self.exact_resume:
            fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
            self._loader_states = fit_loop.get("state_dict", {}).get("combined_loader") or None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore_state(state_dict)


#: the progress bar of long transfers on rank 0's terminal (kept under its old name)
_terminal_bar = terminal_bar
