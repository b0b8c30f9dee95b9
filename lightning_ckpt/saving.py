"""Saving: turn a due save into a typed request, hand it over, account for its outcome.

Part of :class:`~lightning_ckpt.callback.CheckpointCallback` (a mixin): the metrics every rank
decides with, top-k and ``last.ckpt`` saves, one :class:`~lightning_ckpt.io.SaveRequest` per save
handed to :class:`~lightning_ckpt.io.ManagedCheckpointIO` (the hand-over is explained there),
background saves settled after they commit, failures judged (warn, or fail the run), retention
through the pure :class:`~lightning_ckpt.bookkeeping.Bookkeeping` and the manager's delete.

Owns: the order of a save (wait, name, request, outcome, bookkeeping, retention). Must not:
decide *when* to save (the callback's hooks), rank or keep checkpoints itself (bookkeeping and
policies), write bytes (the IO and the manager).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_ckpt import _lightning, distributed
from lightning_ckpt.async_saver import PendingSave
from lightning_ckpt.bookkeeping import ADOPTED
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointWarning,
    MonitorNotFoundError,
    RanksDisagreeError,
)
from lightning_ckpt.integrity import Manifest, metrics_to_floats
from lightning_ckpt.io import ManagedCheckpointIO, SaveOutcome, SaveRequest
from lightning_ckpt.manager import SaveResult
from lightning_ckpt.policies import rank_value
from lightning_ckpt.progress import terminal_bar
from lightning_ckpt.resumable import is_stateful
from lightning_ckpt.sharded import ShardedPendingSave
from lightning_ckpt.storage import split_url

__all__: list[str] = []  # a part of CheckpointCallback: nothing to import from here

class _SavingMixin:
    """Save orchestration (see the module docstring); state lives on the callback."""

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
            current.transfer_progress = terminal_bar if trainer.is_global_zero else None
            strategy.checkpoint_io = current
        current.register(self.manager)
        return current

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
        elif self._best_model_path and self.save_top_k in (-1, 1):  # as Lightning: the newest saved may be overwritten
            previous = split_url(self._best_model_path)[1]
            replaceable = previous if any(r.name == previous for r in self._book.records) else None
        if replaceable in self._book.protected:
            replaceable = None  # the checkpoint this run resumed from is never replaced, even by name
        shown_k = len(self.best_k_models) + 1 if self.save_top_k == -1 else self.save_top_k
        name = self._free_name(trainer, self._unique_name(trainer, candidates, replaceable), self.owner)
        chain = None
        if self.async_save and self.save_last:
            # the previous save and its copy to last.ckpt end first, as _save would wait for them anyway:
            # named while that copy is still being written, last.ckpt would pass for another's file
            self._settle(trainer, wait=self.when_busy == "wait" or _is_final_save(trainer)
                         or _lightning.is_sharded(trainer.strategy))
            last = self._free_name(trainer, self._last_name(trainer, candidates), self._last_owner)
            chain = self._copy_to_last(name, last)
        # as Lightning, the checkpoint's own callback state already counts it (best, top-k, score)
        before = (self._best_model_path, self.best_model_score, self.best_k_models, self.kth_best_model_path,
                  self.kth_value, self.current_score)
        self._provisional = Manifest(name=name, size=0, digest="", epoch=trainer.current_epoch,
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
        record = Manifest(name=name, size=0, digest="", epoch=trainer.current_epoch,
                          global_step=trainer.global_step, metrics=candidates, monitor=self.monitor, owner=owner)
        background = self.async_save and not sync
        request = SaveRequest(
            self.manager.url, name, epoch=record.epoch, global_step=record.global_step, metrics=candidates,
            monitor=self.monitor, mode=self.mode if self.monitor is not None else None, owner=owner,
            weights_only=self.save_weights_only, history=self._guard, background=background,
            when_busy=self.when_busy, then=on_done,  # type: ignore[arg-type]
            incremental=None if sharded else self.incremental,  # sharded checkpoints stay full
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
            trainer.save_checkpoint(ticket.url, request.weights_only)
        if trainer.is_global_zero and not ticket.handled and "bypassed" not in self._inexact_warned:
            # the strategy wrote (or a test's mock skipped) the file without asking its CheckpointIO
            self._inexact_warned.add("bypassed")
            rank_zero_warn(f"lightning-ckpt: {type(strategy).__name__}.save_checkpoint wrote {ticket.url} without "
                           "lightning-ckpt's CheckpointIO: it has no manifest, so it is neither verified nor "
                           "committed, and retention and 'last' do not see it", category=CheckpointWarning)
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
