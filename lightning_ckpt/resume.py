"""Resuming: which checkpoint ``ckpt_path="last"`` means, and continuing a run's bookkeeping and streams.

Part of :class:`~lightning_ckpt.callback.CheckpointCallback` (a mixin, so Lightning still finds
its hooks on the one callback object): Lightning's ``_find_last_checkpoints`` answered with the
newest checkpoint that verifies (this run's directory, the preemption fallback, an earlier
version directory of the same logger, a stock ModelCheckpoint ``last.ckpt``), reconciling top-k,
best and last with what storage holds, adopting a ModelCheckpoint run, the world-size check and
restoring the random streams at the last moment Lightning allows.

Owns: the resume decisions. Must not: save, delete or prune (saving.py), touch Lightning
internals except through :mod:`lightning_ckpt._lightning`.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_ckpt import _lightning, distributed
from lightning_ckpt.bookkeeping import ADOPTED
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from lightning_ckpt.integrity import Manifest
from lightning_ckpt.io import ManagedCheckpointIO
from lightning_ckpt.layout import History
from lightning_ckpt.manager import CheckpointManager
from lightning_ckpt.naming import EXTENSION, LAST_NAME
from lightning_ckpt.preemption import RUN_KEY
from lightning_ckpt.resumable import (
    adapt_optimizer_states,
    is_stateful,
    loader_generators,
    make_stateful,
    optimizer_mismatch,
    stateful_loader_class,
)
from lightning_ckpt.rng import capture_rng, restore_rng
from lightning_ckpt.storage import Storage, split_url

__all__: list[str] = []  # a part of CheckpointCallback: nothing to import from here

class _ResumeMixin:
    """Resume and reconcile (see the module docstring); state lives on the callback."""

    def _resolve_dirpath(self, trainer: pl.Trainer) -> str:
        """Lightning's default ``dirpath``: ``<log_dir>/checkpoints`` (of the first logger)."""
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir or trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return os.path.join(save_dir, str(logger.name), version, "checkpoints")
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """Lightning's hook for ``ckpt_path="last"``: the newest checkpoint that verifies."""
        if trainer.state.fn == TrainerFn.FITTING:
            self._install_signals(trainer)  # verifying a large checkpoint takes a while
        if self.dirpath is None:
            self._open_directory(self._resolve_dirpath(trainer))
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
        if not found:
            stock = self._stock_last()
            if stock is not None:
                rank_zero_warn(f"lightning-ckpt: no committed checkpoint in {self.dirpath}; resuming from "
                               f"{stock}, written without a manifest (by ModelCheckpoint?): it is not verified",
                               category=CheckpointWarning)
                return {stock if not self.storage_options else io.resume_pointer(stock)}
            self._refuse_all_damaged()
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
        # checkpoint is a directory, which object stores cannot stat); a re-save committed under its
        # fresh name (killed, or its tidying failed, before it got the plain name, which cleanup
        # then removed) has no file at the plain name: Lightning would not find it and start afresh
        fresh = latest.payload not in (None, latest.name)
        return {url if not (self.storage_options or latest.sharded or fresh) else io.resume_pointer(url)}

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
        modified = {self.manager.url_of(n): self.manager.storage.modified(n) for n in names}
        newest = max(modified, key=modified.__getitem__)
        return newest if newer_than is None or modified[newest] > newer_than else None

    def _refuse_all_damaged(self) -> None:
        """``"last"`` where committed checkpoints exist but none verifies (each skipped with a
        warning; e.g. the pack every incremental checkpoint shares deleted or damaged): fail,
        never take the directory for empty and start afresh beside them."""
        names = [m.name for m in self.manager.scan().committed if not m.weights_only or self.save_weights_only]
        if names:
            raise CorruptCheckpointError(
                f'ckpt_path="last": none of the {len(names)} committed checkpoint(s) in {self.dirpath} verifies '
                f"({', '.join(names[-3:])}{', ...' if len(names) > 3 else ''}; see the warnings); refusing to start "
                "afresh: repair or remove them, or pass ckpt_path=None to start a new run"
            )

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
            adopted.append(Manifest(name=name, size=0, digest="", global_step=0, created=float(order),
                                    metrics={self.monitor: value}, monitor=self.monitor, mode=self.mode,
                                    owner=self.owner, extra={ADOPTED: True}))
        if adopted:
            rank_zero_info(f"lightning-ckpt: continuing the top {self.save_top_k} of a ModelCheckpoint run: "
                           f"{', '.join(m.name for m in adopted)} (no manifests: unverified, never deleted)")
        return adopted

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

    def _continue_after_load(self, trainer: pl.Trainer) -> None:
        """At the train start: what was loaded (if anything) and whose run it continues."""
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
        manager, name = io.manager_for(loaded)  # type: ignore[union-attr]  # loaded: io is ours
        if manager is self.manager:
            # resuming this callback's own run: continue its bookkeeping from what storage holds,
            # and never let retention delete the checkpoint we resumed from
            self._book.protected = {name}
            self._reconcile(trainer)
        if self.exact_resume:
            self._check_loaders_resumable(trainer)
        if self._rng_to_restore is not None:
            self._restore_random_streams(trainer)

    def _check_optimizer_fits(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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

    def _add_loader_generators(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
        """Add the train loaders' own generators (``DataLoader(generator=...)``) to this callback's state."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not self.exact_resume or state is None:
            return
        generators = [g.get_state() for g in loader_generators(_lightning.train_loader(trainer))]
        per_rank = distributed.all_gather(generators) if distributed.active() else None
        if generators or any(per_rank or ()):  # a checkpoint without loader generators stays as it was
            state["generators"] = generators
            state["generators_per_rank"] = per_rank

    @staticmethod
    def _rng_state() -> dict[str, Any]:
        """This process's random streams, and with several processes every rank's (rank 0 writes)."""
        rng = capture_rng()
        return {"rng": rng, "rng_per_rank": distributed.all_gather(rng) if distributed.active() else None}

    def _restore_state(self, state_dict: dict[str, Any]) -> None:
        """Lightning's ``load_state_dict``: the random streams to restore, and the bookkeeping as Lightning would."""
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


def _make_train_loader_stateful(trainer: pl.Trainer) -> None:
    """Have Lightning build the train loader through :func:`make_stateful` (idempotent)."""
    stateful_loader_class()  # exists before Lightning patches DataLoader subclasses to record arguments
    _lightning.wrap_train_loader(trainer, make_stateful)
