"""The Lightning callback: decides *when* to save and *what to keep*; the manager does the rest.

:class:`CheckpointCallback` takes ModelCheckpoint's keyword arguments with their meaning, plus
``storage_options``. At every save it hands the Trainer's full checkpoint (weights, optimizer
and scheduler states, loops, callbacks, epoch, step) to :class:`ManagedCheckpointIO`, which
commits it crash-safely with a manifest; retention then deletes only committed checkpoints this
callback wrote, never the newest one nor the one the run resumed from. ``ckpt_path="last"``
resolves to the newest checkpoint that verifies (or a fresh start when there is none yet);
``"best"`` to the best one, also in a new process.
"""

from __future__ import annotations

import math
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal, NamedTuple
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.checkpoint import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_ckpt import _lightning, distributed
from lightning_ckpt.bookkeeping import Bookkeeping
from lightning_ckpt.async_saver import PendingSave
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    ConfigurationError,
    IncompatibleCheckpointError,
    MonitorNotFoundError,
    RanksDisagreeError,
)
from lightning_ckpt.integrity import Manifest, manifest_name, metrics_to_floats
from lightning_ckpt.layout import History
from lightning_ckpt.io import ManagedCheckpointIO, SaveOutcome, SaveRequest, attach_sharded
from lightning_ckpt.manager import CheckpointManager, SaveResult
from lightning_ckpt.naming import EXTENSION, LAST_NAME, format_checkpoint_name, validate_template, versioned_name
from lightning_ckpt.policies import (
    MODES,
    EveryInterval,
    EveryNEpochs,
    EveryNSteps,
    KeepAll,
    KeepLatest,
    KeepTopK,
    OverheadBudget,
    RetentionPolicy,
    SaveTrigger,
    is_last_copy,
    rank_value,
)
from lightning_ckpt.preemption import Preemption, SignalLatch, plan_save, requeue_slurm_job

#: the manifest's ``extra`` record of the run a preemption checkpoint belongs to (its ``dirpath``)
RUN_KEY = "run"
from lightning_ckpt.progress import TransferProgress
from lightning_ckpt.resumable import (
    adapt_optimizer_states,
    is_stateful,
    loader_generators,
    make_stateful,
    optimizer_mismatch,
    stateful_loader_class,
)
from lightning_ckpt.rng import capture_rng, restore_rng
from lightning_ckpt.security import Encryptor, Signer
from lightning_ckpt.sharded import ShardedPendingSave
from lightning_ckpt.storage import RetryPolicy, Storage, split_url

__all__ = ["CheckpointCallback"]

#: ``Manifest.extra`` flag of a checkpoint ModelCheckpoint wrote (no manifest) that a migrated run ranks
ADOPTED = "adopted_from_model_checkpoint"

#: what ``save_last`` accepts: Lightning's values plus ``"copy"`` (two independent files)
SAVE_LAST_MODES = (None, True, False, "link", "copy")


class CheckpointCallback(ModelCheckpoint):
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
    ) -> None:
        Checkpoint.__init__(self)
        _lightning.require_last_checkpoint_hook()
        if mode not in MODES:
            raise ConfigurationError(f"mode={mode!r} must be one of {MODES}")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigurationError(f"save_top_k={save_top_k!r} must be an integer >= -1")
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ConfigurationError(
                f"save_top_k={save_top_k} with monitor=None has no quantity to rank by: "
                "pass monitor=... or use save_top_k in (-1, 0, 1)"
            )
        if save_last not in SAVE_LAST_MODES:
            raise ConfigurationError(f"save_last={save_last!r} must be one of {SAVE_LAST_MODES}")
        if filename is not None:
            validate_template(filename)
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ConfigurationError(f"storage_options must be a dict, got {type(storage_options).__name__}")
        for arg, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigurationError(f"{arg}={value!r} must be a non-negative integer")
        if train_time_interval is not None and not isinstance(train_time_interval, timedelta):
            raise ConfigurationError("train_time_interval must be a datetime.timedelta")
        budget = overhead_budget if isinstance(overhead_budget, OverheadBudget) or overhead_budget is None \
            else OverheadBudget(overhead_budget)
        chosen = [
            name
            for name, on in (
                ("every_n_epochs", bool(every_n_epochs)),
                ("every_n_train_steps", bool(every_n_train_steps)),
                ("train_time_interval", train_time_interval is not None),
                ("overhead_budget", budget is not None),
            )
            if on
        ]
        if len(chosen) > 1:
            raise ConfigurationError(f"{' and '.join(chosen)} are mutually exclusive: choose one save trigger")

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
        if when_busy not in ("wait", "skip"):
            raise ConfigurationError(f"when_busy={when_busy!r} must be 'wait' or 'skip'")
        self.async_save = bool(async_save)
        self.when_busy = when_busy
        self._pending: list[_InFlight] = []
        self._last_copied: str | None = None  # the save whose background copy to last.ckpt succeeded
        self._last_waiting: tuple[str, str] | None = None  # (last's name, the save it waits for)
        self._decision_group: tuple[Any, Any] | None = None  # (the world group it belongs to, the group)
        self.failed_saves = 0
        if preemption is not None and not isinstance(preemption, (bool, Preemption)):
            raise ConfigurationError("preemption must be True, False, None or a Preemption(...)")
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
        self._every_n_train_steps = every_n_train_steps or 0
        self._train_time_interval = train_time_interval
        self.overhead_budget = budget
        if every_n_epochs is None:  # as Lightning: 1 only when no other trigger was given at all
            no_other = every_n_train_steps is None and train_time_interval is None and budget is None
            every_n_epochs = 1 if no_other else 0
        self._every_n_epochs = every_n_epochs
        self.trigger: SaveTrigger | None = budget or _trigger(every_n_epochs, every_n_train_steps, train_time_interval)
        self._provisional: Manifest | None = None
        # the budget's clock both times saves and says when one is due (injectable in tests)
        self._clock: Callable[[], float] = budget.clock if budget is not None else time.monotonic
        self.retention: RetentionPolicy = _retention(save_top_k, monitor, mode)

        self.dirpath: str | None = None
        self._dirpath_arg = os.fspath(dirpath) if dirpath is not None else None
        self._resumed_earlier_version: str | None = None  # see _earlier_version_checkpoint
        if self._dirpath_arg is not None:
            # parse the URL now: an unknown protocol or a missing fsspec backend fails here
            self.dirpath = Storage(self._dirpath_arg, self.storage_options, retry).url
        self._manager: CheckpointManager | None = None

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
        budget = {} if self.overhead_budget is None else {"overhead_budget": self.overhead_budget.budget}
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "every_n_train_steps": self._every_n_train_steps,
            "every_n_epochs": self._every_n_epochs,
            "train_time_interval": self._train_time_interval,
            **budget,
        }

    @property
    def _fs(self) -> Any:
        """The fsspec filesystem of ``dirpath`` with our storage options (ModelCheckpoint's ``_fs``)."""
        return self.manager.storage.fs

    @property
    def owner(self) -> str:
        """The tag written into manifests so retention only ever touches this callback's files."""
        return f"{type(self).__name__}{{monitor={self.monitor},mode={self.mode},filename={self.filename}}}"

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
            self.dirpath = Storage(self._resolve_dirpath(trainer), self.storage_options, self.retry).url
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

    def _resolve_dirpath(self, trainer: pl.Trainer) -> str:
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir or trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return os.path.join(save_dir, str(logger.name), version, "checkpoints")
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def _install_io(self, trainer: pl.Trainer) -> ManagedCheckpointIO:
        strategy = trainer.strategy
        current = _lightning.checkpoint_io(strategy)
        if not isinstance(current, ManagedCheckpointIO):
            if current is not None and type(current).__name__ != "TorchCheckpointIO":
                warnings.warn(
                    f"lightning-ckpt replaces the strategy's {type(current).__name__} to save and verify "
                    "checkpoints; remove the plugin to silence this warning",
                    CheckpointWarning,
                    stacklevel=2,
                )
            current = ManagedCheckpointIO(self.storage_options, signer=self.signer, encryptor=self.encryptor)
            current.transfer_progress = _terminal_bar if trainer.is_global_zero else None
            strategy.checkpoint_io = current
        current.register(self.manager)
        return current

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """Lightning's hook for ``ckpt_path="last"``: the newest checkpoint that verifies."""
        if trainer.state.fn == TrainerFn.FITTING:
            self._install_signals(trainer)  # verifying a large checkpoint takes a while
        if self.dirpath is None:
            self.dirpath = Storage(self._resolve_dirpath(trainer), self.storage_options, self.retry).url
        io = self._install_io(trainer)
        managers = [self.manager] + ([self._fallback_manager(io)] if self._has_fallback else [])
        found = []
        for manager in managers:
            # a weights-only file cannot continue training: never pick one to resume from; from the
            # fallback directory (which runs may share) only this run's own preemption saves
            def where(m: Manifest, fallback: bool = manager is not self.manager) -> bool:
                return (not m.weights_only or self.save_weights_only) and (not fallback or self._is_ours(m, manager))

            manifest = manager.latest(keep=True, where=where)
            if manifest is not None:
                found.append((manifest.global_step or 0, manifest.created, manager, manifest))
        note = ""
        if not found:
            stock = self._stock_last()
            if stock is not None:
                rank_zero_warn(f"lightning-ckpt: no committed checkpoint in {self.dirpath}; resuming from "
                               f"{stock}, written without a manifest (by ModelCheckpoint?): it is not verified",
                               category=CheckpointWarning)
                return {stock if not self.storage_options else io.resume_pointer(stock)}
            earlier = self._earlier_version_checkpoint(trainer)
            if earlier is None:
                self._refuse_unverified_only()
                rank_zero_info(f"lightning-ckpt: no committed checkpoint in {self.dirpath} yet; starting fresh")
                # Lightning follows with "HINT: Set ModelCheckpoint(..., save_last=True)", which does not
                # apply to this callback: silence exactly that warning until setup() (the next hook)
                _mute_last_hint(True)
                return set()
            found.append((0, 0.0, *earlier))
            self._resumed_earlier_version = earlier[0].url
            rank_zero_info(
                f"lightning-ckpt: no committed checkpoint in {self.dirpath}, a new version directory (without "
                f"dirpath= every run gets one): continuing the newest checkpoint of an earlier run of this logger, "
                f"{earlier[0].url_of(earlier[1].name)}; set dirpath= to keep a run's checkpoints in one place"
            )
        *_, manager, latest = max(found, key=lambda f: (f[0], f[1]))
        stock = self._stock_last(newer_than=latest.created) if manager is self.manager else None
        if stock is not None:
            # ModelCheckpoint continued this run after our last commit (its last-vN.ckpt is newer):
            # resuming our older checkpoint would silently drop its epochs
            rank_zero_warn(f"lightning-ckpt: {stock}, written without a manifest (by ModelCheckpoint?), is newer "
                           f"than the newest committed checkpoint {latest.name}; resuming from it: it is not "
                           "verified", category=CheckpointWarning)
            return {stock if not self.storage_options else io.resume_pointer(stock)}
        url = manager.url_of(latest.name)
        # Lightning stats the path with a filesystem built without storage options (and a sharded
        # checkpoint is a directory, which object stores cannot stat)
        return {url if not (self.storage_options or latest.sharded) else io.resume_pointer(url)}

    def _earlier_version_checkpoint(self, trainer: pl.Trainer) -> tuple[CheckpointManager, Manifest] | None:
        """With the default dirpath, the newest resumable checkpoint of the logger's earlier versions.

        Lightning gives every run a new ``<save_dir>/<name>/version_N``, so ``ckpt_path="last"``
        would never see the previous run's checkpoints: the highest ``version_K`` (K < N) holding a
        committed checkpoint is the run to continue. Only the same logger name counts (another name
        is another experiment), and only numbered versions (a named version is the same directory
        every run). Nothing there is written or deleted: the new run saves into its own directory.
        """
        if self._dirpath_arg is not None or not trainer.loggers:
            return None
        logger = trainer.loggers[0]
        current = logger.version
        if not isinstance(current, int):
            return None
        root = Storage(os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name)),
                       self.storage_options, self.retry)
        versions = sorted((int(d[8:]) for d in root.dirs() if re.fullmatch(r"version_\d+", d)), reverse=True)
        for version in (v for v in versions if v < current):
            manager = CheckpointManager(root.url_of(f"version_{version}/checkpoints"), self.storage_options,
                                        self.retry, signer=self.signer, encryptor=self.encryptor)
            manifest = manager.latest(keep=True, where=lambda m: not m.weights_only or self.save_weights_only)
            if manifest is not None:
                return manager, manifest
        return None

    def _is_ours(self, manifest: Manifest, manager: CheckpointManager) -> bool:
        """Whether a checkpoint in the fallback directory was saved by this run (same ``dirpath``);
        another run's is ignored, with a warning, so a new experiment never resumes an old one."""
        run = manifest.extra.get(RUN_KEY)
        owner = run.get("dirpath") if isinstance(run, dict) else None
        if owner == self.manager.url:
            return True
        rank_zero_warn(
            f"lightning-ckpt: ignoring {manager.url_of(manifest.name)}: a preemption checkpoint of another run "
            f"({'dirpath ' + str(owner) if owner else 'no run recorded'}), not of {self.manager.url}",
            category=CheckpointWarning,
        )
        return False

    def _stock_last(self, newer_than: float | None = None) -> str | None:
        """A ``last.ckpt`` that stock ModelCheckpoint wrote here (no manifest, not an interrupted save of
        ours): the newest one, and with ``newer_than`` (a POSIX time) only one modified after it."""
        pattern = re.compile(rf"^{re.escape(LAST_NAME)}(-(\d+))?(-v\d+)?{re.escape(EXTENSION)}$")
        names = [n for n in self.manager.scan().unmanaged if pattern.match(n)]
        if not names:
            return None
        fs = self.manager.storage.fs
        modified = {self.manager.url_of(n): fs.modified(self.manager.url_of(n)).timestamp() for n in names}
        newest = max(modified, key=modified.__getitem__)
        return newest if newer_than is None or modified[newest] > newer_than else None

    def _refuse_unverified_only(self) -> None:
        """``"last"`` in a directory holding only checkpoints without manifests (and no stock
        ``last.ckpt``): not "empty" -- fail rather than start fresh and later write beside them."""
        unmanaged = self.manager.scan().unmanaged
        if unmanaged:
            raise CheckpointNotFoundError(
                f'ckpt_path="last": {self.dirpath} holds {len(unmanaged)} checkpoint(s) without a lightning-ckpt '
                f"manifest ({', '.join(unmanaged[:3])}{', ...' if len(unmanaged) > 3 else ''}) and no last.ckpt; "
                "pass ckpt_path=<one of them> to resume from it unverified"
            )

    @property
    def _has_fallback(self) -> bool:
        return self.preemption is not None and self.preemption.fallback_dirpath is not None

    def _fallback_manager(self, io: ManagedCheckpointIO) -> CheckpointManager:
        assert self.preemption is not None and self.preemption.fallback_dirpath is not None
        manager, _ = io.manager_for(self.preemption.fallback_dirpath.rstrip("/") + "/x")
        return manager

    def _discover_best(self) -> Manifest | None:
        assert self.monitor is not None
        return self.manager.best(self.monitor, self.mode, owner=self.owner, keep=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_before_training(trainer)
        io = _lightning.checkpoint_io(trainer.strategy)
        loaded = io.last_loaded if isinstance(io, ManagedCheckpointIO) else None
        self.resumed_from = loaded
        self._last_time_saved = self._clock()
        self._book.protected = set()
        if loaded is None:
            self._warn_if_not_empty(trainer)
            return
        self.history = self._continue_history(trainer, loaded)
        self._last_global_step_saved = trainer.global_step
        if trainer.ckpt_path is not None:
            # the checkpoint's own epoch (as `lightning-ckpt ls` and its name show it), then where
            # training goes on: after an epoch-end save that is the next epoch
            saved = f"epoch {self._loaded_epoch}, " if isinstance(self._loaded_epoch, int) else ""
            rank_zero_info(f"lightning-ckpt: resuming from {loaded} ({saved}step {trainer.global_step}); "
                           f"training continues in epoch {trainer.current_epoch}")
        directory, name = split_url(loaded)
        if Storage(directory, self.storage_options).url == self.dirpath:
            # resuming this callback's own run: continue its bookkeeping from what storage holds,
            # and never let retention delete the checkpoint we resumed from
            self._book.protected = {name}
            self._reconcile(trainer)
        if self.exact_resume:
            self._check_loaders_resumable(trainer)
        if self._rng_to_restore is not None:
            self._restore_random_streams(trainer)

    def _restore_random_streams(self, trainer: pl.Trainer) -> None:
        """Put every random stream back where the checkpoint found it, as late as Lightning allows.

        The last thing before the first batch. Mid-epoch, the train loader's iterator already
        exists (restored to its position), exactly as it did when the checkpoint was taken. At an
        epoch boundary the uninterrupted run created the next epoch's iterator *after* the save,
        drawing its seeds from the streams restored here; Lightning, resuming, reuses an iterator
        it created before this hook. Clearing its resuming flag makes it create the iterator again
        where the uninterrupted run did (after ``set_epoch`` and ``on_train_epoch_start``); mid-epoch
        the flag has no effect (Lightning then continues the restored iterator).
        """
        assert self._rng_to_restore is not None
        states, self._loader_states = self._loader_states, None
        _lightning.restart_iterator_at_its_epoch(trainer, states)
        restore_rng(self._rng_to_restore)
        self._rng_to_restore = None
        generators = self._generators_to_restore
        self._generators_to_restore = None
        if generators is not None:
            live = loader_generators(_lightning.train_loader(trainer))
            if len(live) == len(generators):
                for generator, state in zip(live, generators):
                    generator.set_state(state)
            else:
                warnings.warn(f"the checkpoint holds {len(generators)} train loader generator(s), this run has "
                              f"{len(live)}: their random streams start afresh, so the resumed run is not "
                              "bit-identical to an uninterrupted one", CheckpointWarning, stacklevel=2)
        _lightning.recreate_iterator_at_epoch_start(trainer)

    def _continue_history(self, trainer: pl.Trainer, loaded: str) -> History:
        """This run continues the history of the checkpoint it resumed from (rank 0 reads, all agree)."""
        lineage = None
        if trainer.is_global_zero:
            io = _lightning.checkpoint_io(trainer.strategy)
            try:
                manager, name = io.manager_for(loaded) if isinstance(io, ManagedCheckpointIO) else (None, "")
                manifest = manager.read_manifest(name) if manager is not None else None
            except CheckpointError:
                manifest = None  # a plain Lightning file, loaded unverified: no history recorded
            lineage = History(self.history.run).resumed_from(manifest).lineage if manifest is not None else ()
        lineage = trainer.strategy.broadcast(lineage)
        return History(self.history.run, tuple(tuple(e) for e in lineage or ()))  # type: ignore[misc]

    def _warn_if_not_empty(self, trainer: pl.Trainer) -> None:
        """A fresh run into a directory holding another run's checkpoints: say so (they are kept)."""
        if not trainer.is_global_zero:
            return
        found = self.manager.scan()
        others = [m.name for m in found.committed] + found.unmanaged
        if others:
            rank_zero_warn(
                f"lightning-ckpt: {self.dirpath} is not empty ({len(others)} checkpoint(s) of another run, e.g. "
                f"{others[-1]}) and this run did not resume from it: they are kept, and where a name repeats this "
                "run saves under -vN",
                category=CheckpointWarning,
            )

    def _check_loaders_resumable(self, trainer: pl.Trainer) -> None:
        loader = _lightning.train_loader(trainer)
        if loader is None or not trainer.fit_loop.restarted_mid_epoch:
            return
        plain = [type(dl).__name__ for dl in loader.flattened if not is_stateful(dl)]
        if plain:
            warnings.warn(
                f"resuming in the middle of an epoch, but the train loader(s) {plain} cannot restore their "
                "position: the rest of this epoch will not see the same batches as an uninterrupted run. "
                "Use torchdata's StatefulDataLoader (plain DataLoaders are converted automatically).",
                CheckpointWarning,
                stacklevel=2,
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse an optimizer state that does not fit, naming what differs, before Lightning loads it."""
        io = _lightning.checkpoint_io(trainer.strategy)
        if not isinstance(io, ManagedCheckpointIO) or not io.loaded_optimizer_states:
            return
        names = {id(p): n for n, p in pl_module.named_parameters()}
        problems = optimizer_mismatch(trainer.optimizers, io.loaded_optimizer_states, names)
        if problems:
            raise IncompatibleCheckpointError(
                f"the checkpoint {io.last_loaded} does not fit this run's optimizer: " + "; ".join(problems)
            )
        for note in adapt_optimizer_states(trainer.optimizers, io.loaded_optimizer_states):
            rank_zero_info(f"lightning-ckpt: {note}")

    def _reconcile(self, trainer: pl.Trainer) -> None:
        """Rebuild top-k, best and last from what storage actually holds (rank 0 decides)."""
        records = self.manager.manifests(owner=self.owner) if trainer.is_global_zero else None
        if records is not None:
            records += self._adopt(records)
        self._migrated = None
        records = trainer.strategy.broadcast(records)
        self._book.records = list(records or [])
        restored = self._best_model_path
        self._refresh_bookkeeping()
        if self.monitor is None and restored and any(self.manager.url_of(r.name) == restored for r in self._book.records):
            # as Lightning: the newest *of the resumed history* (a newer file may be another history's)
            self._best_model_path = restored
        last = [m for m in (self.manager.manifests(owner=self._last_owner) if trainer.is_global_zero else [])]
        last = trainer.strategy.broadcast(last)
        if last:
            self.last_model_path = self.manager.url_of(last[-1].name)

    def _adopt(self, records: list[Manifest]) -> list[Manifest]:
        """Checkpoints of a run written by stock ModelCheckpoint, ranked by the state it saved.

        They join top-k, best and k-th as Lightning would continue them; having no manifest they
        are unverified, so retention never deletes them (they only leave the bookkeeping).
        """
        state = self._migrated
        if not state or self.monitor is None or state.get("monitor") != self.monitor:
            return []
        known = {r.name for r in records}
        unmanaged = set(self.manager.scan().unmanaged)
        adopted = []
        for order, (path, score) in enumerate((state.get("best_k_models") or {}).items()):
            try:
                directory, name = split_url(str(path))
            except CheckpointError:
                continue
            if name in known or name not in unmanaged or not self._same_dir(directory):
                continue
            try:
                value = float(score)
            except (TypeError, ValueError, RuntimeError):
                continue  # not a score: nothing to rank it by
            adopted.append(Manifest(name=name, size=0, sha256="", global_step=0, created=float(order),
                                    metrics={self.monitor: value}, monitor=self.monitor, mode=self.mode,
                                    owner=self.owner, extra={ADOPTED: True}))
        if adopted:
            rank_zero_info(f"lightning-ckpt: continuing the top {self.save_top_k} of a ModelCheckpoint run: "
                           f"{', '.join(m.name for m in adopted)} (no manifests: unverified, never deleted)")
        return adopted

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
        if self._train_time_interval is not None or self.overhead_budget is not None:
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

    # -- saving -----------------------------------------------------------------------------

    def _candidates(self, trainer: pl.Trainer) -> dict[str, float]:
        """The metrics a save decision is made with: rank 0's, on every rank (a collective)."""
        metrics: dict[str, float] = metrics_to_floats(trainer.callback_metrics)
        metrics["epoch"] = trainer.current_epoch  # ints, so "{epoch}" formats as epoch=3
        metrics["step"] = trainer.global_step
        if self._decision_group is None or not distributed.active():
            return metrics
        return self._agreed(trainer, metrics)

    def _agreed(self, trainer: pl.Trainer, metrics: dict[str, float]) -> dict[str, float]:
        """Rank 0's metrics on every rank, after checking that every rank sees the monitored value.

        Whether to save, under which name and what to delete are then the same decision on every
        rank, whatever each logged; but ranking by a value only rank 0 sees would quietly rank by a
        part of the data, so a monitored value that differs between ranks fails the run on every
        rank at once. The exchange is bounded by :attr:`decision_timeout`: a rank that never
        comes fails it too, rather than leaving the others waiting forever.
        """
        monitor = self.monitor
        mine = metrics.get(monitor) if monitor is not None else None
        where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
        try:
            every = distributed.all_gather((mine, metrics), group=self._decision_group[1] if self._decision_group else None)
        except RuntimeError as exc:  # gloo's timeout (DistBackendError is a RuntimeError too)
            about = f" (monitor={monitor!r})" if monitor is not None else ""
            raise RanksDisagreeError(
                f"CheckpointCallback{about}: rank {trainer.global_rank} waited {self.decision_timeout} {where} for "
                "the other ranks to decide on a save, and not all came: the ranks disagree on whether to save "
                f"(a rank skipped the save hook, or saves there on its own). {exc}"
            ) from exc
        values = [value for value, _ in every]
        if monitor is not None and not _same_everywhere(values):
            seen = ", ".join(f"rank {r}: {'not logged' if v is None else f'{v:.6g}'}" for r, v in enumerate(values))
            raise RanksDisagreeError(
                f"CheckpointCallback(monitor={monitor!r}): the ranks see different values of {monitor!r} {where} "
                f"({seen}). Checkpoints must be ranked by one value on every rank: log it reduced over the ranks, "
                f"self.log({monitor!r}, value, sync_dist=True) (not rank_zero_only=True)."
            )
        return every[0][1]

    def _save_topk(self, trainer: pl.Trainer, candidates: dict[str, float]) -> None:
        if self.save_top_k == 0:
            return
        replaceable: str | None = None  # Lightning's del_filepath: the file this save pushes out
        current: float | None = None
        if self.monitor is not None:
            if self.monitor not in candidates:
                message = (
                    f"CheckpointCallback(monitor={self.monitor!r}) could not find {self.monitor!r} among the "
                    f"logged metrics {sorted(candidates)}; did you call self.log({self.monitor!r}, ...)?"
                )
                if _lightning.validation_has_run(trainer):
                    raise MonitorNotFoundError(message)
                warnings.warn(message, CheckpointWarning, stacklevel=2)
                return
            current = candidates[self.monitor]
            admitted, admitted_once_committed = self._book.admits(current, self._persisting_names())
            if not admitted and admitted_once_committed:
                # only saves still persisting rank above it, and one may yet fail: know before judging
                self._settle(trainer, wait=self.when_busy == "wait" or _is_final_save(trainer)
                             or _lightning.is_sharded(trainer.strategy))
                admitted, _ = self._book.admits(current, self._persisting_names())
            if not admitted:
                if self.verbose:
                    rank_zero_info(f"Epoch {trainer.current_epoch:d}, global step {trainer.global_step:d}: "
                                   f"{self.monitor!r} was not in top {self.save_top_k}")
                return
            replaceable = self._book.pushed_out()
        elif self._best_model_path:  # as Lightning: the previous "best" (the newest saved) may be overwritten
            previous = split_url(self._best_model_path)[1]
            replaceable = previous if any(r.name == previous for r in self._book.records) else None
        if replaceable in self._book.protected:
            replaceable = None  # the checkpoint this run resumed from is never replaced, even by name
        shown_k = len(self.best_k_models) + 1 if self.save_top_k == -1 else self.save_top_k
        name = self._free_name(trainer, self._unique_name(trainer, candidates, replaceable), self.owner)
        chain = None
        if self.async_save and self.save_last:
            last = self._free_name(trainer, self._last_name(trainer, candidates), self._last_owner)
            chain = self._copy_to_last(name, last)
        # as Lightning, the checkpoint's own callback state already counts it (best, top-k, score)
        before = (self._best_model_path, self.best_model_score, self.best_k_models, self.kth_best_model_path,
                  self.kth_value, self.current_score)
        self._provisional = Manifest(name=name, size=0, sha256="", epoch=trainer.current_epoch,
                                     global_step=trainer.global_step, metrics=candidates, monitor=self.monitor,
                                     owner=self.owner)
        self._refresh_bookkeeping()
        if current is not None:
            self.current_score = torch.tensor(rank_value(current, self.mode))
        try:
            record = self._save(trainer, name, candidates, self.owner, on_done=chain)
        finally:
            self._provisional = None
        if record is None:
            (self._best_model_path, self.best_model_score, self.best_k_models, self.kth_best_model_path,
             self.kth_value, self.current_score) = before
            return
        self._book.add(record)
        self._last_saved_name = (trainer.global_step, name)
        self._prune(trainer)
        self._refresh_bookkeeping()
        if self.monitor is None:
            return
        if self.verbose:
            rank_zero_info(
                f"Epoch {trainer.current_epoch:d}, global step {trainer.global_step:d}: {self.monitor!r} reached "
                f"{float(self.current_score):0.5f} (best {float(self.best_model_score):0.5f}), saving model to "
                f"{self.manager.url_of(name)!r} as top {shown_k}"
            )

    def _save_last(self, trainer: pl.Trainer, candidates: dict[str, float]) -> None:
        if not self.save_last:
            return
        name = self._free_name(trainer, self._last_name(trainer, candidates), self._last_owner)
        twin = self._last_saved_name[1] if self._last_saved_name else None
        same_step = bool(self._last_saved_name and self._last_saved_name[0] == trainer.global_step)
        if self.save_last == "link" and self.save_top_k != 0 and self._last_checkpoint_saved:
            # Lightning's "link": last points at the newest checkpoint saved, whatever its step
            source = split_url(self._last_checkpoint_saved)[1]
            if source == name:
                return  # last.ckpt itself was the newest save: it is current
            if self.async_save and self._persisting(source):
                self._last_waiting = (name, source)  # copied in the background once it commits
                return
            if not self._copy_last(trainer, source, name, link=True):
                return
        elif same_step and twin is not None and self.async_save:
            # the copy runs in the background right after that save commits (_copy_to_last);
            # last_model_path names it once it is done (_settle)
            if self._persisting(twin):
                self._last_waiting = (name, twin)
                return
        elif same_step and twin is not None:
            # the same state was just committed under another name: copy it (True: a hard link on a
            # local disk; "copy": an independent file; a server-side copy on object stores) instead
            # of serializing it twice
            if not self._copy_last(trainer, twin, name, link=self.save_last is True):
                return
        else:
            previous = self.last_model_path
            self.last_model_path = self.manager.url_of(name)  # as Lightning: part of its own state
            saved = self._save(trainer, name, candidates, self._last_owner)
            self.last_model_path = previous
            if saved is None:
                return
            if self._persisting(name):
                self._last_waiting = (name, name)  # last_model_path names it once it committed (_settle)
                return
        self._set_last(trainer, name)

    def _persisting(self, name: str) -> bool:
        """Whether ``name`` is a background save that has not committed yet (as far as we know)."""
        return any(entry.record.name == name for entry in self._pending)

    def _set_last(self, trainer: pl.Trainer, name: str) -> None:
        previous, self.last_model_path = self.last_model_path, self.manager.url_of(name)
        if previous and previous != self.last_model_path and trainer.is_global_zero:
            self._drop_previous_last(previous)

    def _copy_last(self, trainer: pl.Trainer, source: str, name: str, link: bool) -> bool:
        error = None
        if trainer.is_global_zero:
            try:
                self.manager.copy(source, name, link=link, owner=self._last_owner, history=self._guard)
            except CheckpointError as exc:
                error = exc
        return self._save_succeeded(trainer, name, error)

    def _last_name(self, trainer: pl.Trainer, candidates: dict[str, float]) -> str:
        """``last.ckpt`` (``CHECKPOINT_NAME_LAST`` may be a template), versioned as Lightning when
        another callback's or another run's file already has that name."""
        base = format_checkpoint_name(self.CHECKPOINT_NAME_LAST, candidates, self.auto_insert_metric_name, suffix="",
                                      join=self.CHECKPOINT_JOIN_CHAR, equals=self.CHECKPOINT_EQUALS_CHAR)
        name = base + EXTENSION
        if not self._enable_version_counter:
            return name
        mine = {split_url(self.last_model_path)[1] if self.last_model_path else None,
                # ours too while a background save of it has not committed yet
                self._last_waiting[0] if self._last_waiting else None}
        return self._versioned(trainer, base, lambda n: n not in mine and self._last_taken(n))

    def _last_taken(self, name: str) -> bool:
        """As Lightning: a file ``name`` exists (another callback's, or another run's that this one
        did not resume) -- never replaced: ours takes ``last-v1.ckpt``."""
        return self.manager.storage.exists(name) or self._persisting(name)

    def _drop_previous_last(self, previous: str) -> None:
        """A templated ``CHECKPOINT_NAME_LAST`` made a new last file: delete our previous one."""
        directory, name = split_url(previous)
        if Storage(directory, self.storage_options).url != self.dirpath:
            return
        try:
            manifest = self.manager.read_manifest(name)
            # only our own history's: a last.ckpt of the run this one forked from stays
            if manifest.owner == self._last_owner and self.history.contains(manifest):
                self.manager.delete(name)
        except CheckpointError:
            pass  # not ours, or already gone: never touched

    @property
    def _last_owner(self) -> str:
        return self.owner + "/last"

    def _copy_to_last(self, name: str, last: str) -> Callable[[SaveResult], None]:
        """A background step after ``name`` commits: make ``last.ckpt`` a copy of it."""
        manager, owner, link, history = self.manager, self._last_owner, self.save_last != "copy", self._guard

        def copy(result: SaveResult) -> None:
            try:
                manager.copy(name, last, link=link, owner=owner, history=history)
            except CheckpointError as exc:  # the checkpoint itself committed: report, don't fail it
                warnings.warn(f"could not refresh {manager.url_of(last)}: {exc}",
                              CheckpointWarning, stacklevel=1)
            else:
                self._last_copied = name  # read by _settle once this save is waited for


        return copy

    def _save(
        self,
        trainer: pl.Trainer,
        name: str,
        candidates: dict[str, float],
        owner: str,
        on_done: Callable[[SaveResult], None] | None = None,
        sync: bool = False,
    ) -> Manifest | None:
        if self.overhead_budget is None:
            return self._save_now(trainer, name, candidates, owner, on_done, sync)
        # what training waits for: waiting on the previous background save, Lightning's state dump,
        # and the write (or only the snapshot, with async_save); a failed save cost time as well
        start = self._clock()
        try:
            return self._save_now(trainer, name, candidates, owner, on_done, sync)
        finally:
            self.overhead_budget.record(self._clock() - start, trainer.global_step)

    def _save_now(
        self,
        trainer: pl.Trainer,
        name: str,
        candidates: dict[str, float],
        owner: str,
        on_done: Callable[[SaveResult], None] | None,
        sync: bool = False,
    ) -> Manifest | None:
        # the run's last save never skips: it waits for the one in flight; so does every sharded
        # save (skipping would be a decision every rank must share, and DCP runs one at a time)
        sharded = _lightning.is_sharded(trainer.strategy)
        self._settle(trainer, wait=self.when_busy == "wait" or _is_final_save(trainer) or sharded)
        record = Manifest(name=name, size=0, sha256="", epoch=trainer.current_epoch,
                          global_step=trainer.global_step, metrics=candidates, monitor=self.monitor, owner=owner)
        background = self.async_save and not sync
        request = SaveRequest(
            self.manager.url, name, epoch=record.epoch, global_step=record.global_step, metrics=candidates,
            monitor=self.monitor, mode=self.mode if self.monitor is not None else None, owner=owner,
            weights_only=self.save_weights_only, history=self._guard, background=background,
            when_busy=self.when_busy, then=on_done,  # type: ignore[arg-type]
        )
        self._last_global_step_saved = trainer.global_step
        self._last_time_saved = self._clock()
        outcome, error = self._write(trainer, request)
        if not self._save_succeeded(trainer, name, error):
            return None
        self._last_checkpoint_saved = self.manager.url_of(name)
        if trainer.is_global_zero:  # as Lightning: loggers that upload checkpoints hear of each save
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
        if not background:
            if isinstance(outcome, SaveResult):
                self._log_save_metrics(trainer, outcome)
            return record
        skipped = bool(trainer.strategy.broadcast(trainer.is_global_zero and outcome is None))
        if skipped:  # when_busy="skip" and the previous save still persists (the saver warned)
            return None
        handle = outcome if trainer.is_global_zero and not isinstance(outcome, SaveResult) else None
        self._pending.append(_InFlight(record, handle, _is_final_save(trainer)))
        return record

    def _write(self, trainer: pl.Trainer, request: SaveRequest) -> tuple[SaveOutcome, CheckpointError | None]:
        """Every rank: hand the Trainer's checkpoint to the IO as ``request``; the outcome on the rank that wrote.

        The hand-over is explained in :mod:`lightning_ckpt.io`: through ``trainer.save_checkpoint``
        where the strategy writes through its CheckpointIO; sharded strategies, which bypass it, get
        the dumped checkpoint on every rank; a model-parallel strategy gathering a full state dict
        (a collective on every rank) has rank 0 write it through our IO, as Lightning does.
        """
        if self.exact_resume and not request.weights_only:
            self._warn_if_not_exact(trainer)
        strategy = trainer.strategy
        io = self._install_io(trainer)
        outcome: SaveOutcome = None
        error: CheckpointError | None = None
        if _lightning.bypasses_checkpoint_io(strategy):
            sharded = _lightning.is_sharded(strategy)
            checkpoint = _lightning.dump_checkpoint(trainer, request.weights_only)
            if sharded or trainer.is_global_zero:
                try:
                    outcome = io.save_sharded(request, checkpoint) if sharded else io.save(request, checkpoint)
                except CheckpointError as exc:  # decided with every rank after the barrier
                    error = exc
            strategy.barrier("lightning_ckpt.save_sharded" if sharded else "lightning_ckpt.save_full")
            return outcome, error
        with io.handing_over(request) as ticket:
            trainer.save_checkpoint(io.manager_of(request.directory).url_of(request.name), request.weights_only)
        return ticket.outcome, ticket.error

    def _warn_if_not_exact(self, trainer: pl.Trainer) -> None:
        """Say once, at the first save it concerns, why a resume from it cannot be bit-identical."""
        loaders = list(getattr(_lightning.train_loader(trainer), "flattened", None) or [])
        reasons: dict[str, str] = {}
        if _lightning.epoch_ends(trainer):
            persistent = [type(dl).__name__ for dl in loaders
                          if getattr(dl, "persistent_workers", False) and getattr(dl, "num_workers", 0) > 0]
            if persistent:
                reasons["persistent"] = (
                    f"the train loader(s) {persistent} keep persistent worker processes, whose random streams "
                    "(augmentations drawn in workers) at an epoch end are not in the checkpoint: a run resumed "
                    "from an epoch-end checkpoint draws other ones. Mid-epoch checkpoints are exact; "
                    "persistent_workers=False makes every checkpoint exact.")
        else:
            plain = [type(dl).__name__ for dl in loaders if not is_stateful(dl)]
            ahead = [type(dl).__name__ for dl in loaders if is_stateful(dl) and sized_len(dl) is None]
            if plain:
                reasons["position"] = (
                    f"the train loader(s) {plain} cannot restore their position (an IterableDataset without "
                    "state_dict/load_state_dict, or a DataLoader subclass): a run resumed from a mid-epoch "
                    "checkpoint starts the epoch's data over. Checkpoints at epoch ends are exact.")
            if ahead:
                reasons["ahead"] = (
                    f"the train loader(s) {ahead} have no length, so Lightning fetches one batch ahead and their "
                    "saved position is one batch past the last trained one: a run resumed from a mid-epoch "
                    "checkpoint skips a batch. Checkpoints at epoch ends are exact; a dataset with __len__ "
                    "makes every checkpoint exact.")
        for reason, text in reasons.items():
            if reason not in self._inexact_warned:
                self._inexact_warned.add(reason)
                rank_zero_warn(f"lightning-ckpt: a run resumed from this checkpoint will not be bit-identical to "
                               f"an uninterrupted one: {text}", category=CheckpointWarning)

    def _settle(self, trainer: pl.Trainer, wait: bool) -> None:
        """Account for background saves that finished: retention, metrics, failures (all ranks agree).

        Retention of a background save runs here, after it committed -- never before, so a save
        that fails can never have cost an older checkpoint; and only here do ``best_model_path``,
        ``best_k_models`` and ``last_model_path`` learn of it. A failure is judged as the same save
        would have been synchronously: the run's final save (or any, with ``fail_on_save_error``)
        fails the run, an earlier one warns.
        """
        if not self._pending:
            return
        outcome: tuple[list[str], list[tuple[str, str]], bool] | None = None
        errors: dict[str, CheckpointError] = {}
        if trainer.is_global_zero:
            settled, failed = [], []
            for record, pending, _ in self._pending:
                if pending is None or (not wait and not pending.done()):
                    continue
                try:
                    result = pending.wait()
                except CheckpointError as exc:
                    failed.append((record.name, str(exc)))
                    errors[record.name] = exc
                else:
                    settled.append(record.name)
                    if result is not None:
                        self._log_save_metrics(trainer, result, pending.stall_seconds, record.global_step)
            outcome = (settled, failed, self._last_copied in settled)
        settled, failed, last_copied = trainer.strategy.broadcast(outcome) or ([], [], False)
        done = set(settled) | {name for name, _ in failed}
        final = {entry.record.name for entry in self._pending if entry.final}
        self._pending = [entry for entry in self._pending if entry.record.name not in done]
        if self._last_waiting is not None and self._last_waiting[1] in done:
            name, source = self._last_waiting
            self._last_waiting = None
            if source in settled and (source == name or last_copied):
                self._set_last(trainer, name)
        for name, message in failed:
            self._book.forget([name])
            self.failed_saves += 1
            if self.fail_on_save_error or name in final:
                raise errors.get(name) or CheckpointError(f"saving {name} failed on rank 0: {message}")
            rank_zero_warn(f"lightning-ckpt: saving {self.manager.url_of(name)} FAILED in the background "
                           f"({message}); older checkpoints are intact and the next save will try again",
                           category=CheckpointWarning)
        if done:
            self._prune(trainer)
            self._refresh_bookkeeping()

    def _save_succeeded(self, trainer: pl.Trainer, name: str, error: CheckpointError | None,
                        must_succeed: bool = False) -> bool:
        """All ranks learn whether rank 0's save committed; a failure warns, or fails the run.

        A failed periodic save leaves every older checkpoint intact and the next save tries again;
        the final save of a run (or any, with ``fail_on_save_error``) must succeed.
        """
        reason = trainer.strategy.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if reason is None:
            return True
        self.failed_saves += 1
        if must_succeed or self.fail_on_save_error or _is_final_save(trainer):
            raise error if error is not None else CheckpointError(f"saving {name} failed on rank 0 ({reason})")
        rank_zero_warn(
            f"lightning-ckpt: saving {self.manager.url_of(name)} FAILED ({error}); older checkpoints are intact "
            f"and the next save will try again ({self.failed_saves} failed so far)",
            category=CheckpointWarning,
        )
        return False

    def _log_save_metrics(
        self, trainer: pl.Trainer, result: SaveResult, stall: float | None = None, step: int | None = None
    ) -> None:
        """Send the cost of a save to the Trainer's loggers (rank 0 writes, as Lightning)."""
        if not trainer.is_global_zero:
            return
        if not result.manifest.weights_only:
            self._full_save_seconds, self._last_full_size = result.seconds, result.manifest.size
        metrics = {
            # a synchronous save blocks training for all of it; a background one for the snapshot
            "checkpoint/stall_seconds": result.seconds if stall is None else stall,
            "checkpoint/persist_seconds": result.seconds,
            "checkpoint/bytes": float(result.manifest.size),
            "checkpoint/throughput_mb_s": result.throughput / 2**20,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step if step is None else step)

    def _unique_name(self, trainer: pl.Trainer, candidates: dict[str, float], replaceable: str | None) -> str:
        """The templated name, with Lightning's ``-vN`` when a file of that name exists already.

        As Lightning, the file this save pushes out of the top k (``replaceable``) is reused, and
        ``enable_version_counter=False`` reuses any name -- but never a file we did not write, and
        never a last.ckpt.
        """
        base = format_checkpoint_name(self.filename, candidates, self.auto_insert_metric_name, suffix="",
                                      join=self.CHECKPOINT_JOIN_CHAR, equals=self.CHECKPOINT_EQUALS_CHAR)
        if not self._enable_version_counter:
            return self._versioned(trainer, base, self._foreign)
        return self._versioned(trainer, base, lambda n: n != replaceable and self._taken(n))

    def _versioned(self, trainer: pl.Trainer, base: str, taken: Callable[[str], bool]) -> str:
        """Rank 0 looks at storage; every rank uses its answer."""
        name = None
        if trainer.is_global_zero:
            name = versioned_name(base, taken, start=self.STARTING_VERSION, join=self.CHECKPOINT_JOIN_CHAR)
        return trainer.strategy.broadcast(name)

    def _taken(self, name: str) -> bool:
        if name == LAST_NAME + EXTENSION or any(e.record.name == name for e in self._pending):
            return True
        return self.manager.storage.exists(name) or self.manager.storage.exists(manifest_name(name))

    def _foreign(self, name: str) -> bool:
        """A file we may not replace: not committed by us, or a last.ckpt."""
        if name == LAST_NAME + EXTENSION:
            return True
        if not self.manager.storage.exists(name):
            return False
        try:
            return is_last_copy(self.manager.read_manifest(name))
        except CheckpointError:
            return True

    @property
    def _guard(self) -> History | None:
        """The history saves are checked against; with ``enable_version_counter=False`` none: as
        Lightning, the user asked for names to be reused, so this callback's own checkpoints of an
        earlier run are replaced (never a file we did not write, nor another callback's)."""
        return self.history if self._enable_version_counter else None

    def _free_name(self, trainer: pl.Trainer, name: str, owner: str) -> str:
        """``name``, or ``name-vN`` where ``name`` holds a file this save may not replace (rank 0 decides)."""
        free = (self.manager.free_name(name, owner, self._guard, sharded=_lightning.is_sharded(trainer.strategy))
                if trainer.is_global_zero else None)
        free = trainer.strategy.broadcast(free) or name
        if free != name and name not in self._versioned_names:
            self._versioned_names.add(name)
            rank_zero_warn(f"lightning-ckpt: {self.manager.url_of(name)} holds a checkpoint of another run or callback "
                           f"(or a file we did not write), which is kept; saving as {free}", category=CheckpointWarning)
        return free

    def _persisting_names(self) -> set[str]:
        """Our saves not committed yet: persisting in the background, or being written right now."""
        names = {entry.record.name for entry in self._pending}
        if self._provisional is not None:
            names.add(self._provisional.name)
        return names

    def _prune(self, trainer: pl.Trainer) -> None:
        """Retention, after a commit: delete the committed checkpoints of ours the policy drops (rank 0)."""
        doomed = self._book.to_drop(self._persisting_names())
        adopted = {r.name for r in self._book.records if r.extra.get(ADOPTED)}
        if doomed and trainer.is_global_zero:
            for name in doomed:
                if name in adopted:
                    rank_zero_info(f"lightning-ckpt: {self.manager.url_of(name)} left the top {self.save_top_k}; "
                                   "it was written without a manifest (by ModelCheckpoint), so it is left in place")
                    continue
                try:
                    self.manager.delete(name)
                except CheckpointError as exc:
                    warnings.warn(f"could not delete {self.manager.url_of(name)}: {exc}", CheckpointWarning,
                                  stacklevel=2)
        self._book.forget(doomed)

    def _refresh_bookkeeping(self) -> None:
        """Lightning's attributes (best, top-k, k-th) from the bookkeeping's standing (see :meth:`Bookkeeping.standing`)."""
        persisting = {entry.record.name for entry in self._pending}
        standing = self._book.standing(persisting, self._provisional)
        if standing.top_k is not None:
            self.best_k_models = {self.manager.url_of(n): torch.tensor(v) for n, v in standing.top_k.items()}
        if standing.best is not None:
            self._best_model_path = self.manager.url_of(standing.best)
        if standing.best_score is not None:
            self.best_model_score = torch.tensor(standing.best_score)
        if standing.kth is not None:
            self.kth_best_model_path = self.manager.url_of(standing.kth)
            self.kth_value = torch.tensor(standing.kth_score)

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

    @staticmethod
    def _rng_state() -> dict[str, Any]:
        """This process's random streams, and with several processes every rank's (rank 0 writes)."""
        rng = capture_rng()
        return {"rng": rng, "rng_per_rank": distributed.all_gather(rng) if distributed.active() else None}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Add the train loaders' own generators (``DataLoader(generator=...)``) to this callback's state."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not self.exact_resume or state is None:
            return
        generators = [g.get_state() for g in loader_generators(_lightning.train_loader(trainer))]
        per_rank = distributed.all_gather(generators) if distributed.active() else None
        if generators or any(per_rank or ()):  # a checkpoint without loader generators stays as it was
            state["generators"] = generators
            state["generators_per_rank"] = per_rank

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

    def _adapt_to_world_size(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
        saved = _saved_world_size(checkpoint.get("callbacks"))
        now = trainer.world_size
        fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        loop_state = fit_loop.get("state_dict") or {}
        if saved is None or saved == now or not loop_state.get("combined_loader"):
            return
        loop_state["combined_loader"] = []
        progress = fit_loop.get("epoch_loop.batch_progress") or {}
        done = int((progress.get("current") or {}).get("ready", 0))
        if done and not progress.get("is_last_batch", False):
            message = (
                f"lightning-ckpt: the checkpoint was written by {saved} process(es), resumed on {now}, in the middle "
                f"of epoch {checkpoint.get('epoch')} ({done} batches per rank done): a position in the data cannot "
                "carry over to another number of ranks (each rank's share of the epoch differs), so this epoch's "
                f"data starts over on the new ranks; its first {done} steps are not undone (global_step goes on from "
                f"{checkpoint.get('global_step')}) and the run is not bit-identical to an uninterrupted one. Resume "
                "at the same world size, or from an epoch-end checkpoint, to continue exactly."
            )
            rank_zero_info(message)  # the log line, whatever the warning filters
            rank_zero_warn(message, category=CheckpointWarning)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.exact_resume and state_dict.get("rng") is None:
            rank_zero_warn("lightning-ckpt: the checkpoint holds no random streams (saved with exact_resume=False "
                           "or by another callback): the resumed run will not be bit-identical to an "
                           "uninterrupted one", category=CheckpointWarning)
        if self.exact_resume and state_dict.get("rng") is not None:
            per_rank = state_dict.get("rng_per_rank")
            generators = state_dict.get("generators_per_rank")
            # at another world size there is no bit-exact continuation: every rank takes rank 0's
            if isinstance(per_rank, list) and len(per_rank) == distributed.world_size():
                self._rng_to_restore = per_rank[distributed.rank()]
            else:
                self._rng_to_restore = state_dict["rng"]
            if isinstance(generators, list) and len(generators) == distributed.world_size():
                self._generators_to_restore = generators[distributed.rank()]
            else:
                self._generators_to_restore = state_dict.get("generators")
        # as Lightning: best_model_path always; the rest only when the directory is the same
        self._best_model_path = state_dict.get("best_model_path", "") or ""
        if not self._same_dir(state_dict.get("dirpath")):
            if self._resumed_earlier_version is not None and self._same_dir_as(
                state_dict.get("dirpath"), self._resumed_earlier_version
            ):
                return  # chosen on purpose (see _earlier_version_checkpoint), and said so then
            warnings.warn(  # Lightning's words, which code and tests match on
                f"The dirpath has changed from {state_dict.get('dirpath')!r} to {self.dirpath!r}, therefore "
                "`best_model_score`, `kth_best_model_path`, `kth_value`, `last_model_path` and `best_k_models` "
                "won't be reloaded. Only `best_model_path` will be reloaded.",
                CheckpointWarning,
                stacklevel=2,
            )
            return
        # what storage actually holds wins (see _reconcile, run at on_train_start); a run written by
        # stock ModelCheckpoint (no manifests) keeps its top-k from this state
        self._migrated = state_dict
        self.best_model_score = state_dict.get("best_model_score")
        self.best_k_models = dict(state_dict.get("best_k_models") or {})
        self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path) or ""
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        self.last_model_path = state_dict.get("last_model_path", "") or ""

    def _same_dir(self, other: Any) -> bool:
        return self.dirpath is not None and self._same_dir_as(other, self.dirpath)

    def _same_dir_as(self, other: Any, directory: str) -> bool:
        if not isinstance(other, (str, os.PathLike)):
            return False
        try:
            url = Storage(os.fspath(other), self.storage_options).url
        except CheckpointError:
            return False
        if url == directory:
            return True
        return "://" not in url and "://" not in directory and os.path.realpath(url) == os.path.realpath(directory)


def _terminal_bar(verb: str, name: str) -> TransferProgress | None:
    """A progress bar for a long transfer on rank 0's terminal, drawn between Lightning's updates.

    Only on the main thread: a background save drawing over Lightning's own bar would garble both.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return TransferProgress(f"lightning-ckpt: {verb} {name}")


#: Lightning's hint after ``ckpt_path="last"`` found nothing ("set ModelCheckpoint(save_last=True)")
_LAST_HINT = r'\.\w+\(ckpt_path="last"\) is set, but there is no last checkpoint available'


def _mute_last_hint(mute: bool) -> None:
    """Ignore Lightning's save_last hint between our "starting fresh" line and the next hook.

    The hint tells ModelCheckpoint users to set ``save_last=True``; for this callback, which finds
    its newest committed checkpoint without it, it is wrong. Only that one message is filtered,
    and only until ``setup`` (the next hook Lightning calls) removes the filter again.
    """
    warnings.filters[:] = [f for f in warnings.filters if not (f[1] is not None and f[1].pattern == _LAST_HINT)]
    if mute:
        warnings.filterwarnings("ignore", message=_LAST_HINT)
    else:
        warnings._filters_mutated()  # type: ignore[attr-defined]


def _saved_world_size(callback_states: Any) -> int | None:
    """The number of processes that wrote a checkpoint, from our callback's state (None: unknown)."""
    for state in (callback_states or {}).values():
        if not (isinstance(state, dict) and "best_k_models" in state):  # ours (ModelCheckpoint's has no rng)
            continue
        if isinstance(state.get("world_size"), int):
            return int(state["world_size"])
        if "rng" in state:  # written before world_size was stored: one RNG state per rank, or None alone
            per_rank = state.get("rng_per_rank")
            return len(per_rank) if isinstance(per_rank, list) else 1
    return None


class _InFlight(NamedTuple):
    """A background save not yet accounted for: its record, rank 0's handle, whether it was the run's last."""

    record: Manifest
    handle: PendingSave | ShardedPendingSave | None
    final: bool


def _same_everywhere(values: list[float | None]) -> bool:
    """Whether every rank has the same value (NaN equals NaN; float noise of an all-reduce is tolerated)."""
    first = values[0]
    for value in values[1:]:
        if first is None or value is None:
            if first is not value:
                return False
        elif not (math.isclose(first, value, rel_tol=1e-6, abs_tol=1e-12) or (math.isnan(first) and math.isnan(value))):
            return False
    return True


def _is_final_save(trainer: pl.Trainer) -> bool:
    """Whether this save is the run's last chance: nothing later would replace it."""
    if trainer.should_stop:
        return True
    loop = trainer.fit_loop
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = loop.max_epochs is not None and loop.max_epochs != -1 and trainer.current_epoch + 1 >= loop.max_epochs
    return bool(last_epoch and loop.epoch_loop.batch_progress.is_last_batch)


def _make_train_loader_stateful(trainer: pl.Trainer) -> None:
    """Have Lightning build the train loader through :func:`make_stateful` (idempotent)."""
    stateful_loader_class()  # exists before Lightning patches DataLoader subclasses to record arguments
    _lightning.wrap_train_loader(trainer, make_stateful)


def _trigger(
    every_n_epochs: int, every_n_train_steps: int | None, train_time_interval: timedelta | None
) -> SaveTrigger | None:
    if every_n_train_steps:
        return EveryNSteps(every_n_train_steps)
    if train_time_interval is not None:
        return EveryInterval(train_time_interval.total_seconds())
    if every_n_epochs:
        return EveryNEpochs(every_n_epochs)
    return None


def _retention(save_top_k: int, monitor: str | None, mode: str) -> RetentionPolicy:
    if save_top_k == -1:
        return KeepAll()
    if monitor is None:
        return KeepLatest(save_top_k)
    return KeepTopK(save_top_k, monitor, mode)
