"""Sharded checkpoints: every process writes its own shards through ``torch.distributed.checkpoint``.

A sharded checkpoint ``NAME`` is a directory in Lightning's own layout (so Lightning's
``ModelParallelStrategy`` can read a local one without this package)::

    NAME/.metadata        DCP's index of every tensor and shard (written by rank 0)
    NAME/__R_I.distcp     the shards rank R holds
    NAME/meta.pt          the rest of the Trainer checkpoint: loops, callbacks, epoch, ... (rank 0)
    NAME.manifest.json    the commit: size and sha256 of every file above

Saving (every rank calls :meth:`ShardedCheckpointer.save`): rank 0 marks ``NAME`` pending; every
rank writes its shards in parallel with DCP's fsspec writer (to any fsspec URL); rank 0 writes
``meta.pt``; every rank hashes its share of the files; rank 0 writes the manifest. Only then is
the checkpoint listed, resumed from or pruned, exactly like a single-file one. A failure on any
rank is raised on every rank (no rank is left waiting) and rank 0 removes what was written.

Loading: every rank verifies its share of the files, then DCP reads what each rank needs into
the model and optimizer *as they are sharded now* -- resuming at another world size reshards.
:func:`consolidate` turns a sharded checkpoint into one ordinary state dict in a single process.

Owns the distributed part (DCP reads and writes, agreement between ranks, ``meta.pt``). It must
not re-derive the commit protocol: marking pending, committing, reading the manifest (or "none":
:meth:`~lightning_ckpt.manager.CheckpointManager.manifest_or_none`) and verifying files are the
manager's.
"""

from __future__ import annotations

import errno
import io
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from lightning_ckpt import distributed, errors
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
    UnsafeCheckpointError,
)
from lightning_ckpt.digest import SHA256
from lightning_ckpt.integrity import HashingWriter, Manifest, versions
from lightning_ckpt.manager import CheckpointManager, SaveResult
from lightning_ckpt.storage import dcp as dcp_files
from lightning_ckpt.unpickle import dcp_planner, dcp_reader, refused_global

__all__ = ["META_FILE", "ShardedCheckpointer", "ShardedPendingSave", "consolidate"]

T = TypeVar("T")

#: The file holding everything of a Trainer checkpoint that is not sharded (Lightning's name).
META_FILE = "meta.pt"
#: how long waiting for a finished background save waits for its thread to end (it only returns)
JOIN_SECONDS = 60.0


class ShardedCheckpointer:
    """Writes and reads sharded checkpoints in ``manager``'s directory; a collective on every rank."""

    def __init__(self, manager: CheckpointManager) -> None:
        if manager.encryptor is not None:
            raise ConfigurationError("encrypting sharded checkpoints is not supported; save them unencrypted")
        self.manager = manager

    # -- saving -----------------------------------------------------------------------------

    def save(self, tensors: Mapping[str, Any], extras: Mapping[str, Any], name: str, **fields: Any) -> SaveResult:
        """Write ``tensors`` (sharded: DTensors or ShardedTensors) and ``extras`` (rank 0's) as ``name``.

        ``fields`` are manifest fields (epoch, global_step, metrics, monitor, mode, owner, ...).
        Every rank returns the same :class:`SaveResult` or raises the same failure.
        """
        start = time.perf_counter()
        rank, storage = distributed.rank(), self.manager.storage
        url = self.manager.url_of(name)
        error: BaseException | None = None
        if rank == 0:
            _, error = _attempt(lambda: self.manager.begin_directory(name))
        self._agree(error, name)
        try:
            directory = storage.child(name)
            target, options = storage.fsspec_target(name)
            _, error = _attempt(lambda: _dcp_save(dict(tensors), target, options), f"could not write the shards of {url}")
            self._agree(error, name)
            meta: tuple[int, str] | None = None
            if rank == 0:
                meta, error = _attempt(lambda: _write_meta(directory, extras))
            self._agree(error, name)
            # every rank sees the same complete set after the agreement, and hashes its share
            share, error = _attempt(lambda: _digest_share(directory, rank, distributed.world_size()))
            self._agree(error, name)
            committed: Manifest | None = None
            if rank == 0:
                table: dict[str, tuple[int, str]] = {}
                for part in distributed.all_gather(share):
                    table.update(part)
                if meta is not None:
                    table[META_FILE] = meta
                manifest = Manifest.for_files(name, table, versions=versions(), **fields)
                _, error = _attempt(lambda: self.manager.commit(manifest))
                committed = manifest
            else:
                distributed.all_gather(share)
            self._agree(error, name)
            committed = distributed.broadcast(committed)
            assert committed is not None
        except BaseException:
            if rank == 0:
                self.manager.abandon_directory(name)
            raise
        return SaveResult(committed, url, time.perf_counter() - start)

    def save_async(
        self,
        tensors: Mapping[str, Any],
        extras: Mapping[str, Any],
        name: str,
        group: Any = None,
        on_done: Callable[[SaveResult], None] | None = None,
        **fields: Any,
    ) -> ShardedPendingSave:
        """Like :meth:`save`, but the shards are written in the background (DCP's ``async_save``).

        Every rank is blocked only while DCP copies its shards to host memory (and rank 0 pickles
        the small rest). DCP's future on rank 0 resolves once every rank's shards are written and
        its index is; rank 0 then writes ``meta.pt``, hashes every file and commits -- still in
        the background. ``group`` is a process group with a CPU backend for DCP's background
        collectives (they must not share the training's group). Call on every rank; wait for the
        previous handle first (DCP allows one async save at a time).
        """
        start = time.perf_counter()
        rank, storage = distributed.rank(), self.manager.storage
        pending = ShardedPendingSave(name, self.manager.url_of(name), coordinator=rank == 0)
        error: BaseException | None = None
        if rank == 0:
            _, error = _attempt(lambda: self.manager.begin_directory(name))
        self._agree(error, name)
        meta = io.BytesIO()
        if rank == 0:
            torch.save(dict(extras), meta)  # now: loops and callbacks change with the next step
        target, options = storage.fsspec_target(name)
        future, error = _attempt(lambda: _dcp_async_save(dict(tensors), target, options, group),
                                 f"could not start writing the shards of {pending.url}")
        try:
            self._agree(error, name)  # a rank that could not even stage its shards fails it everywhere
        except BaseException:
            if rank == 0:
                self.manager.abandon_directory(name)
            raise
        assert future is not None
        pending.stall_seconds = time.perf_counter() - start
        # the thread takes the only reference to DCP's future (and through it the staged state and
        # DCP's executor) and drops it before signalling: those are freed while the waiter blocks,
        # never by a daemon thread during interpreter finalization (see ShardedPendingSave.wait)
        holder = [future]
        del future

        def finish() -> None:
            try:
                try:
                    dcp_future = holder.pop()
                    try:
                        dcp_future.result()
                    finally:
                        del dcp_future
                except BaseException as exc:  # DCP's CheckpointException is a BaseException
                    raise StorageError(errno.EIO, f"could not write the shards of {pending.url}: "
                                                  f"{_describe(exc)}") from exc
                result = None
                if rank == 0:
                    if pending.abandoned:
                        raise CheckpointError(f"the save of {pending.url} was abandoned")
                    result = self._commit_from_files(name, meta.getvalue(), fields, start)
            except BaseException as exc:  # noqa: BLE001 -- handed to whoever waits
                if rank == 0:
                    self.manager.abandon_directory(name)
                pending.finish(None, exc, time.perf_counter() - start)
                return
            error: BaseException | None = None
            if result is not None and on_done is not None:
                try:  # committed: whatever happens now, the checkpoint stays
                    on_done(result)
                except BaseException as exc:  # noqa: BLE001 -- reported, not lost
                    error = exc
            pending.finish(result, error, time.perf_counter() - start)

        # a daemon, so a save hung on a dead peer cannot keep the process from exiting; wait()
        # joins it, so one that finished never outlives the run (see ShardedPendingSave.wait)
        pending._thread = threading.Thread(target=finish, name=f"lightning-ckpt-sharded-{name}", daemon=True)
        pending._thread.start()
        return pending

    def _commit_from_files(self, name: str, meta: bytes, fields: Mapping[str, Any], start: float) -> SaveResult:
        """Rank 0, after every rank's shards are durable: write meta.pt, hash every file, commit."""
        directory = self.manager.storage.child(name)
        directory.write_bytes(META_FILE, meta)
        table = {f.name: directory.digest(f.name) for f in directory.list()}
        manifest = Manifest.for_files(name, table, versions=versions(), **fields)
        self.manager.commit(manifest)
        return SaveResult(manifest, self.manager.url_of(name), time.perf_counter() - start)

    def _manifest_or_none(self, name: str) -> Manifest | None:
        """The manifest of ``name``; ``None`` for a sharded directory Lightning wrote itself (loaded
        unverified, with a warning) -- never for an interrupted save of ours or under a signer."""
        manager = self.manager
        manifest = manager.manifest_or_none(name, unverified_ok=lambda: (
            manager.signer is None and manager.is_directory(name) and manager.storage.child(name).exists(".metadata")))
        if manifest is None and distributed.rank() == 0:
            warnings.warn(f"{manager.url_of(name)} has no lightning-ckpt manifest (a sharded checkpoint Lightning "
                          "wrote itself?); loading it unverified", CheckpointWarning, stacklevel=3)
        return manifest

    def _agree(self, error: BaseException | None, name: str, what: str = "saving") -> None:
        """Raise on every rank if any rank failed; the failing rank raises its own exception."""
        reports = distributed.all_gather(None if error is None else (type(error).__name__, str(error)))
        failed = [(r, report) for r, report in enumerate(reports) if report is not None]
        if not failed:
            return
        if error is not None:
            raise error
        where = "; ".join(f"rank {r}: {kind}: {message}" for r, (kind, message) in failed)
        text = f"{what} {self.manager.url_of(name)} failed on another rank ({where})"
        # the same kind of error on every rank (a damaged shard is CorruptCheckpointError everywhere)
        kind = getattr(errors, failed[0][1][0], None)
        if isinstance(kind, type) and issubclass(kind, CheckpointError) and kind not in (StorageError,):
            raise kind(text)
        raise StorageError(errno.EIO, text)

    # -- loading ----------------------------------------------------------------------------

    def load(
        self,
        name: str,
        module: torch.nn.Module,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        strict: bool = True,
        weights_only: bool = True,
    ) -> tuple[Manifest | None, dict[str, Any]]:
        """Verify ``name``, load it into ``module`` and ``optimizers`` in place; return the rest.

        A collective: every rank verifies a share of the files and reads the shards it needs for
        the way ``module`` is sharded now (another world size reshards).
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        manifest = self._manifest_or_none(name)
        if manifest is not None and not manifest.sharded:
            raise IncompatibleCheckpointError(f"{self.manager.url_of(name)} is a single-file checkpoint, not a sharded one")
        if manifest is not None:
            part = (distributed.rank(), distributed.world_size())
            _, error = _attempt(lambda: self.manager.verify_files(name, manifest, part))
            self._agree(error, name, "loading")
        target, options = self.manager.storage.fsspec_target(name)
        url = self.manager.url_of(name)
        try:
            model_state = {"state_dict": get_model_state_dict(module)}
            files = manifest.files if manifest is not None else None  # shards only among the verified files
            _dcp_load(model_state, target, options, files)
            set_model_state_dict(module, model_state["state_dict"], options=StateDictOptions(strict=strict))
            for index, optimizer in enumerate(optimizers):
                key = f"optimizer_{index}"
                optim_state = {key: get_optimizer_state_dict(module, optimizer)}
                _dcp_load(optim_state, target, options, files)
                set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                         options=StateDictOptions(cpu_offload=True, strict=strict))
        except CheckpointError:
            raise
        except BaseException as exc:  # DCP names the missing or mismatched key
            if not _is_failure(exc):
                raise
            raise IncompatibleCheckpointError(
                f"the sharded checkpoint {url} does not fit this model: {_describe(exc)}"
            ) from exc
        extras = _load_meta(self.manager, name, weights_only)
        return manifest, extras


class ShardedPendingSave:
    """The handle of one background sharded save on one rank: :meth:`done`, :meth:`wait`, costs.

    On rank 0 (the ``coordinator``) :meth:`wait` returns the committed :class:`SaveResult`; on
    the other ranks it returns ``None`` once that rank's shards are written (or raises).
    """

    def __init__(self, name: str, url: str, coordinator: bool) -> None:
        self.name, self.url, self.coordinator = name, url, coordinator
        self.stall_seconds = 0.0
        self.persist_seconds: float | None = None
        self.abandoned = False
        self._finished = threading.Event()
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"ShardedPendingSave({self.url!r}, {'done' if self.done() else 'persisting'})"

    def finish(self, result: SaveResult | None, error: BaseException | None, seconds: float) -> None:
        """Called once by the saver's background thread."""
        self._result, self._error, self.persist_seconds = result, error, seconds
        self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> SaveResult | None:
        """Block until finished; return the result (rank 0) or raise the save's error."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the save of {self.url} did not finish within {timeout} s")
        # The thread is a daemon. One still alive when the interpreter finalizes is stopped by
        # pthread_exit the moment it needs the GIL again; unwinding through torch's C++ frames
        # (a noexcept destructor) then aborts the process: "terminate called without an active
        # exception", exit 134 after a run that did everything right. It has nothing left to do
        # once finished: join it, so it is gone before the run ends.
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_SECONDS)
        if self._error is not None:
            raise self._error
        return self._result

    def abandon(self) -> None:
        """Do not commit: the shards being written stay uncommitted (cleanup removes them)."""
        self.abandoned = True


def consolidate(manager: CheckpointManager, name: str, verify: bool = True) -> dict[str, Any]:
    """The whole sharded checkpoint ``name`` as one ordinary (Lightning-style) checkpoint dict.

    Run it in a single process (no process group): every shard is read into full tensors.
    ``state_dict`` holds the model's tensors; ``optimizer_states`` the optimizers' states keyed by
    parameter name (DCP's layout); everything else comes from ``meta.pt``.
    """
    manifest = manager.read_manifest(name)
    if not manifest.sharded:
        raise IncompatibleCheckpointError(f"{manager.url_of(name)} is a single-file checkpoint, not a sharded one")
    if verify:
        manager.verify_files(name, manifest)
    target, options = manager.storage.fsspec_target(name)
    state = _dcp_load_everything(target, options, manifest.files)
    extras = _load_meta(manager, name, weights_only=True)
    optimizers = [state.pop(k) for k in sorted((k for k in state if k.startswith("optimizer_")),
                                                key=lambda k: int(k.split("_")[1]))]
    out = {**extras, "state_dict": state.pop("state_dict", {})}
    if optimizers:
        out["optimizer_states"] = optimizers
    return out


# -- DCP plumbing -----------------------------------------------------------------------------

def _load_meta(manager: CheckpointManager, name: str, weights_only: bool) -> dict[str, Any]:
    """``meta.pt`` of sharded ``name``, refused like a payload: ``UnsafeCheckpointError`` for objects
    weights-only loading refuses (decided by scanning, not by torch's words), else corrupt."""
    where = f"{manager.url_of(name)}/{META_FILE}"
    data = io.BytesIO(manager.storage.child(name).read_bytes(META_FILE))
    try:
        extras = torch.load(data, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        if isinstance(exc, (CheckpointError, MemoryError)):
            raise
        refused = refused_global(data) if weights_only else None
        if refused is not None:
            raise UnsafeCheckpointError(f"{where} holds objects that weights-only loading refuses (global {refused})"
                                        ) from None
        raise CorruptCheckpointError(f"{where} is not readable: {type(exc).__name__}: {exc}") from None
    if not isinstance(extras, dict):
        raise CorruptCheckpointError(f"{where} holds a {type(extras).__name__}, not a dict")
    return extras


def _digest_share(directory: Any, index: int, count: int) -> dict[str, tuple[int, str]]:
    """Size and sha256 of every ``count``-th file of ``directory`` from the ``index``-th."""
    mine = sorted(f.name for f in directory.list())[index::count]
    return {path: directory.digest(path) for path in mine}


def _write_meta(directory: Any, extras: Mapping[str, Any]) -> tuple[int, str]:
    with directory.open_write(META_FILE) as f:
        writer = HashingWriter(f, SHA256)  # sharded file tables record sha256
        torch.save(dict(extras), writer)  # type: ignore[arg-type]
    return writer.size, writer.sha256


def _dcp_save(state: dict[str, Any], target: str, options: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp_files.writer(target, options))


def _dcp_async_save(state: dict[str, Any], target: str, options: dict[str, Any], group: Any) -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp.async_save(state, storage_writer=dcp_files.writer(target, options), process_group=group)


def _dcp_load(state: dict[str, Any], target: str, options: dict[str, Any], files: Any = None) -> None:
    import torch.distributed.checkpoint as dcp

    reader = dcp_reader(target, options, files)  # DCP's .metadata unpickled through an allow-list
    planner = dcp_planner(target)  # and its non-tensor blobs loaded weights-only
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except BaseException:
        for error in (reader.error, planner.error):
            if error is not None:  # DCP reports it as an AssertionError or CheckpointException of its own
                raise error from None
        raise


def _dcp_load_everything(target: str, options: dict[str, Any], files: Any = None) -> dict[str, Any]:
    """Every tensor of a DCP checkpoint, whole, in this process (what ``dcp_to_torch_save`` does)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    reader = dcp_reader(target, options, files)  # shards only among the verified files
    planner = dcp_planner(target, everything=True)
    with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        try:
            _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
        except BaseException as exc:
            for error in (reader.error, planner.error):
                if error is not None:
                    raise error from None
            if not _is_failure(exc):
                raise
            raise CorruptCheckpointError(f"could not read the sharded checkpoint {target}: {_describe(exc)}") from None
    return state


def _is_failure(exc: BaseException) -> bool:
    """An error to agree on: any ``Exception``, and DCP's ``CheckpointException`` (a ``BaseException``
    carrying every rank's failure) -- but never an interrupt or an exit."""
    from torch.distributed.checkpoint.api import CheckpointException

    return isinstance(exc, (Exception, CheckpointException))


def _describe(exc: BaseException) -> str:
    """One line per failing rank for DCP's CheckpointException (its str() holds tracebacks)."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return f"{type(exc).__name__}: {exc}"
    by_message: dict[str, list[int]] = {}
    for rank, wrapped in sorted(failures.items()):
        inner = wrapped[0] if isinstance(wrapped, tuple) else getattr(wrapped, "exc", wrapped)  # (exc, frames)
        by_message.setdefault(f"{type(inner).__name__}: {str(inner).strip()}", []).append(rank)
    return "; ".join(
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {message}"
        for message, ranks in by_message.items()
    )


def _attempt(fn: Callable[[], T], message: str | None = None) -> tuple[T | None, BaseException | None]:
    """Run ``fn``: its result, or its exception (wrapped in our tree with ``message``) to agree on."""
    try:
        return fn(), None
    except CheckpointError as exc:
        return None, exc
    except BaseException as exc:
        if not _is_failure(exc):
            raise
        if message is None:
            return None, exc
        wrapped = StorageError(errno.EIO, f"{message}: {_describe(exc)}")
        wrapped.__cause__ = exc
        return None, wrapped
