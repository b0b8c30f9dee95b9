"""Non-blocking saves: snapshot into reusable host buffers, persist in one background thread.

:meth:`AsyncSaver.save` blocks the caller only for a *snapshot*: every tensor storage reachable
through the checkpoint's dicts, lists and tuples is copied into host buffers that are allocated
once and reused while the structure keeps its sizes (pinned memory for CUDA sources, plain memory
otherwise); everything else is deep-copied, so the caller may mutate its state as soon as the
call returns. Serialization (``torch.save``), hashing, the write, the commit
(:meth:`CheckpointManager.save`) and an optional ``on_done(result)`` callback then run in one
background thread. At most one save persists at a time and it owns the buffers, so extra host
memory stays at about one copy of the state: a save requested meanwhile either waits for it
(``when_busy="wait"``) or is skipped with a :class:`CheckpointWarning` (``"skip"``); nothing ever
queues. An error in the background is kept and raised by the next :meth:`~AsyncSaver.save`,
:meth:`~AsyncSaver.wait`, :meth:`~AsyncSaver.close` or :meth:`PendingSave.wait`. An unfinished
save is invisible by the manager's commit protocol, so abandoning one is always safe.

CUDA sources are copied with ``non_blocking=True`` on a side stream that first waits for the
caller's stream; the caller's stream then waits (on the GPU, not the CPU) for the copy, so later
kernels that update the weights in place cannot race it. ``overlap=True`` drops that GPU-side wait
so the copy overlaps the next forward/backward; the caller must then call
:meth:`AsyncSaver.wait_snapshot` before anything mutates the saved tensors (e.g. the optimizer).

Owns: the snapshot buffers and the one background thread. Must not: decide whether a save is due
or what to keep, or import Lightning.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, cast

import torch

from lightning_ckpt.errors import CheckpointError, CheckpointWarning, ConfigurationError
from lightning_ckpt.manager import CheckpointManager, SaveResult
from lightning_ckpt.tensors import is_dense

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

__all__ = ["AsyncSaver", "PendingSave", "SaveAbandonedError"]

log = logging.getLogger("lightning_ckpt")

WhenBusy = Literal["wait", "skip"]
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


class SaveAbandonedError(CheckpointError):
    """The save was abandoned by ``close(abandon=True)`` before it committed; nothing is visible."""


class PendingSave:
    """The handle of one background save: :meth:`done`, :meth:`wait` and what it cost.

    Attributes:
        name: the checkpoint name in the manager's directory.
        url: its URL.
        stall_seconds: how long the caller was blocked in :meth:`AsyncSaver.save` (waiting for the
            previous save included).
        snapshot_seconds: the part of the stall spent copying into the host buffers (for CUDA
            sources: enqueueing the copies).
        persist_seconds: serialize + write + commit + ``on_done`` in the background (``None`` until
            done).
    """

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.stall_seconds = 0.0
        self.snapshot_seconds = 0.0
        self.persist_seconds: float | None = None
        self._finished = threading.Event()
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self._reported = False
        self._cancel = threading.Event()
        self._snapshot: _Snapshot | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "done" if self.done() else "persisting"
        return f"PendingSave({self.url!r}, {state})"

    def done(self) -> bool:
        """Whether the save finished (committed, failed or abandoned)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> SaveResult:
        """Block until the save finished; return its result or raise its error.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds (the save goes on).
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the save of {self.url} did not finish within {timeout} s")
        if self._error is not None:
            self._reported = True
            raise self._error
        assert self._result is not None
        return self._result

    def wait_snapshot(self) -> None:
        """Block until the device-to-host copy of this save's tensors finished (no-op on CPU)."""
        snapshot = self._snapshot
        if snapshot is not None:
            snapshot.synchronize()


@dataclass
class _Snapshot:
    """A checkpoint rebuilt over host buffers, plus what must happen before it may be read."""

    state: Mapping[str, Any]
    events: list[Any] = field(default_factory=list)  # torch.cuda.Event per source device
    sources: list[torch.Tensor] = field(default_factory=list)  # kept alive until the copy is done

    def synchronize(self) -> None:
        for event in self.events:
            event.synchronize()
        self.events = []
        self.sources = []


class AsyncSaver:
    """Save checkpoints through ``manager`` without blocking the caller for the write.

    Args:
        manager: commits the checkpoints (its :meth:`~CheckpointManager.save` runs in the
            background thread).
        when_busy: what :meth:`save` does while the previous save still persists: ``"wait"`` for
            it, or ``"skip"`` the new save (counted in :attr:`skipped`, with a warning).
        overlap: CUDA only: do not make the caller's stream wait for the device-to-host copy;
            the caller promises to call :meth:`wait_snapshot` before mutating the saved tensors.

    Not thread-safe: call it from one thread (the training loop). Nothing global is registered;
    call :meth:`close` when done. The background thread is not a daemon, so an interpreter that
    exits normally first finishes the save in flight.
    """

    def __init__(self, manager: CheckpointManager, when_busy: WhenBusy = "wait", overlap: bool = False) -> None:
        if when_busy not in ("wait", "skip"):
            raise ConfigurationError(f"when_busy={when_busy!r} must be 'wait' or 'skip'")
        self.manager = manager
        self.when_busy: WhenBusy = when_busy
        self.overlap = overlap
        self.skipped = 0
        self._current: PendingSave | None = None
        self._closed = False
        self._layout: tuple[tuple[int, bool], ...] | None = None
        self._buffers: list[torch.Tensor] = []
        self._streams: dict[torch.device, Any] = {}

    def __repr__(self) -> str:
        return f"AsyncSaver({self.manager.url!r}, when_busy={self.when_busy!r})"

    # -- state ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a save is still persisting."""
        return self._current is not None and not self._current.done()

    @property
    def buffer_bytes(self) -> int:
        """Bytes of host memory held by the snapshot buffers."""
        return sum(b.numel() for b in self._buffers)

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        """The host buffers (one uint8 tensor per distinct source storage), for inspection."""
        return tuple(self._buffers)

    @property
    def pending(self) -> PendingSave | None:
        """The latest save (persisting or finished), if any."""
        return self._current

    # -- saving -----------------------------------------------------------------------------

    def save(
        self,
        checkpoint: Mapping[str, Any],
        name: str,
        *,
        on_done: Callable[[SaveResult], None] | None = None,
        **meta: Any,
    ) -> PendingSave | None:
        """Snapshot ``checkpoint`` and persist it as ``name`` in the background.

        ``meta`` are :meth:`CheckpointManager.save`'s keyword arguments (``epoch``, ``global_step``,
        ``metrics``, ...). ``on_done(result)`` runs in the background thread after the commit
        (retention belongs there). Returns the handle, or ``None`` when skipped.

        Raises:
            CheckpointError: the error of an earlier background save not yet reported (this save
                is then not started); or the saver is closed.
        """
        start = time.perf_counter()
        if self._closed:
            raise CheckpointError(f"{self!r} is closed")
        if "write" in meta:
            raise ConfigurationError("AsyncSaver.save serializes the snapshot itself; do not pass write=")
        previous = self._current
        if previous is not None and not previous.done():
            if self.when_busy == "skip":
                self.skipped += 1
                warnings.warn(
                    f"skipping the save of {self.manager.url_of(name)}: the previous save ({previous.url}) "
                    f"is still persisting ({self.skipped} skipped so far)",
                    CheckpointWarning,
                    stacklevel=2,
                )
                return None
            previous._finished.wait()
        self._raise_unreported()

        pending = PendingSave(name, self.manager.url_of(name))
        snap_start = time.perf_counter()
        incremental = meta.get("incremental")
        if incremental is not None:
            from lightning_ckpt.incremental import Incremental

            # before the copy: tensors unchanged since the last save are neither copied nor hashed
            job = incremental.prepare(checkpoint) if isinstance(incremental, Incremental) else incremental
            checkpoint, meta["incremental"] = job.state, job
        pending._snapshot = self._snapshot(checkpoint)
        meta = copy.deepcopy(meta)  # metrics dicts and the like may change once we return
        pending.snapshot_seconds = time.perf_counter() - snap_start
        thread = threading.Thread(
            target=self._persist, args=(pending, meta, on_done), name=f"lightning-ckpt-save:{name}", daemon=False
        )
        pending._thread = thread
        thread.start()
        self._current = pending
        pending.stall_seconds = time.perf_counter() - start
        return pending

    def wait_snapshot(self) -> None:
        """Block until the device-to-host copy of the latest save finished (no-op on CPU)."""
        if self._current is not None:
            self._current.wait_snapshot()

    def wait(self) -> SaveResult | None:
        """Block until no save persists; raise an unreported background error, else return the result."""
        current = self._current
        if current is None:
            return None
        current._finished.wait()
        self._raise_unreported()
        return current._result

    def close(self, abandon: bool = False) -> None:
        """Finish (or, with ``abandon=True``, give up) the save in flight; no more saves afterwards.

        ``abandon=True`` returns at once without raising (it is meant for error paths): the save in
        flight stops at its next write and leaves nothing visible, or it already committed. An
        unreported error of an earlier save is then logged as a :class:`CheckpointWarning`.
        """
        self._closed = True
        current = self._current
        if not abandon:
            try:
                self.wait()
            finally:
                self._release()
            return
        if current is not None:
            current._cancel.set()
            if current.done() and current._error is not None and not current._reported:
                current._reported = True
                warnings.warn(
                    f"a background save failed and was not reported: {current._error!r}",
                    CheckpointWarning,
                    stacklevel=2,
                )
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(abandon=exc_type is not None)

    def _release(self) -> None:
        # the save in flight (if any) holds its own references to the buffers it reads
        self._buffers = []
        self._layout = None

    def _raise_unreported(self) -> None:
        current = self._current
        if current is not None and current.done() and current._error is not None and not current._reported:
            current._reported = True
            raise current._error

    # -- background -------------------------------------------------------------------------

    def _persist(self, pending: PendingSave, meta: dict[str, Any], on_done: Callable[[SaveResult], None] | None
                 ) -> None:
        start = time.perf_counter()
        snapshot = pending._snapshot
        assert snapshot is not None
        try:
            snapshot.synchronize()
            if pending._cancel.is_set():
                raise SaveAbandonedError(f"the save of {pending.url} was abandoned before it started")
            state = dict(snapshot.state)

            def write(stream: Any) -> None:
                torch.save(state, cast(IO[bytes], _CancellableWriter(stream, pending._cancel, pending.url)))

            result = self.manager.save(state, pending.name, write=write, **meta)
            pending._result = result
            if on_done is not None:
                on_done(result)
        except BaseException as exc:  # noqa: BLE001 - kept for the caller, never lost
            if pending._cancel.is_set() and pending._result is None:
                error: BaseException = SaveAbandonedError(f"the save of {pending.url} was abandoned; nothing "
                                                          "was committed")
                error.__cause__ = exc
                pending._reported = True  # asked for: not an error to raise later
            elif isinstance(exc, CheckpointError):
                error = exc
            elif isinstance(exc, Exception):
                error = CheckpointError(f"the background save of {pending.url} failed: {exc!r}")
                error.__cause__ = exc
            else:
                error = exc
            if hasattr(error, "add_note"):
                error.add_note(f"raised in lightning-ckpt's background save of {pending.url}")
            pending._error = error
            log.debug("background save of %s failed: %r", pending.url, exc)
        finally:
            pending._snapshot = None
            pending.persist_seconds = time.perf_counter() - start
            pending._finished.set()

    # -- snapshot ---------------------------------------------------------------------------

    def _snapshot(self, checkpoint: Mapping[str, Any]) -> _Snapshot:
        """Copy ``checkpoint`` into the host buffers (allocated on first use or a layout change)."""
        if not isinstance(checkpoint, Mapping):
            raise ConfigurationError(f"a checkpoint must be a mapping, got {type(checkpoint).__name__}")
        tensors = _find_tensors(checkpoint)
        # one buffer per distinct source storage: shared storages (tied weights, views) stay shared
        storages: dict[tuple[torch.device, int], tuple[int, torch.UntypedStorage]] = {}
        plain: list[torch.Tensor] = []
        odd: list[torch.Tensor] = []
        for t in tensors:
            if not _is_plain(t):
                odd.append(t)
                continue
            plain.append(t)
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if key not in storages:
                storages[key] = (len(storages), storage)
        layout = tuple((s.nbytes(), s.device.type == "cuda") for _, s in storages.values())
        if layout != self._layout:
            self._buffers = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n, pin in layout]
            self._layout = layout
            log.debug("allocated %d host buffers (%d bytes)", len(layout), self.buffer_bytes)

        snapshot = _Snapshot(state={})
        memo: dict[int, Any] = {}
        with torch.no_grad():
            by_device: dict[torch.device, list[tuple[torch.Tensor, torch.UntypedStorage]]] = {}
            for index, storage in storages.values():
                buffer = self._buffers[index]
                if storage.device.type == "cuda":
                    by_device.setdefault(storage.device, []).append((buffer, storage))
                elif storage.nbytes():
                    buffer.copy_(_bytes_of(storage))
            for device, pairs in by_device.items():
                snapshot.events.append(self._copy_from_cuda(device, pairs, snapshot))
            for t in plain:
                index = storages[(t.device, t.untyped_storage().data_ptr())][0]
                memo[id(t)] = _view_like(t, self._buffers[index])
            for t in odd:  # sparse, quantized, subclasses...: an unbuffered copy, still exact
                memo[id(t)] = t.detach().to("cpu", copy=True) if t.device.type != "meta" else t.detach()
        state = copy.deepcopy(checkpoint, memo)  # containers and plain values; tensors come from memo
        snapshot.state = state
        return snapshot

    def _copy_from_cuda(
        self, device: torch.device, pairs: list[tuple[torch.Tensor, torch.UntypedStorage]], snapshot: _Snapshot
    ) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        caller = torch.cuda.current_stream(device)
        stream.wait_stream(caller)  # see every kernel the caller queued before save()
        with torch.cuda.stream(stream):
            for buffer, storage in pairs:
                source = _bytes_of(storage)
                # the caller may drop its tensors: keep the memory from being reused mid-copy
                source.record_stream(stream)
                snapshot.sources.append(source)
                buffer.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        if not self.overlap:
            caller.wait_event(event)  # in-place updates queued later run after the copy (GPU-side)
        return event


class _CancellableWriter:
    """Forwards writes to the manager's stream; raises once the save was abandoned."""

    def __init__(self, sink: Any, cancel: threading.Event, url: str) -> None:
        self._sink = sink
        self._cancel = cancel
        self._url = url

    def write(self, data: Any) -> int:
        if self._cancel.is_set():
            raise SaveAbandonedError(f"the save of {self._url} was abandoned")
        return self._sink.write(data)

    def flush(self) -> None:
        self._sink.flush()

    def writable(self) -> bool:
        return True


def _find_tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors reachable through mappings, lists, tuples and sets, in order, each once."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        if isinstance(item, torch.Tensor):
            seen.add(id(item))
            found.append(item)
        elif isinstance(item, Mapping):
            seen.add(id(item))
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple, set, frozenset)):
            seen.add(id(item))
            stack.extend(reversed(list(item)))
        # tensors hidden in other objects are cloned by deepcopy: exact, just not buffered
    return found


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) in _PLAIN_TENSOR_TYPES and is_dense(t)


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _view_like(t: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``t``'s dtype, shape, strides and offset over ``buffer`` (a copy of ``t``'s storage)."""
    view = torch.empty(0, dtype=t.dtype).set_(buffer.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(view, requires_grad=t.requires_grad)
    if t.requires_grad:
        view.requires_grad_(True)
    return view
