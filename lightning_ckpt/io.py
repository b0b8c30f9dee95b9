"""The Lightning ``CheckpointIO`` that ``Trainer.fit(ckpt_path=...)`` loads through.

:class:`CheckpointCallback` installs it on the trainer's strategy at setup, so the user adds no
plugin: every ``trainer.save_checkpoint`` then goes through the manager's commit protocol, and
every load (an explicit path, ``"last"``, ``"best"``) is verified against its manifest with the
callback's ``storage_options``. Saving happens on global rank 0 only, as Lightning's strategies
arrange.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from lightning_ckpt import _lightning, distributed
from lightning_ckpt.async_saver import AsyncSaver, PendingSave
from lightning_ckpt.errors import CheckpointError, IncompatibleCheckpointError, adopt_lightning_base
from lightning_ckpt.manager import CheckpointManager, SaveResult
from lightning_ckpt.resumable import model_mismatch
from lightning_ckpt.security import Encryptor, Signer
from lightning_ckpt.sharded import ShardedCheckpointer, ShardedPendingSave
from lightning_ckpt.storage import split_url

adopt_lightning_base()  # Lightning is loaded here: ConfigurationError becomes a MisconfigurationException

__all__ = ["SAVE_META_KEY", "ManagedCheckpointIO", "attach_sharded"]

log = logging.getLogger("lightning_ckpt")

#: Key under ``storage_options`` through which the callback hands manifest fields to the IO.
SAVE_META_KEY = "lightning_ckpt"
#: A manifest-field key the IO pops: keep a save error in ``last_error`` instead of raising it.
DEFER_ERRORS = "_defer_errors"
#: A manifest-field key the IO pops: persist in the background; its value is the busy policy.
BACKGROUND = "_background"
#: A manifest-field key the IO pops: a callable run with the SaveResult after the commit.
ON_DONE = "_on_done"


class ManagedCheckpointIO(CheckpointIO):
    """Saves and loads Lightning checkpoints through :class:`CheckpointManager`.

    Args:
        storage_options: fsspec options for directories without a registered manager.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        signer: Signer | None = None,
        encryptor: Encryptor | None = None,
    ) -> None:
        self.storage_options = dict(storage_options or {})
        self.signer, self.encryptor = signer, encryptor
        self._managers: dict[str, CheckpointManager] = {}
        #: handed to every manager: draws a bar for long transfers on a terminal (see the callback)
        self.transfer_progress: Callable[[str, str], Any] | None = None
        self._pointers: dict[str, str] = {}
        self._savers: dict[str, AsyncSaver] = {}
        #: the handle of the last background save (None when the save was synchronous or skipped)
        self.last_pending: PendingSave | ShardedPendingSave | None = None
        self._sharded_pending: ShardedPendingSave | None = None
        self.last_save: SaveResult | None = None
        self.last_error: CheckpointError | None = None
        self.last_loaded: str | None = None
        #: the module checkpoints are loaded into; its structure is checked before Lightning loads
        self.model: torch.nn.Module | None = None
        #: optimizer states of the last loaded checkpoint, for the callback's structure check
        self.loaded_optimizer_states: list[dict[str, Any]] | None = None

    def register(self, manager: CheckpointManager) -> None:
        """Use ``manager`` (and its storage options) for every file in its directory."""
        self._managers[manager.url.rstrip("/")] = manager
        if manager.transfer_progress is None:
            manager.transfer_progress = self.transfer_progress

    def manager_for(self, url: str) -> tuple[CheckpointManager, str]:
        """The manager responsible for ``url`` and the file name inside it."""
        directory, name = split_url(str(url))
        manager = self._managers.get(directory.rstrip("/"))
        if manager is None:
            manager = CheckpointManager(directory, self.storage_options, signer=self.signer, encryptor=self.encryptor)
            if manager.url.rstrip("/") in self._managers:  # a plain path written differently
                manager = self._managers[manager.url.rstrip("/")]
            else:
                self.register(manager)
        return manager, name

    def resume_pointer(self, url: str) -> str:
        """A local file standing for remote ``url`` where Lightning insists on statting a path.

        Lightning resolves ``ckpt_path="last"`` by statting candidates with a filesystem built
        *without* our storage options; for a bucket reached only through them that stat would
        fail and Lightning would silently start fresh. It stats this local pointer instead and
        hands it back to :meth:`load_checkpoint`, which follows it to ``url``.
        """
        path = os.path.join(tempfile.gettempdir(), f"lightning-ckpt-resume-{uuid.uuid4().hex[:8]}.ckpt")
        with open(path, "w") as f:
            json.dump({"lightning_ckpt_resume": url}, f)
        self._pointers[path] = url
        return path

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        meta = dict((storage_options or {}).get(SAVE_META_KEY, {})) if isinstance(storage_options, dict) else {}
        defer = bool(meta.pop(DEFER_ERRORS, False))
        background = meta.pop(BACKGROUND, None)
        on_done = meta.pop(ON_DONE, None)
        manager, name = self.manager_for(str(path))
        self.last_save, self.last_error, self.last_pending = None, None, None
        try:
            if background:
                self.last_pending = self._saver(manager, background).save(checkpoint, name, on_done=on_done, **meta)
            else:
                self.last_save = manager.save(checkpoint, name, **meta)
                if on_done is not None:
                    on_done(self.last_save)
        except CheckpointError as exc:
            if not defer:
                raise
            # the callback decides with all ranks after Lightning's barrier; raising here would
            # leave the other ranks waiting in that barrier forever
            self.last_error = exc

    def save_sharded(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Every rank: write the Trainer ``checkpoint`` of a sharded strategy as a sharded checkpoint.

        Model and optimizer states (sharded) go through ``torch.distributed.checkpoint``, the rest
        to ``meta.pt`` -- Lightning's layout -- committed once with a manifest covering every file.
        """
        meta = dict((storage_options or {}).get(SAVE_META_KEY, {})) if isinstance(storage_options, dict) else {}
        defer = bool(meta.pop(DEFER_ERRORS, False))
        background = meta.pop(BACKGROUND, None)
        on_done = meta.pop(ON_DONE, None)
        history = meta.pop("history", None)
        if history is not None:  # a directory is replaced in place: the history is recorded, not checked
            meta.update(run=history.run, lineage=[[r, s] for r, s in history.lineage])
        manager, name = self.manager_for(str(path))
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        tensors.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        self.last_save, self.last_error, self.last_pending = None, None, None
        try:
            if background:
                self._wait_sharded()  # DCP: one background save at a time
                pending = ShardedCheckpointer(manager).save_async(
                    tensors, checkpoint, name, group=distributed.background_group(), on_done=on_done, **meta
                )
                self._sharded_pending = pending
                self.last_pending = pending if pending.coordinator else None
            else:
                self.last_save = ShardedCheckpointer(manager).save(tensors, checkpoint, name, **meta)
                if on_done is not None and distributed.rank() == 0:
                    on_done(self.last_save)
        except CheckpointError as exc:
            if not defer:
                raise
            self.last_error = exc

    def load_into_strategy(self, strategy: Any, path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Every rank: ``strategy.load_checkpoint`` for sharded strategies (see :func:`attach_sharded`).

        A sharded checkpoint is verified (each rank a share of the files) and read into the model
        and optimizers as they are sharded now; a single-file one is loaded whole and distributed
        as Lightning does. Returns the rest of the checkpoint for Lightning to restore.
        """
        url = strategy.broadcast(self._follow(path))  # rank 0 resolved "last"/"best": all ranks load it
        self.flush()
        manager, name = self.manager_for(url)
        module, optimizers = strategy.model, strategy.optimizers
        strict = bool(getattr(strategy.lightning_module, "strict_loading", True))
        weights_only = True if weights_only is None else weights_only
        if manager.is_directory(name):
            _, checkpoint = ShardedCheckpointer(manager).load(name, module, optimizers, strict, weights_only)
        else:
            # a single-file checkpoint (say, from a one-GPU run) into a sharded model, as Lightning does
            checkpoint = manager.load(name, map_location="cpu", weights_only=weights_only)
            _lightning.load_full_into_sharded(checkpoint, module, optimizers, strict)
        self.last_loaded = manager.url_of(name)
        self.loaded_optimizer_states = None  # checked against the model by DCP itself
        log.info("lightning-ckpt: loaded verified checkpoint %s", self.last_loaded)
        return checkpoint

    def _follow(self, path: Any) -> str:
        """The URL behind ``path`` (a resume pointer is followed and removed)."""
        url = self._pointers.pop(str(path), None) or str(path)
        if url != str(path):
            with contextlib.suppress(OSError):
                os.unlink(str(path))
        return url

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        url = self._follow(path)
        self.flush()  # e.g. trainer.test(ckpt_path="best") right after fit: the save must be done
        manager, name = self.manager_for(url)
        checkpoint = manager.load(
            name,
            map_location="cpu" if map_location is None else map_location,
            weights_only=True if weights_only is None else weights_only,
        )
        self.last_loaded = manager.url_of(name)
        self._check_model(checkpoint)
        self.loaded_optimizer_states = checkpoint.get("optimizer_states")
        log.info("lightning-ckpt: loaded verified checkpoint %s", self.last_loaded)
        return checkpoint

    def _check_model(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model with a message naming keys and shapes."""
        if self.model is None or not isinstance(checkpoint.get("state_dict"), dict):
            return
        strict = bool(getattr(self.model, "strict_loading", True))
        problems = model_mismatch(self.model.state_dict(), checkpoint["state_dict"], strict=strict)
        if problems:
            raise IncompatibleCheckpointError(
                f"the checkpoint {self.last_loaded} does not fit {type(self.model).__name__}: " + "; ".join(problems)
            )

    def _saver(self, manager: CheckpointManager, when_busy: str) -> AsyncSaver:
        saver = self._savers.get(manager.url)
        if saver is None or saver.when_busy != when_busy:
            if saver is not None:
                saver.close()
            saver = self._savers[manager.url] = AsyncSaver(manager, when_busy=when_busy)  # type: ignore[arg-type]
        return saver

    def _wait_sharded(self) -> None:
        """Let this rank's background sharded save finish (its outcome is rank 0's to report)."""
        pending, self._sharded_pending = self._sharded_pending, None
        if pending is not None:
            with contextlib.suppress(Exception):
                pending.wait()

    def flush(self) -> None:
        """Wait for every background save; raise the first error nobody has seen yet."""
        self._wait_sharded()
        for saver in self._savers.values():
            saver.wait()

    def abandon(self) -> None:
        """On an error path: stop waiting for background saves (nothing half-written becomes visible)."""
        if self._sharded_pending is not None:
            self._sharded_pending.abandon()
            self._sharded_pending = None
        for saver in self._savers.values():
            saver.close(abandon=True)
        self._savers = {}

    def teardown(self) -> None:
        """Lightning's end of the strategy: finish background saves and free their buffers."""
        self._wait_sharded()
        distributed.release_background_group()  # nothing of ours left for the interpreter's exit
        savers, self._savers = self._savers, {}
        for saver in savers.values():
            saver.close()

    def remove_checkpoint(self, path: Any) -> None:
        manager, name = self.manager_for(str(path))
        manager.delete(name)


def attach_sharded(strategy: Any, io: ManagedCheckpointIO) -> None:
    """Route a sharded strategy's ``load_checkpoint`` through ``io`` (idempotent).

    These strategies read checkpoints themselves with local ``Path``s and never consult a
    ``CheckpointIO``; this is the one place Lightning lets us in: ``Trainer.fit(ckpt_path=...)``
    calls ``strategy.load_checkpoint`` on every rank after the model is sharded.
    """
    if getattr(strategy, "_lightning_ckpt_io", None) is io:
        return

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return io.load_into_strategy(strategy, checkpoint_path, weights_only)

    strategy.load_checkpoint = load_checkpoint
    strategy._lightning_ckpt_io = io

