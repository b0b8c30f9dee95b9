"""The Lightning ``CheckpointIO`` that ``Trainer.fit(ckpt_path=...)`` loads through, and the save hand-over.

:class:`CheckpointCallback` installs it on the trainer's strategy at setup, so the user adds no
plugin: every ``trainer.save_checkpoint`` then goes through the manager's commit protocol, and
every load (an explicit path, ``"last"``, ``"best"``) is verified against its manifest with the
callback's ``storage_options``. Saving happens on global rank 0 only, as Lightning's strategies
arrange.

A save of the callback is one typed :class:`SaveRequest` going down and one typed outcome coming
back: a :class:`~lightning_ckpt.manager.SaveResult`, a pending handle for a background save, or
``None`` for a background save skipped while the previous one persists; a failure raises.

How the request reaches this IO (the hand-over): for a strategy that writes through its
``CheckpointIO`` the callback calls ``trainer.save_checkpoint(url, weights_only)`` itself inside
:meth:`ManagedCheckpointIO.handing_over`, which sets the request for the duration of that one
call only and hands back a :class:`SaveTicket` holding the outcome. The call has to stay:
Lightning's own tests and users' code observe the callback's saves as ``trainer.save_checkpoint``
calls (mocking or wrapping it), its profiler times them there, and strategies that override it
(XLA's ``mark_step``, FSDP's full state dict) do their own work first. Nothing rides inside
``storage_options`` (Lightning's FSDP and model-parallel strategies refuse any) and nothing is
left in an attribute for someone to pick up afterwards. Sharded strategies never call a
``CheckpointIO``: there the callback dumps the checkpoint (``_lightning.dump_checkpoint``) and
hands it to :meth:`ManagedCheckpointIO.save_sharded` on every rank, or, for a model-parallel
strategy gathering a full state dict, to :meth:`ManagedCheckpointIO.save` on rank 0.

Owns: the request/outcome types, the managers and background savers per directory, verified
loads. Must not: decide when to save or what to keep (the callback), touch storage directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from lightning_ckpt import _lightning, distributed
from lightning_ckpt.async_saver import AsyncSaver, PendingSave
from lightning_ckpt.errors import (
    CheckpointError,
    ConfigurationError,
    IncompatibleCheckpointError,
    adopt_lightning_base,
)
from lightning_ckpt.layout import History
from lightning_ckpt.manager import CheckpointManager, SaveResult
from lightning_ckpt.resumable import model_mismatch
from lightning_ckpt.security import Encryptor, Signer
from lightning_ckpt.sharded import ShardedCheckpointer, ShardedPendingSave
from lightning_ckpt.storage import split_url

adopt_lightning_base()  # Lightning is loaded here: ConfigurationError becomes a MisconfigurationException

__all__ = ["ManagedCheckpointIO", "SaveOutcome", "SaveRequest", "SaveTicket", "attach_sharded"]

log = logging.getLogger("lightning_ckpt")


@dataclass(frozen=True)
class SaveRequest:
    """One save the callback asks for: where, the manifest's fields, and how to persist it.

    ``then(result)`` runs once the checkpoint committed (in the background thread for a background
    save) -- the place for work that must follow the commit, such as refreshing ``last.ckpt``.
    """

    directory: str
    name: str
    epoch: int | None = None
    global_step: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    monitor: str | None = None
    mode: str | None = None
    owner: str | None = None
    weights_only: bool = False
    extra: Mapping[str, Any] | None = None
    #: the training history the save is checked against (``None``: replace our own file by name)
    history: History | None = None
    #: persist in a background thread (training waits only for a snapshot)
    background: bool = False
    #: with ``background``: while the previous save persists, ``"wait"`` for it or ``"skip"`` this one
    when_busy: Literal["wait", "skip"] = "wait"
    then: Callable[[SaveResult], None] | None = None
    #: an :class:`~lightning_ckpt.incremental.Incremental`: unchanged tensors are referenced, not rewritten
    incremental: Any = None

    def __post_init__(self) -> None:
        if self.when_busy not in ("wait", "skip"):
            raise ConfigurationError(f"when_busy={self.when_busy!r} must be 'wait' or 'skip'")

    def manifest_fields(self) -> dict[str, Any]:
        """:meth:`CheckpointManager.save`'s keyword arguments for this request."""
        fields = {"epoch": self.epoch, "global_step": self.global_step, "metrics": dict(self.metrics),
                  "monitor": self.monitor, "mode": self.mode, "owner": self.owner,
                  "weights_only": self.weights_only, "history": self.history}
        if self.extra is not None:
            fields["extra"] = dict(self.extra)
        if self.incremental is not None:
            fields["incremental"] = self.incremental
        return fields


#: what a save hands back: committed, persisting in the background, or (a background save while
#: the previous one still persists, ``when_busy="skip"``) skipped
SaveOutcome = SaveResult | PendingSave | ShardedPendingSave | None


@dataclass
class SaveTicket:
    """The outcome of one request handed over through ``trainer.save_checkpoint`` (see the module doc).

    Filled by the IO on the rank that writes (global rank 0); ``error`` rather than raising there,
    since the other ranks wait in Lightning's barrier right after and the callback decides with
    all of them. Untouched (``handled`` false) where the strategy wrote nothing through the IO,
    e.g. a mocked ``trainer.save_checkpoint``.
    """

    request: SaveRequest
    #: where ``trainer.save_checkpoint`` was asked to write: only a save to it is the request's
    url: str = ""
    outcome: SaveOutcome = None
    error: CheckpointError | None = None
    handled: bool = False


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
        self._sharded_pending: ShardedPendingSave | None = None
        self._ticket: SaveTicket | None = None  # set only inside handing_over()
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

    def manager_of(self, directory: str) -> CheckpointManager:
        """The manager of ``directory``: the one registered for it, or a new one with our storage options."""
        manager = self._managers.get(directory.rstrip("/"))
        if manager is None:
            manager = CheckpointManager(directory, self.storage_options, signer=self.signer, encryptor=self.encryptor)
            if manager.url.rstrip("/") in self._managers:  # a plain path written differently
                manager = self._managers[manager.url.rstrip("/")]
            else:
                self.register(manager)
        return manager

    def manager_for(self, url: str) -> tuple[CheckpointManager, str]:
        """The manager responsible for ``url`` and the file name inside it."""
        directory, name = split_url(str(url))
        return self.manager_of(directory), name

    def resume_pointer(self, url: str) -> str:
        """A local file standing for remote ``url`` where Lightning insists on statting a path.

        Lightning resolves ``ckpt_path="last"`` by statting candidates with a filesystem built
        *without* our storage options; for a bucket reached only through them that stat would
        fail and Lightning would silently start fresh. It stats this local pointer instead and
        hands it back to :meth:`load_checkpoint`, which follows it to ``url``.

        Why a file, not something cleaner: Lightning's ``_parse_ckpt_path`` keeps only candidates
        that ``get_filesystem(path).exists(path)`` finds and picks the newest by ``modified``, with
        no way to pass storage options or to skip the stat (and a sharded checkpoint is a directory,
        which object stores cannot stat). The pointer lives only from ``_find_last_checkpoints`` to
        the load in the same ``fit`` call, which removes it.
        """
        path = os.path.join(tempfile.gettempdir(), f"lightning-ckpt-resume-{uuid.uuid4().hex[:8]}.ckpt")
        with open(path, "w") as f:
            json.dump({"lightning_ckpt_resume": url}, f)
        self._pointers[path] = url
        return path

    @contextlib.contextmanager
    def handing_over(self, request: SaveRequest) -> Iterator[SaveTicket]:
        """For the duration of one ``trainer.save_checkpoint`` call: save the checkpoint it brings as ``request``.

        Yields the ticket the outcome lands on; call ``trainer.save_checkpoint(ticket.url, ...)``.
        """
        if self._ticket is not None:
            raise CheckpointError(f"a save of {self._ticket.request.name} is being handed over already")
        url = self.manager_of(request.directory).url_of(request.name)
        ticket = self._ticket = SaveTicket(request, url)
        try:
            yield ticket
        finally:
            self._ticket = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Lightning's entry: inside :meth:`handing_over` the request's save, otherwise a plain one to ``path``."""
        ticket = self._ticket
        if ticket is None or ticket.handled or not _same_target(path, ticket.url):
            # not the save handed over (a strategy of the user's may write more than one file)
            manager, name = self.manager_for(str(path))
            manager.save(checkpoint, name)
            return
        ticket.handled = True
        try:
            ticket.outcome = self.save(ticket.request, checkpoint)
        except CheckpointError as exc:
            ticket.error = exc

    def save(self, request: SaveRequest, checkpoint: dict[str, Any]) -> SaveOutcome:
        """Rank 0: write ``checkpoint`` as ``request`` asks; a failure raises."""
        manager = self.manager_of(request.directory)
        if request.background:
            saver = self._saver(manager, request.when_busy)
            return saver.save(checkpoint, request.name, on_done=request.then, **request.manifest_fields())
        result = manager.save(checkpoint, request.name, **request.manifest_fields())
        if request.then is not None:
            request.then(result)
        return result

    def save_sharded(self, request: SaveRequest, checkpoint: dict[str, Any]) -> SaveOutcome:
        """Every rank: write the Trainer ``checkpoint`` of a sharded strategy as a sharded checkpoint.

        Model and optimizer states (sharded) go through ``torch.distributed.checkpoint``, the rest
        to ``meta.pt`` -- Lightning's layout -- committed once with a manifest covering every file.
        Every rank gets the same result (synchronous) or failure; a background save's handle is
        the coordinator's (``None`` on the other ranks).
        """
        fields = request.manifest_fields()
        fields.pop("incremental", None)  # sharded checkpoints stay full
        history = fields.pop("history", None)
        if history is not None:  # a directory is replaced in place: the history is recorded, not checked
            fields.update(history.fields())
        manager = self.manager_of(request.directory)
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        tensors.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        if request.background:
            self._wait_sharded()  # DCP: one background save at a time
            pending = ShardedCheckpointer(manager).save_async(
                tensors, checkpoint, request.name, group=distributed.background_group(), on_done=request.then,
                **fields,
            )
            self._sharded_pending = pending
            return pending if pending.coordinator else None
        result = ShardedCheckpointer(manager).save(tensors, checkpoint, request.name, **fields)
        if request.then is not None and distributed.rank() == 0:
            request.then(result)
        return result

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


def _same_target(path: Any, url: str) -> bool:
    """Whether Lightning's ``path`` is ``url`` (FSDP hands it back as a ``pathlib.Path``)."""
    return str(path) == url or ("://" not in url and os.path.abspath(str(path)) == os.path.abspath(url))


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

