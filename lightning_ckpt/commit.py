"""The commit protocol's steps: how a checkpoint is written, replaced, copied and deleted.

A save of ``NAME`` *claims* the name (what it replaces, refusing a file we did not write, another
callback's checkpoint or another training history's), *begins* by writing its marker and choosing
the file its payload goes to (``NAME`` itself, or a fresh ``NAME~lckpt-<token>`` for a re-save),
writes the payload, *commits* by writing ``NAME.manifest.json`` last, *checks* that the committed
payload is whole, then *retires* the version it replaced and drops its marker. A failure before the
commit *abandons* the save (only its own files go). Deletion runs the protocol backwards; a
sharded checkpoint (a directory) is marked pending, written by many processes, then committed.
Every name used here comes from :mod:`lightning_ckpt.layout`.

:class:`CommitProtocol` holds these steps; :class:`~lightning_ckpt.manager.CheckpointManager` is
the one class built on it. It must not decide what a listing means (layout's scan does), load or
verify payloads (the manager and payload do), or choose what to keep (policies do).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from lightning_ckpt import layout, pieces
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    NameTakenError,
    StorageError,
)
from lightning_ckpt import digest as digests
from lightning_ckpt.integrity import DIGEST_FORMAT_VERSION, HashingWriter, Manifest, versions
from lightning_ckpt.layout import History, manifest_name, pending_name

if TYPE_CHECKING:
    from lightning_ckpt.incremental import Incremental, IncrementalSave
    from lightning_ckpt.layout import DirectoryScan
    from lightning_ckpt.security import Encryptor, Signer
    from lightning_ckpt.storage import Progress, Storage

__all__ = ["CommitProtocol", "SaveResult"]

log = logging.getLogger("lightning_ckpt")


@dataclass(frozen=True)
class SaveResult:
    """What one save produced and what it cost."""

    manifest: Manifest
    url: str
    seconds: float

    @property
    def throughput(self) -> float:
        """Bytes per second of the whole save (serialize + write + commit)."""
        return self.manifest.size / self.seconds if self.seconds > 0 else float("inf")


class CommitProtocol:
    """The write side of a checkpoint directory: save, copy, delete and sharded commits.

    What it needs from the class built on it (:class:`~lightning_ckpt.manager.CheckpointManager`):
    the attributes below, :meth:`url_of`, :meth:`read_manifest`, :meth:`_parse_manifest`,
    :meth:`_forget` (drop a kept verified payload) and :meth:`_progress`.
    """

    storage: Storage
    signer: Signer | None
    encryptor: Encryptor | None
    stale_after: float
    _held: dict[str, str]

    if TYPE_CHECKING:
        def url_of(self, name: str) -> str: ...
        def read_manifest(self, name: str) -> Manifest: ...
        def _parse_manifest(self, data: bytes, name: str) -> Manifest: ...
        def scan(self) -> DirectoryScan: ...
        def _forget(self, name: str) -> None: ...
        def _progress(self, verb: str, name: str,
                      progress: Progress | None) -> contextlib.AbstractContextManager[Progress | None]: ...

    def save(
        self,
        state: Mapping[str, Any],
        name: str,
        *,
        epoch: int | None = None,
        global_step: int | None = None,
        metrics: Mapping[str, float] | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        owner: str | None = None,
        weights_only: bool = False,
        extra: Mapping[str, Any] | None = None,
        write: Callable[[Any], None] | None = None,
        progress: Progress | None = None,
        history: History | None = None,
        incremental: Incremental | IncrementalSave | None = None,
    ) -> SaveResult:
        """Serialize ``state`` to ``name`` and commit it; return its manifest.

        ``write(stream)`` may replace the default ``torch.save(state, stream)`` (the async saver
        streams from its own buffers). On any failure nothing new becomes visible and older
        checkpoints are untouched. An existing committed ``name`` of the same ``owner`` (and, with
        ``history``, of the same training history) is replaced, and stays loadable until the new
        version is committed; any other file at ``name`` raises :class:`NameTakenError` (see
        :meth:`free_name`). ``progress(bytes_written, None)`` is called as blocks reach the storage.

        With ``incremental`` (an :class:`~lightning_ckpt.incremental.Incremental`, or a save it
        prepared), tensors whose bytes a committed checkpoint of this directory already holds are
        referenced instead of written (``write`` is then not used); the checkpoint stays complete.
        """
        layout.check_name(name)
        start = time.perf_counter()
        job = None
        if incremental is not None:
            from lightning_ckpt.incremental import plan

            job, state = plan(incremental, state)
        # fields no reader would accept are refused before anything is touched
        self._check_manifest(Manifest(name=name, size=0, digest="0" * 64, epoch=epoch, global_step=global_step,
                                      metrics=dict(metrics or {}), monitor=monitor, mode=mode, owner=owner,
                                      weights_only=weights_only, extra=dict(extra or {})))
        token = layout.new_token()
        with layout.in_flight(token):
            current, old = self._claim(name, owner, history)
            physical = self._begin_save(name, token, current, old)
            with self._committing(name, token, physical, current) as commit:
                with self._progress("saving", name, progress) as bar, self.storage.open_write(physical, progress=bar) as f:
                    latch = _ErrorLatch(f)
                    algorithm = digests.algorithm_for(signed=self.signer is not None)
                    writer = HashingWriter(latch, algorithm)  # type: ignore[arg-type]  # a write-only stream suffices
                    stream: Any = writer if self.encryptor is None else self.encryptor.writer(writer)  # type: ignore[arg-type]
                    try:
                        if job is not None:
                            import torch

                            torch.save(job.write(self.storage, dict(state), token, self.scan().committed,
                                                 self.encryptor, self.stale_after), stream)
                        elif write is None:
                            import torch

                            torch.save(dict(state), stream)
                        else:
                            write(stream)
                        if self.encryptor is not None:
                            stream.close()
                    except Exception:
                        # torch.save's zip writer answers a failed write with its own RuntimeError
                        # ("unexpected pos ...") on the way out; the storage's error is the real one
                        if latch.error is not None:
                            raise latch.error
                        raise
                    finally:
                        writer.close()
                extra = dict(extra or {})
                if self.encryptor is not None:
                    extra["encryption"] = self.encryptor.describe()
                manifest = Manifest(
                    name=name,
                    size=writer.size,
                    digest=writer.digest,
                    digest_algorithm=algorithm,
                    epoch=epoch,
                    global_step=global_step,
                    metrics=dict(metrics or {}),
                    monitor=monitor,
                    mode=mode,
                    owner=owner,
                    weights_only=weights_only,
                    versions=versions(),
                    extra=extra,
                    payload=None if physical == name else physical,
                    token=token,
                    **(history.fields() if history is not None else {}),
                    **{**(job.manifest_fields() if job is not None else {}), "format_version": DIGEST_FORMAT_VERSION},
                )
                commit(manifest)
            self._retire(manifest, old, current is not None)
        if job is not None:
            job.committed()
        if current is not None and b'"pieces"' in current:
            pieces.reclaim(self.storage, self.stale_after)  # the replaced version may have held a last reference
        return SaveResult(manifest, self.url_of(name), time.perf_counter() - start)

    def free_name(self, name: str, owner: str | None = None, history: History | None = None,
                  sharded: bool = False) -> str:
        """``name``, or the first ``name-vN`` that a save by ``owner`` in ``history`` may write
        (with ``sharded``, a sharded save: it may replace only a sharded checkpoint, and a
        single-file save only a single file).

        A name is free when nothing is there, or when it holds a committed checkpoint this save may
        replace (same owner, same history). A file we did not write, another callback's checkpoint
        or another history's is never replaced: the save goes to ``-v1``, ``-v2``, ... instead.
        """
        layout.check_name(name)
        candidate, version = name, 0
        while True:
            try:
                self._claim(candidate, owner, history, sharded)
                return candidate
            except NameTakenError:
                version += 1
                candidate = layout.versioned_name(name, version)

    def _claim(self, name: str, owner: str | None, history: History | None,
               sharded: bool = False) -> tuple[bytes | None, str | None]:
        """What a save of ``name`` replaces: (the committed manifest's bytes, its payload file).

        The payload file is ``""`` when another live writer is writing ``name`` itself (nothing to
        retire, and the save must go to a fresh name). Raises :class:`NameTakenError` where the
        save may not write ``name`` at all.
        """
        where = self.url_of(name)
        try:
            data = self.storage.read_bytes(manifest_name(name))
        except CheckpointNotFoundError:
            data = None
        if data is None:
            if self.storage.exists(name):
                writer = self._ours_uncommitted(name)
                if writer is None and self.storage.exists(manifest_name(name)):
                    return self._claim(name, owner, history, sharded)  # a save of ours committed meanwhile
                if writer is None:
                    raise NameTakenError(
                        f"{where} exists and has no lightning-ckpt manifest (a file we did not write, e.g. "
                        "Lightning's ModelCheckpoint's): refusing to overwrite it"
                    )
                if writer == "live":
                    return None, ""  # another writer is writing NAME itself: a fresh name, and NAME is not ours to retire
                return None, name  # a leftover of an interrupted save of ours: replaced, then removed
            return None, None
        try:
            existing = self._parse_manifest(data, name)
        except CheckpointError as exc:
            raise NameTakenError(f"{where} has a manifest that does not read ({exc}): refusing to replace it") from exc
        if existing.sharded != sharded:
            kinds = ("a single-file", "a sharded") if sharded else ("a sharded", "a single-file")
            raise NameTakenError(f"{where} is {kinds[0]} checkpoint; {kinds[1]} save may not replace it")
        why = layout.may_replace(existing, owner, history)
        if why is not None:
            raise NameTakenError(f"{where} is committed and may not be replaced by this save: {why}")
        return data, self._payload_name(existing)

    def _ours_uncommitted(self, name: str) -> str | None:
        """Whether the manifest-less file at ``name`` is ours: ``"live"`` (a writer is at it),
        ``"abandoned"`` (a leftover of an interrupted save), or None (not ours)."""
        found = None
        for fname in self._marker_files(name):
            marker = layout.Marker.parse(fname, self._read_or_none(fname))
            if marker.physical in (None, name):
                if not marker.abandoned(self.stale_after):
                    return "live"
                found = "abandoned"
        return found

    def _marker_files(self, name: str) -> list[str]:
        files = [f.name for f in self.storage.list()]
        return [f for f in files if (layout.marker_of(f) or ("", None))[0] == name]

    def _read_or_none(self, fname: str) -> bytes | None:
        try:
            return self.storage.read_bytes(fname)
        except CheckpointNotFoundError:
            return None

    def _begin_save(self, name: str, token: str, current: bytes | None, old: str | None) -> str:
        """Write the save's marker and choose the file its payload goes to.

        A name that is free is written directly, unless another writer's marker for it shows up
        once ours is written (two writers that both list after writing their markers cannot both
        miss each other): then, as for every re-save, a fresh name of our own, so two writers
        never write the same file.
        """
        fresh = layout.physical_name(name, token)
        if current is not None or old is not None:
            self._mark(layout.Marker.mine(name, token, "save", fresh, old or None))
            return fresh
        self._mark(layout.Marker.mine(name, token, "save", name, old))
        if self._others_writing(name, token):
            self._mark(layout.Marker.mine(name, token, "save", fresh, old))
            return fresh
        return name

    @contextlib.contextmanager
    def _committing(self, name: str, token: str, physical: str,
                    current: bytes | None) -> Iterator[Callable[[Manifest], None]]:
        """Around writing a save's payload to ``physical``: yields ``commit(manifest)`` (write the
        manifest, then check the committed payload). A save that fails before it committed is
        abandoned on the way out: only its own files go, never the version it was to replace."""
        committed = False

        def commit(manifest: Manifest) -> None:
            nonlocal committed
            committed = self._write_commit(manifest)
            self._check_commit(manifest, current)

        try:
            yield commit
        except BaseException:
            if not committed:
                self._abandon(name, token, physical)
            raise

    def _others_writing(self, name: str, token: str) -> bool:
        return any(layout.marker_of(f) != (name, token) for f in self._marker_files(name))

    def _mark(self, marker: layout.Marker) -> None:
        assert marker.token is not None
        self.storage.write_bytes(layout.marker_name(marker.name, marker.token), marker.to_json())

    def _write_commit(self, manifest: Manifest) -> bool:
        """Write the manifest; True once it is written. A failed write whose effect is unknown
        (a lost response) is settled by reading back: if the manifest there is ours, it committed."""
        try:
            self._write_manifest(manifest)
        except BaseException:
            if not self._is_mine(manifest):
                raise
        self._forget(manifest.name)
        return True

    def _check_commit(self, manifest: Manifest, previous: bytes | None) -> None:
        """Check that the committed payload is whole; a save whose payload vanished or shrank
        (another process removed it, the storage lost data) is never reported as a success, and
        the previous manifest is put back (its payload has not been touched yet).

        If the check itself cannot be done, the error is raised and the commit stands: the
        marker stays, so :meth:`cleanup` later removes whichever version is not referenced.
        """
        name = manifest.name
        physical = manifest.payload or name
        try:
            size: int | None = self.storage.info(physical).size
        except CheckpointNotFoundError:
            size = None
        table = pieces.table_of(manifest)
        gone = pieces.missing(self.storage, table) if table is not None and size == manifest.size else []
        if size == manifest.size and not gone:
            return
        if previous is not None:
            self.storage.write_bytes(manifest_name(name), previous)
        else:
            self.storage.delete(manifest_name(name))
        assert manifest.token is not None
        self._abandon(name, manifest.token, physical)
        if gone:
            raise StorageError(errno.EIO, f"{self.url_of(name)}: piece file {gone[0]} it references is missing after "
                               "its commit (another process removed it); the save did not commit")
        raise StorageError(
            errno.EIO,
            f"the payload of {self.url_of(name)} is {'missing' if size is None else f'{size} bytes'} after "
            f"its commit, {manifest.size} bytes were written (the storage lost data, or another process "
            "removed or overwrote it); the save did not commit",
        )

    def _is_mine(self, manifest: Manifest) -> bool:
        try:
            current = self._parse_manifest(self.storage.read_bytes(manifest_name(manifest.name)), manifest.name)
        except CheckpointError:
            return False
        return current.token == manifest.token

    def _retire(self, manifest: Manifest, old: str | None, replaced: bool) -> None:
        """After a commit: remove the replaced payload, give a fresh payload its plain name, drop
        the marker. A failure here leaves the marker, so cleanup() finishes the job.

        The plain name keeps the directory readable by stock tools (``torch.load(".../last.ckpt")``):
        on a local disk one rename retires the old payload and moves the new one; on object stores
        a server-side copy overwrites it, the manifest is rewritten, then the fresh name goes.
        Readers in between follow the manifest, falling back to the plain name once the fresh one
        is gone; either way the bytes are checked against the manifest.
        """
        name, token = manifest.name, manifest.token
        physical = manifest.payload or name
        old = old or None
        assert token is not None
        try:
            # the plain name is ours to overwrite when it held the replaced version (or a stale one
            # next to a committed version), or is free; and only while no other writer of this name
            # is at work and the commit there is still ours
            settle = (
                physical != name
                and (old == name or replaced or not self.storage.exists(name))
                and not self._others_writing(name, token)
                and self._is_mine(manifest)
            )
            if old is not None and old != physical and not (settle and old == name):
                self.storage.delete(old)
            if settle:
                if self.storage.is_local:
                    self.storage.rename(physical, name)
                else:
                    # never copied into the old file in place: where a backend writes into an existing
                    # file, that file may be a hard link shared with another checkpoint (save_last=True)
                    self.storage.delete(name)
                    self.storage.copy(physical, name)
                self._write_manifest(Manifest(**{**manifest.__dict__, "payload": None}))
                self.storage.delete(physical)
            self.storage.delete(layout.marker_name(name, token))
        except CheckpointError as exc:
            log.warning("%s committed, but tidying up after it failed (%s); cleanup() will finish", self.url_of(name), exc)
        self._forget(name)

    def _payload_name(self, manifest: Manifest) -> str:
        """The file that holds ``manifest``'s payload (its fresh name, or the plain name once settled)."""
        if manifest.payload is None or manifest.payload == manifest.name:
            return manifest.name
        if not self.storage.exists(manifest.payload):
            return manifest.name  # moved to its plain name, the manifest not yet rewritten
        return manifest.payload

    def copy(self, src: str, dst: str, link: bool = True, *, history: History | None = None,
             **changes: Any) -> SaveResult:
        """Commit ``dst`` as a copy of committed ``src`` (e.g. ``last.ckpt``); server-side on stores.

        On a local disk ``link=True`` hard-links (the same bytes under two names), ``link=False``
        writes an independent copy.
        """
        layout.check_name(dst)
        start = time.perf_counter()
        manifest = self.read_manifest(src)
        token = layout.new_token()
        with layout.in_flight(token):
            current, old = self._claim(dst, changes.get("owner", manifest.owner), history, manifest.sharded)
            if manifest.sharded:
                return self._copy_sharded(src, dst, manifest, history, changes, start)
            physical = self._begin_save(dst, token, current, old)
            with self._committing(dst, token, physical, current) as commit:
                self.storage.copy(self._payload_name(manifest), physical, link=link)
                copied = _copy_of(manifest, dst, history, changes, payload=None if physical == dst else physical,
                                  token=token)
                commit(copied)
            self._retire(copied, old, current is not None)
        return SaveResult(copied, self.url_of(dst), time.perf_counter() - start)

    def _copy_sharded(self, src: str, dst: str, manifest: Manifest, history: History | None,
                      changes: dict[str, Any], start: float) -> SaveResult:
        # a sharded checkpoint is a directory: still replaced in place (the old copy is decommitted first)
        self._begin_sharded(dst)
        try:
            self.storage.delete_tree(dst)
            source, target = self.storage.child(src), self.storage.child(dst)
            for path in manifest.files:
                source.copy_to(path, target)
            copied = _copy_of(manifest, dst, history, changes)
            self._write_manifest(copied)
        except BaseException:
            self.abandon_directory(dst)
            raise
        self.storage.delete(pending_name(dst))
        self._release(dst)
        return SaveResult(copied, self.url_of(dst), time.perf_counter() - start)

    def _check_manifest(self, manifest: Manifest) -> None:
        """Raise :class:`ConfigurationError` unless every reader accepts ``manifest`` (else it would
        be committed, then skipped as junk by every listing)."""
        try:
            Manifest.from_json(manifest.to_json(), self.url_of(manifest.name))
        except (CorruptCheckpointError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"refusing to commit {manifest.name}: {exc}") from None

    def _write_manifest(self, manifest: Manifest) -> None:
        self._check_manifest(manifest)
        if self.signer is None:
            data = manifest.to_json()
        else:
            fields = json.loads(manifest.to_json())  # exactly what a reader will parse and check
            fields["signature"] = self.signer.sign(fields)
            data = json.dumps(fields, sort_keys=True, indent=1).encode()
        self.storage.write_bytes(manifest_name(manifest.name), data)

    def _abandon(self, name: str, token: str, physical: str) -> None:
        """Best-effort removal of a failed save's own files (never the committed version it was to
        replace); what cannot be removed now, cleanup() will."""
        try:
            if physical != name or not self.storage.exists(manifest_name(name)):
                self.storage.delete(physical)
            self.storage.delete(layout.marker_name(name, token))
        except CheckpointError as exc:
            log.warning("could not remove the files of a failed save of %s (%s); cleanup will retry",
                        self.url_of(name), exc)

    # -- deleting ----------------------------------------------------------------------------

    def delete(self, name: str) -> None:
        """Delete committed checkpoint ``name`` (marker, manifest, payload, marker)."""
        manifest = self.read_manifest(name)  # only ever delete what we committed
        if manifest.sharded:
            self.storage.write_bytes(pending_name(name), self._sharded_marker(name, "delete"))
            self.storage.delete(manifest_name(name))
            self.storage.delete_tree(name)
            self.storage.delete(pending_name(name))
            self._forget(name)
            return
        token = layout.new_token()
        with layout.in_flight(token):
            physical = manifest.payload or name
            self._mark(layout.Marker.mine(name, token, "delete", physical, name if physical != name else None))
            self.storage.delete(manifest_name(name))
            self.storage.delete(physical)
            if physical != name:
                self.storage.delete(name)  # moved to its plain name, the manifest not yet rewritten
            self.storage.delete(layout.marker_name(name, token))
        self._forget(name)
        if manifest.pieces:
            pieces.reclaim(self.storage, self.stale_after)

    # -- sharded checkpoints (directories written by many processes) ---------------------------

    def begin_directory(self, name: str) -> Storage:
        """Mark checkpoint directory ``name`` pending (clearing an older one) and return it.

        Until :meth:`commit` writes its manifest nothing lists, resumes from or prunes it, and
        :meth:`cleanup` removes it after a crash.
        """
        layout.check_name(name)
        self._begin_sharded(name)
        self.storage.delete_tree(name)
        return self.storage.child(name)

    def _sharded_marker(self, name: str, op: str) -> bytes:
        token = layout.new_token()
        layout.hold(token)
        self._held[name] = token
        return layout.Marker.mine(name, token, op, name).to_json()

    def _begin_sharded(self, name: str) -> None:
        # a directory cannot be written under a fresh name and renamed on object stores: a sharded
        # checkpoint is still replaced in place (decommitted first)
        self.storage.write_bytes(pending_name(name), self._sharded_marker(name, "save"))
        self.storage.delete(manifest_name(name))
        self._forget(name)

    def _release(self, name: str) -> None:
        token = self._held.pop(name, None)
        if token is not None:
            layout.release(token)

    def commit(self, manifest: Manifest) -> None:
        """Commit a checkpoint whose files are all durable: write its manifest, drop the marker."""
        self._write_manifest(manifest)
        self.storage.delete(pending_name(manifest.name))
        self._release(manifest.name)

    def abandon_directory(self, name: str) -> None:
        """Best-effort removal of a failed sharded save (what stays, :meth:`cleanup` removes)."""
        try:
            self.storage.delete(manifest_name(name))
            self.storage.delete_tree(name)
            self.storage.delete(pending_name(name))
        except CheckpointError as exc:
            log.warning("could not remove %s after a failed save (%s); cleanup will retry", name, exc)
        finally:
            self._release(name)


def _copy_of(manifest: Manifest, dst: str, history: History | None, changes: Mapping[str, Any],
             **fields: Any) -> Manifest:
    """The manifest of ``dst``, a copy of ``manifest`` (with ``changes``), made now, in ``history``."""
    copied = {**manifest.__dict__, **changes, "name": dst, "created": time.time(), **fields}
    if history is not None:
        copied.update(history.fields())
    return Manifest(**copied)


class _ErrorLatch:
    """Forwards writes to the storage's stream and remembers the first error it raised."""

    def __init__(self, sink: IO[bytes]) -> None:
        self._sink = sink
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self._sink.write(data) or 0)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._sink.flush()
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise

    def writable(self) -> bool:
        return True
