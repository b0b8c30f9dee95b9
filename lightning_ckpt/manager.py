"""The checkpoint manager: save, list, verify, load, copy, prune and clean one directory.

No Lightning here, so the CLI and plain-PyTorch users reuse it. The commit protocol for a
checkpoint ``NAME`` in the directory is::

    NAME.pending          written first: "a save (or delete) of NAME by us is in progress"
    NAME                  the payload, a plain ``torch.save`` file, written whole or not at all
    NAME.manifest.json    written last: size, sha256, epoch, step, metrics -> NAME is committed
    (NAME.pending removed)

With a :class:`~lightning_ckpt.security.Signer` every manifest carries an HMAC signature that
readers check; with an :class:`~lightning_ckpt.security.Encryptor` the payload is encrypted
while it streams (torch.save -> encrypting writer -> hashing writer -> storage), and the manifest
records the ciphertext's size and sha256, so verifying needs no key.

Readers see only committed checkpoints. A crash leaves at most a ``.pending`` marker and a
payload without a manifest; :meth:`CheckpointManager.cleanup` removes exactly those (the marker
proves we wrote them) and never touches any other file. Deletion runs the protocol backwards
(marker, manifest, payload, marker), so a checkpoint is never half-deleted and visible.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    IncompatibleCheckpointError,
    KeyMissingError,
    NameTakenError,
    ShardedCheckpointError,
    StorageError,
    TamperedCheckpointError,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
)
from lightning_ckpt.integrity import (
    MANIFEST_SUFFIX,
    MAX_MANIFEST_BYTES,
    PENDING_SUFFIX,
    HashingWriter,
    Manifest,
    manifest_name,
    parse_json,
    versions,
)
from lightning_ckpt.policies import KeepLatest, KeepTopK, RetentionPolicy, best_of
from lightning_ckpt.security import Encryptor, Signer
from lightning_ckpt import layout
from lightning_ckpt.layout import History
from lightning_ckpt.storage import Progress, RetryPolicy, Storage, open_regular, split_url
from lightning_ckpt.unpickle import refused_global

if TYPE_CHECKING:
    import torch

# torch is imported by the methods that serialize or load (about 1.5 s): listing, reading
# manifests, verifying and pruning need none of it, so `lightning-ckpt ls/verify/prune` start fast

__all__ = ["PENDING_SUFFIX", "CheckpointManager", "DirectoryScan", "SaveResult", "load_checkpoint"]

log = logging.getLogger("lightning_ckpt")

READ_BLOCK = 8 * 2**20
MapLocation = Any  # whatever torch.load accepts


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


@dataclass
class DirectoryScan:
    """One directory as the commit protocol sees it: what readers use, and what they skip."""

    #: committed checkpoints whose manifest parses (and authenticates, with a signer), oldest first
    committed: list[Manifest] = field(default_factory=list)
    #: (name, why) for manifests that do not parse, do not authenticate, or describe another file
    damaged: list[tuple[str, str]] = field(default_factory=list)
    #: names whose manifest exists but whose payload does not
    orphaned: list[str] = field(default_factory=list)
    #: leftovers of interrupted saves: exactly what :meth:`CheckpointManager.cleanup` removes
    leftovers: list[str] = field(default_factory=list)
    #: ``*.ckpt`` files with neither a manifest nor a marker (not written by us)
    unmanaged: list[str] = field(default_factory=list)
    #: (name, key seen) for damaged ones refused only for want of a configured key: signed with
    #: another key (its id), ``"unsigned"`` under a signer, ``"unencrypted"`` under an encryptor
    unverifiable: list[tuple[str, str]] = field(default_factory=list)
    #: markers and files of saves whose writer is still alive (never removed)
    in_progress: list[str] = field(default_factory=list)
    #: files that abandoned saves were writing: on S3 their unfinished uploads are aborted by cleanup
    abandoned_writes: list[str] = field(default_factory=list)
    #: how many files the directory holds
    files: int = 0


class CheckpointManager:
    """Committed checkpoints in one directory URL.

    Args:
        dirpath: the directory, as a path or any fsspec URL.
        storage_options: passed to fsspec for every operation.
        retry: retry policy for transient storage failures.
        storage: an already built :class:`Storage` (overrides the three above).
        signer: sign every manifest written, and refuse unsigned or badly signed ones on read
            (listing skips them with a warning). Off by default.
        encryptor: encrypt every payload written; decrypt on load (its keys must include the one
            a checkpoint was written with, else :class:`KeyMissingError`). Off by default.
        spool_dir: a local directory for the temporary files that remote checkpoints are
            downloaded into while loading (default: the system's temporary directory). Needs
            free space for the largest checkpoint loaded.
        stale_after: seconds after which :meth:`cleanup` treats the unfinished save of a writer on
            *another host* as abandoned (a writer on this host is checked directly).
    """

    def __init__(
        self,
        dirpath: str,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        storage: Storage | None = None,
        *,
        signer: Signer | None = None,
        encryptor: Encryptor | None = None,
        spool_dir: str | None = None,
        stale_after: float = layout.STALE_AFTER,
    ) -> None:
        if spool_dir is not None and not os.path.isdir(spool_dir):
            raise ConfigurationError(f"spool_dir={spool_dir!r} is not an existing directory")
        self.storage = storage or Storage(dirpath, storage_options, retry)
        self.signer = signer
        self.encryptor = encryptor
        self.spool_dir = spool_dir
        self.stale_after = stale_after
        #: ``(verb, name) -> progress`` for transfers nobody passed a ``progress`` to (the callback
        #: and the command line set it to draw a bar on a terminal); closed when the transfer ends
        self.transfer_progress: Callable[[str, str], Progress | None] | None = None
        self._verified: dict[str, tuple[Manifest, _Source]] = {}
        self._held: dict[str, str] = {}  # sharded saves in flight: name -> marker token

    @property
    def url(self) -> str:
        """The directory URL."""
        return self.storage.url

    def url_of(self, name: str) -> str:
        """The URL of checkpoint ``name``."""
        return self.storage.url_of(name)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.url!r})"

    # -- saving -----------------------------------------------------------------------------

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
    ) -> SaveResult:
        """Serialize ``state`` to ``name`` and commit it; return its manifest.

        ``write(stream)`` may replace the default ``torch.save(state, stream)`` (the async saver
        streams from its own buffers). On any failure nothing new becomes visible and older
        checkpoints are untouched. An existing committed ``name`` of the same ``owner`` (and, with
        ``history``, of the same training history) is replaced, and stays loadable until the new
        version is committed; any other file at ``name`` raises :class:`NameTakenError` (see
        :meth:`free_name`). ``progress(bytes_written, None)`` is called as blocks reach the storage.
        """
        layout.check_name(name)
        start = time.perf_counter()
        # fields no reader would accept are refused before anything is touched
        self._check_manifest(Manifest(name=name, size=0, sha256="0" * 64, epoch=epoch, global_step=global_step,
                                      metrics=dict(metrics or {}), monitor=monitor, mode=mode, owner=owner,
                                      weights_only=weights_only, extra=dict(extra or {})))
        token = layout.new_token()
        with layout.in_flight(token):
            current, old = self._claim(name, owner, history)
            physical = self._begin_save(name, token, current, old)
            committed = False
            try:
                with self._progress("saving", name, progress) as bar, self.storage.open_write(physical, progress=bar) as f:
                    latch = _ErrorLatch(f)
                    writer = HashingWriter(latch)  # type: ignore[arg-type]  # a write-only stream suffices
                    stream: Any = writer if self.encryptor is None else self.encryptor.writer(writer)  # type: ignore[arg-type]
                    try:
                        if write is None:
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
                extra = dict(extra or {})
                if self.encryptor is not None:
                    extra["encryption"] = self.encryptor.describe()
                manifest = Manifest(
                    name=name,
                    size=writer.size,
                    sha256=writer.sha256,
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
                    run=history.run if history is not None else None,
                    lineage=[[r, s] for r, s in history.lineage] if history is not None else [],
                )
                committed = self._write_commit(manifest)
                self._check_commit(manifest, current)
            except BaseException:
                if not committed:
                    self._abandon(name, token, physical)
                raise
            self._retire(manifest, old, current is not None)
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
        if size == manifest.size:
            return
        if previous is not None:
            self.storage.write_bytes(manifest_name(name), previous)
        else:
            self.storage.delete(manifest_name(name))
        assert manifest.token is not None
        self._abandon(name, manifest.token, physical)
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
            committed = False
            try:
                self.storage.copy(self._payload_name(manifest), physical, link=link)
                fields = {**manifest.__dict__, **changes, "name": dst, "created": time.time(),
                          "payload": None if physical == dst else physical, "token": token}
                if history is not None:
                    fields.update(run=history.run, lineage=[[r, s] for r, s in history.lineage])
                copied = Manifest(**fields)
                committed = self._write_commit(copied)
                self._check_commit(copied, current)
            except BaseException:
                if not committed:
                    self._abandon(dst, token, physical)
                raise
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
            fields = {**manifest.__dict__, **changes, "name": dst, "created": time.time()}
            if history is not None:
                fields.update(run=history.run, lineage=[[r, s] for r, s in history.lineage])
            copied = Manifest(**fields)
            self._write_manifest(copied)
        except BaseException:
            self.abandon_directory(dst)
            raise
        self.storage.delete(dst + PENDING_SUFFIX)
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

    def _parse_manifest(self, data: bytes, name: str) -> Manifest:
        """Parse (and with a signer, authenticate) the manifest bytes of ``name``.

        With an encryptor, an unencrypted checkpoint is refused here (unless the encryptor allows
        plaintext), so listing skips it like any other checkpoint that is not ours.
        """
        where = self.url_of(name)
        raw = parse_json(data, where)
        manifest = Manifest.from_fields(raw, where)  # the format checks first: damaged is damaged
        if self.signer is not None:
            self.signer.check(raw, f"the manifest of {where}")
        if self.encryptor is not None:
            self.encryptor.check_encrypted(manifest.extra.get("encryption"), where)
        return manifest

    def _read_manifest_bytes(self, name: str) -> bytes:
        """The bytes of ``name``'s manifest, refusing one too large to be a manifest we wrote."""
        data = self.storage.read_bytes(manifest_name(name), limit=MAX_MANIFEST_BYTES)
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"the manifest of {self.url_of(name)} is larger than {MAX_MANIFEST_BYTES // 2**20} MiB "
                "(not a manifest we wrote)"
            )
        return data

    def _forget(self, name: str) -> None:
        kept = self._verified.pop(name, None)
        if kept is not None:
            kept[1].close()

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

    # -- listing ----------------------------------------------------------------------------

    def manifests(self, owner: str | None = None) -> list[Manifest]:
        """Committed checkpoints, oldest first; ``owner`` filters to one callback's files.

        A manifest that cannot be read is reported with a warning and left out.
        """
        found = self.scan()
        for name, why in found.damaged:
            warnings.warn(f"skipping {self.url_of(name)}: {why}", CheckpointWarning, stacklevel=2)
        return [m for m in found.committed if owner is None or m.owner == owner]

    def scan(self) -> DirectoryScan:
        """One listing of the directory, sorted into committed, damaged, orphaned, leftover and foreign files.

        Reads every manifest and marker, never a payload, and changes nothing.
        """
        listing = {f.name: f for f in self.storage.list()}
        files = set(listing)
        found = DirectoryScan(files=len(files))
        subdirs: set[str] | None = None

        def is_dir(name: str) -> bool:  # a sharded checkpoint is a directory: listed only when one is met
            nonlocal subdirs
            if subdirs is None:
                subdirs = set(self.storage.dirs())
            return name in subdirs

        markers: list[tuple[bool, layout.Marker]] = []
        for fname in sorted(files):
            if layout.is_temp(fname):
                if layout.temp_abandoned(fname, listing[fname].mtime, self.stale_after):
                    found.leftovers.append(fname)
                else:
                    found.in_progress.append(fname)
            elif layout.marker_of(fname) is not None:
                marker = layout.Marker.parse(fname, self._read_or_none(fname))
                if marker.abandoned(self.stale_after):
                    markers.append((layout.marker_of(fname)[1] is None, marker))  # type: ignore[index]
                    found.leftovers.append(fname)
                else:
                    found.in_progress.append(fname)
                    found.in_progress.extend(p for p in (marker.physical,) if p and p in files)
            elif fname.endswith(MANIFEST_SUFFIX):
                name = fname[: -len(MANIFEST_SUFFIX)]
                if name not in files and not any(layout.logical_name(f) == name for f in files) and not is_dir(name):
                    found.orphaned.append(name)
                    continue
                try:
                    manifest = self._parse_manifest(self._read_manifest_bytes(name), name)
                except CheckpointNotFoundError:
                    continue  # deleted since the listing
                except (CorruptCheckpointError, IncompatibleCheckpointError) as exc:
                    found.damaged.append((name, str(exc)))
                    if getattr(exc, "key_seen", None) is not None:
                        found.unverifiable.append((name, exc.key_seen))  # type: ignore[attr-defined]
                    continue
                if manifest.name != name:
                    found.damaged.append((name, f"its manifest describes {manifest.name!r}"))
                    continue
                held = manifest.payload if manifest.payload in files else name
                if (manifest.sharded and name in files) or (not manifest.sharded and held not in files and is_dir(name)):
                    found.damaged.append((name, "its manifest describes a " + (
                        "directory of shards, but it is a file" if manifest.sharded else
                        "single file, but it is a directory")))
                    continue
                if not manifest.sharded and held not in files:
                    found.orphaned.append(name)
                    continue
                found.committed.append(manifest)
        referenced = {m.payload if m.payload in files else m.name for m in found.committed}
        damaged = {n for n, _ in found.damaged}
        for plain, marker in markers:
            found.abandoned_writes.append(marker.name if plain else (marker.physical or marker.name))
            if plain:  # a NAME.pending marker (older versions, sharded saves): NAME itself was written
                if marker.name in files and manifest_name(marker.name) not in files:
                    found.leftovers.append(marker.name)
                elif manifest_name(marker.name) not in files and is_dir(marker.name):
                    found.leftovers.append(marker.name + "/")
                if marker.name in damaged:
                    found.leftovers.append(manifest_name(marker.name))
                continue
            if marker.name in damaged and marker.op == "save":
                # a commit cut short on a filesystem without atomic writes: the marker proves the
                # half-written manifest is ours
                found.leftovers.append(manifest_name(marker.name))
                referenced.discard(marker.name)
            for path in (marker.physical, marker.old):
                if path and path in files and path not in referenced:
                    found.leftovers.append(path)
        in_progress = set(found.in_progress)
        for fname in files:
            # a version of ours (by its reserved name) that no manifest and no live save holds:
            # superseded by a concurrent writer's commit
            if layout.logical_name(fname) is not None and fname not in referenced and fname not in in_progress:
                found.leftovers.append(fname)
        found.leftovers = sorted(set(found.leftovers))
        claimed = {*found.leftovers, *in_progress, *found.orphaned, *(m.name for m in found.committed), *damaged}
        found.unmanaged = sorted(f for f in files if f.endswith(".ckpt") and f not in claimed)
        found.committed.sort(key=lambda m: (m.global_step or 0, m.created))
        return found

    def is_pending(self, name: str) -> bool:
        """Whether a save (or delete) of ``name`` by us was begun and has not finished (or was interrupted)."""
        return self.storage.exists(name + PENDING_SUFFIX) or bool(self._marker_files(name))

    def read_manifest(self, name: str) -> Manifest:
        """The manifest of committed ``name``; raises if absent or uncommitted."""
        try:
            data = self._read_manifest_bytes(name)
        except CheckpointNotFoundError:
            if self.is_pending(name):
                raise UncommittedCheckpointError(
                    f"{self.url_of(name)} was never committed (an interrupted or failed save)"
                ) from None
            if self.is_directory(name):
                raise UncommittedCheckpointError(
                    f"{self.url_of(name)} is a directory without a lightning-ckpt manifest "
                    f"({manifest_name(name)} is missing)"
                ) from None
            if self.storage.exists(name):
                raise UncommittedCheckpointError(
                    f"{self.url_of(name)} has no lightning-ckpt manifest ({manifest_name(name)} is missing)"
                ) from None
            raise CheckpointNotFoundError(f"no checkpoint at {self.url_of(name)}") from None
        manifest = self._parse_manifest(data, name)
        if manifest.name != name:
            raise CorruptCheckpointError(f"the manifest of {self.url_of(name)} describes {manifest.name!r}")
        return manifest

    # -- verifying and loading --------------------------------------------------------------

    def verify(self, name: str, keep: bool = False, progress: Progress | None = None) -> Manifest:
        """Stream ``name`` and check size and sha256 against its manifest.

        With ``keep=True`` the verified payload is kept for the next :meth:`load` of ``name``, so
        resolving ``"last"`` and loading it read the payload once: a local file stays open (the
        load reads exactly the bytes that were hashed), a remote one stays in its download spool.
        Nothing is kept in memory.
        """
        manifest = self.read_manifest(name)
        if manifest.sharded:
            self.verify_files(name, manifest)
            return manifest
        with self._progress("verifying", name, progress) as bar:
            source = self._fetch(name, manifest, bar)
        if keep:
            self._keep(name, manifest, source)
        else:
            source.close()
        return manifest

    def _keep(self, name: str, manifest: Manifest, source: _Source) -> None:
        for _, old in self._verified.values():
            old.close()
        self._verified = {name: (manifest, source)}

    def _fetch(self, name: str, manifest: Manifest | None, progress: Progress | None = None) -> _Source:
        """The payload of ``name``, checked against ``manifest`` (unchecked without one) as it streams.

        A local file is hashed in place and kept open; a remote one is downloaded into an
        anonymous temporary spool file in ``spool_dir`` while it is hashed. Either way only one
        8 MiB block is in memory at a time.
        """
        url = self.url_of(name)
        digest = hashlib.sha256()
        limit = None if manifest is None else manifest.size
        physical = name if manifest is None else self._payload_name(manifest)
        if self.storage.is_local:
            try:
                source = self._open_local(name, physical)
            except StorageError as exc:
                if manifest is not None and isinstance(exc.__cause__, IsADirectoryError):
                    raise CorruptCheckpointError(f"{url} is a directory, but its manifest describes a file") from None
                raise
            try:
                n = _hash_file(source.file, digest, limit, progress, lambda exc: self.storage.translate(exc, "read", url))
            except BaseException:
                source.close()
                raise
        else:
            source = self._spool(name, manifest, physical)
            spool = source.file

            def sink(block: memoryview) -> None:
                try:
                    spool.write(block)
                except OSError as exc:  # the local spool, not the storage, failed
                    raise StorageError(exc.errno or errno.EIO, f"could not spool {url} to {self.spool_dir or tempfile.gettempdir()}: {exc}") from exc
                digest.update(block)

            def restart() -> None:
                nonlocal digest
                spool.seek(0)
                spool.truncate()
                digest = hashlib.sha256()

            try:
                n = self.storage.stream(physical, sink, limit=limit, restart=restart, progress=progress)
                spool.flush()
            except BaseException:
                source.close()
                raise
        source.size = n
        if manifest is not None:
            try:
                if n != manifest.size:
                    raise CorruptCheckpointError(
                        f"{url} is {'longer' if n > manifest.size else f'{n} bytes'}; its manifest says "
                        f"{manifest.size} bytes (truncated or overwritten)"
                    )
                if digest.hexdigest() != manifest.sha256:
                    raise CorruptCheckpointError(f"{url} does not match the sha256 in its manifest (damaged)")
            except BaseException:
                source.close()
                raise
        return source

    def _open_local(self, name: str, physical: str) -> _Source:
        path = self.storage.path(physical)
        try:
            f = open_regular(path)  # a FIFO or device named like a checkpoint is refused, never read
        except CorruptCheckpointError:
            raise CorruptCheckpointError(
                f"{self.url_of(name)} is not a regular file (a FIFO, socket or device?); refusing to read it"
            ) from None
        except OSError as exc:
            raise self.storage.translate(exc, "read", self.url_of(name)) from exc
        try:
            st = os.fstat(f.fileno())
        except OSError as exc:
            f.close()
            raise self.storage.translate(exc, "read", self.url_of(name)) from exc
        return _Source(file=f, path=path, stamp=_stamp(st))

    def _spool(self, name: str, manifest: Manifest | None, physical: str) -> _Source:
        where = self.spool_dir or tempfile.gettempdir()
        if manifest is not None:
            try:
                stored = self.storage.info(physical).size
            except StorageError as exc:
                if isinstance(exc.__cause__, IsADirectoryError):
                    raise CorruptCheckpointError(f"{self.url_of(name)} is a directory, not a checkpoint file") from None
                raise
            if stored != manifest.size:  # before downloading: a size claim must not fill a disk
                raise CorruptCheckpointError(
                    f"{self.url_of(name)} is {stored} bytes; its manifest says {manifest.size} bytes "
                    "(truncated or overwritten)"
                )
            try:
                free = shutil.disk_usage(where).free
            except OSError:
                free = None
            if free is not None and free < manifest.size:
                raise StorageError(
                    errno.ENOSPC,
                    f"cannot download {self.url_of(name)} ({manifest.size / 2**20:.0f} MiB) into {where}: only "
                    f"{free / 2**20:.0f} MiB free (pass spool_dir= a larger local directory)",
                )
        try:
            # anonymous: unlinked at once where the OS allows, so even a SIGKILL leaves nothing behind
            spool = tempfile.TemporaryFile(prefix="lckpt-spool-", dir=self.spool_dir)  # noqa: SIM115
        except OSError as exc:
            raise StorageError(exc.errno or errno.EIO, f"cannot create a download spool file in {where}: {exc}") from exc
        return _Source(file=spool)

    def load(
        self,
        name: str,
        map_location: MapLocation = "cpu",
        weights_only: bool = True,
        verify: bool = True,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Verify and deserialize checkpoint ``name``.

        ``weights_only=True`` (the default) refuses pickled code; a payload that needs it raises
        :class:`UnsafeCheckpointError`. A file without a manifest that was not left by one of our
        saves (a plain Lightning checkpoint) loads with a warning that it was not verified.

        Memory: about one copy of the checkpoint at most. A local file is hashed in a streaming
        pass, then memory-mapped by ``torch.load(mmap=True)``; a remote one is downloaded into
        a temporary spool file in ``spool_dir`` while being hashed, loaded from there, and the
        spool removed. ``progress(bytes_read, total)`` is called while the payload streams.

        ``map_location`` is ``torch.load``'s: the default ``"cpu"`` loads a checkpoint saved on
        a GPU on any machine; ``None`` keeps every tensor on the device it was saved from. One
        that names a device this machine lacks raises :class:`DeviceUnavailableError` (before
        any download where the argument itself names it).
        """
        map_location = _check_device(map_location, self.url_of(name))
        kept = self._verified.pop(name, None)
        if kept is not None:
            manifest: Manifest | None
            manifest, source = kept
        else:
            try:
                manifest = self.read_manifest(name)
            except UncommittedCheckpointError:
                if self.is_pending(name) or not verify:
                    raise
                if self.signer is not None:
                    raise TamperedCheckpointError(
                        f"{self.url_of(name)} has no lightning-ckpt manifest, so no signature; a signer is "
                        "configured (refusing it)"
                    ) from None
                if self.encryptor is not None:
                    self.encryptor.check_encrypted(None, self.url_of(name))
                warnings.warn(
                    f"{self.url_of(name)} has no lightning-ckpt manifest; loading it unverified",
                    CheckpointWarning,
                    stacklevel=_outside_package_stacklevel(),
                )
                with self._progress("loading", name, progress) as bar:
                    source = self._fetch(name, None, bar)
                return self._deserialize(name, None, source, map_location, weights_only)
            if manifest.sharded:
                raise ShardedCheckpointError(
                    f"{self.url_of(name)} is a sharded checkpoint ({len(manifest.files)} files written by several "
                    "processes): resume it with trainer.fit(ckpt_path=...) under a sharded strategy, or make one "
                    "file of it with lightning_ckpt.sharded.consolidate() or `lightning-ckpt export`"
                )
            with self._progress("loading", name, progress) as bar:
                source = self._fetch(name, manifest if verify else None, bar)
        return self._deserialize(name, manifest, source, map_location, weights_only)

    @contextlib.contextmanager
    def _progress(self, verb: str, name: str, progress: Progress | None) -> Iterator[Progress | None]:
        """``progress``, or one from :attr:`transfer_progress` that is closed when the transfer ends."""
        if progress is not None or self.transfer_progress is None:
            yield progress
            return
        made = self.transfer_progress(verb, name)
        try:
            yield made
        finally:
            close = getattr(made, "close", None)
            if callable(close):
                close()

    def _deserialize(
        self, name: str, manifest: Manifest | None, source: _Source, map_location: MapLocation, weights_only: bool
    ) -> Any:
        url = self.url_of(name)
        try:
            if not source.size:
                raise CorruptCheckpointError(f"{url} is empty")
            info = manifest.extra.get("encryption") if manifest is not None else None
            if info:
                return self._load_encrypted(name, info, source, map_location, weights_only)
            return _torch_load(url, source, map_location, weights_only)
        finally:
            source.close()

    def _load_encrypted(
        self, name: str, info: Mapping[str, Any], source: _Source, map_location: MapLocation, weights_only: bool
    ) -> Any:
        """Decrypt the verified ciphertext chunk by chunk into memory (plaintext never touches a
        disk), then load it: on Linux from a memfd that the tensors map, so ~1x the checkpoint."""
        url = self.url_of(name)
        if self.encryptor is None:
            raise KeyMissingError(
                f"{url} is encrypted ({info.get('alg')}, key id {info.get('key_id')}); "
                "pass encryptor=Encryptor(...) with its key to load it"
            )
        plain = _Source(file=_memory_file())
        try:
            decryptor = self.encryptor.decryptor(info, url, source.size, plain.file.write)
            source.file.seek(0)
            _hash_file(source.file, None, source.size, None, lambda exc: self.storage.translate(exc, "read", url),
                       sink=decryptor.write)
            decryptor.close()
            source.close()
            plain.size = plain.file.tell()
            plain.file.flush()
            if _fd_path(plain.file) is not None:
                plain.path = _fd_path(plain.file)
            return _torch_load(url, plain, map_location, weights_only)
        finally:
            plain.close()

    # -- choosing ---------------------------------------------------------------------------

    def latest(
        self, owner: str | None = None, keep: bool = False, where: Callable[[Manifest], bool] | None = None
    ) -> Manifest | None:
        """The newest committed checkpoint that verifies; damaged ones are skipped with a warning.

        ``where`` filters candidates first (e.g. only those that hold the full training state).
        """
        found = self._scan_and_warn()
        candidates = [m for m in found.committed if (owner is None or m.owner == owner) and (where is None or where(m))]
        return self._first_valid(reversed(candidates), keep) or self._none_left(found, "last")

    def best(self, monitor: str, mode: str = "min", owner: str | None = None, keep: bool = False) -> Manifest | None:
        """The best committed, verifying checkpoint by ``monitor``.

        Among equal values the first one saved wins, as Lightning's ``best_model_path``, and a
        ``last.ckpt`` copy never wins over the checkpoint it copies.
        """
        found = self._scan_and_warn()
        candidates = [m for m in found.committed if owner is None or m.owner == owner]
        ranked = best_of(KeepTopK(1, monitor, mode).ranked(candidates), monitor, mode)
        return self._first_valid(ranked, keep) or self._none_left(found, "best")

    def _scan_and_warn(self) -> DirectoryScan:
        found = self.scan()
        for name, why in found.damaged:
            warnings.warn(f"skipping {self.url_of(name)}: {why}", CheckpointWarning, stacklevel=3)
        return found

    def _none_left(self, found: DirectoryScan, which: str) -> None:
        """``None`` ("no checkpoint yet"), unless checkpoints exist that only a key we lack could
        accept: then starting afresh would overwrite a run saved under another key, so refuse."""
        if not found.unverifiable or found.committed:
            return None
        seen = sorted({key for _, key in found.unverifiable})
        configured = [f"signing {k}" for k in (self.signer.key_ids if self.signer else [])]
        configured += [f"encryption {k}" for k in (self.encryptor.key_ids if self.encryptor else [])]
        raise KeyMissingError(
            f'no checkpoint in {self.url} verifies under the configured keys ({", ".join(configured)}); '
            f"{len(found.unverifiable)} checkpoint(s) carry: {', '.join(seen)}. Refusing to resolve {which!r} "
            "(a fresh start would overwrite them): configure the key they were saved with (e.g. "
            "Signer(new_key, old_key)), or Encryptor(..., allow_plaintext=True) for unencrypted ones"
        )

    def _first_valid(self, candidates: Any, keep: bool) -> Manifest | None:
        for manifest in candidates:
            try:
                return self.verify(manifest.name, keep=keep)
            except (CorruptCheckpointError, IncompatibleCheckpointError, CheckpointNotFoundError) as exc:
                warnings.warn(f"skipping damaged checkpoint: {exc}", CheckpointWarning, stacklevel=3)
        return None

    # -- deleting ---------------------------------------------------------------------------

    def delete(self, name: str) -> None:
        """Delete committed checkpoint ``name`` (marker, manifest, payload, marker)."""
        manifest = self.read_manifest(name)  # only ever delete what we committed
        if manifest.sharded:
            self.storage.write_bytes(name + PENDING_SUFFIX, self._sharded_marker(name, "delete"))
            self.storage.delete(manifest_name(name))
            self.storage.delete_tree(name)
            self.storage.delete(name + PENDING_SUFFIX)
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

    def prune(
        self,
        policy: RetentionPolicy,
        owner: str | None = None,
        protect: set[str] | frozenset[str] = frozenset(),
        dry_run: bool = False,
    ) -> list[str]:
        """Delete the committed checkpoints of ``owner`` that ``policy`` does not keep.

        The newest committed checkpoint and the names in ``protect`` (say, the one the run resumed
        from) are always kept. Returns the names deleted (or that would be, with ``dry_run``).
        """
        committed = self.manifests(owner)
        if not committed:
            return []
        keep = set(policy.keep(committed)) | set(protect) | KeepLatest(1).keep(committed)
        doomed = [m.name for m in committed if m.name not in keep]
        if not dry_run:
            for name in doomed:
                self.delete(name)
        return doomed

    def cleanup(self) -> list[str]:
        """Remove leftovers of interrupted saves and deletes; return what was removed.

        Only files provably ours *and* abandoned are touched (see :mod:`lightning_ckpt.layout`):
        the files of a save whose marker's writer is gone (this process with the save no longer in
        flight, a dead process on this host, or a marker older than ``stale_after`` from another
        host), the markers themselves, temporary files of such writers, versions of ours that no
        manifest holds, and on S3 the unfinished multipart uploads of those saves; they are listed
        as ``"NAME (unfinished upload)"``. A live writer's files are never removed.
        """
        found = self.scan()
        removed: list[str] = []
        for name in self.storage.abort_incomplete_uploads(sorted(set(found.abandoned_writes))):
            removed.append(f"{name} (unfinished upload)")
        # markers last: until the files they prove ours are gone, they must stay
        for fname in sorted(found.leftovers, key=lambda f: layout.marker_of(f) is not None):
            if fname.endswith("/"):
                self.storage.delete_tree(fname[:-1])  # the shards of an interrupted sharded save
            else:
                self.storage.delete(fname)
            removed.append(fname)
        return removed

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
        self.storage.write_bytes(name + PENDING_SUFFIX, self._sharded_marker(name, "save"))
        self.storage.delete(manifest_name(name))
        self._forget(name)

    def _release(self, name: str) -> None:
        token = self._held.pop(name, None)
        if token is not None:
            layout.release(token)

    def commit(self, manifest: Manifest) -> None:
        """Commit a checkpoint whose files are all durable: write its manifest, drop the marker."""
        self._write_manifest(manifest)
        self.storage.delete(manifest.name + PENDING_SUFFIX)
        self._release(manifest.name)

    def abandon_directory(self, name: str) -> None:
        """Best-effort removal of a failed sharded save (what stays, :meth:`cleanup` removes)."""
        try:
            self.storage.delete(manifest_name(name))
            self.storage.delete_tree(name)
            self.storage.delete(name + PENDING_SUFFIX)
        except CheckpointError as exc:
            log.warning("could not remove %s after a failed save (%s); cleanup will retry", name, exc)
        finally:
            self._release(name)

    def is_directory(self, name: str) -> bool:
        """Whether ``name`` is a directory here (a sharded checkpoint, committed or not)."""
        return name in self.storage.dirs()

    def verify_files(self, name: str, manifest: Manifest, part: tuple[int, int] = (0, 1)) -> None:
        """Check the files of sharded ``name`` against its manifest.

        ``part=(i, n)`` checks every n-th file from the i-th, so n processes share the reading.
        """
        index, count = part
        if not self.is_directory(name):
            raise CorruptCheckpointError(f"{self.url_of(name)} is not a directory, but its manifest lists files")
        directory = self.storage.child(name)
        for path in sorted(manifest.files)[index::count]:
            expected = manifest.files[path]
            where = f"{self.url_of(name)}/{path}"
            try:
                size, sha = directory.digest(path)
            except CheckpointNotFoundError:
                raise CorruptCheckpointError(f"{where} is missing (its manifest lists it)") from None
            except StorageError as exc:
                if isinstance(exc.__cause__, (IsADirectoryError, NotADirectoryError)):
                    raise CorruptCheckpointError(f"{where} is not a file (its manifest lists it as one)") from None
                raise
            if size != expected["size"]:
                raise CorruptCheckpointError(
                    f"{where} is {size} bytes; its manifest says {expected['size']} bytes (truncated or overwritten)"
                )
            if sha != expected["sha256"]:
                raise CorruptCheckpointError(f"{where} does not match the sha256 in its manifest (damaged)")


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


@dataclass
class _Source:
    """A payload ready for ``torch.load``: an open file (a local checkpoint, a download spool or
    decrypted plaintext) and, for a local file, its path and identity when it was hashed."""

    file: Any
    path: str | None = None
    stamp: tuple[int, ...] | None = None
    size: int = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


def _outside_package_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first caller outside lightning_ckpt.

    ``load_checkpoint`` and the ``CheckpointIO`` call ``load`` from inside the package: a fixed
    ``stacklevel=2`` would name a line of ours instead of the user's (or Lightning's) call.
    """
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1  # the function that warns
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _fd_path(f: Any) -> str | None:
    """A path naming exactly the open file ``f`` (Linux ``/proc/self/fd``), if the OS has one."""
    try:
        path = f"/proc/self/fd/{f.fileno()}"
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return path if os.path.exists(path) else None


def _memory_file() -> Any:
    """A growable in-memory file: a memfd (Linux, mappable by torch.load) or a BytesIO."""
    create = getattr(os, "memfd_create", None)
    if create is not None:
        with contextlib.suppress(OSError):
            f = os.fdopen(create("lckpt-plaintext", getattr(os, "MFD_CLOEXEC", 0)), "w+b")
            if _fd_path(f) is not None:
                return f
            f.close()
    return io.BytesIO()


def _hash_file(
    f: Any,
    digest: Any,
    limit: int | None,
    progress: Progress | None,
    translate: Callable[[BaseException], Exception],
    sink: Callable[[memoryview], Any] | None = None,
) -> int:
    """Read ``f`` in 8 MiB blocks into ``digest``/``sink``; like :meth:`Storage.stream` for open files."""
    block = memoryview(bytearray(READ_BLOCK))
    total = 0
    try:
        while limit is None or total < limit:
            want = READ_BLOCK if limit is None else min(READ_BLOCK, limit - total)
            n = f.readinto(block[:want])
            if not n:
                return total
            if digest is not None:
                digest.update(block[:n])
            if sink is not None:
                sink(block[:n])
            total += n
            if progress is not None:
                progress(total, limit)
        return total + 1 if f.read(1) else total
    except OSError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise translate(exc) from exc


def _torch_load(url: str, source: _Source, map_location: MapLocation, weights_only: bool) -> Any:
    """``torch.load`` a verified source, memory-mapped where it is a file we may map.

    Mapping (``mmap=True``) keeps a single copy: tensors read their bytes from the page cache (a
    local checkpoint) or from the memfd (decrypted plaintext) only when touched. A local file is
    mapped through its open descriptor, i.e. exactly the inode that was hashed; one changed in
    place since is refused. A download spool is read, not mapped, so it is freed right away
    instead of staying allocated on the spool disk for as long as any loaded tensor lives.
    """
    import torch

    try:
        target = _fd_path(source.file) if source.path is not None else None
        if target is not None or source.path is not None:
            try:
                mapped: str = target or source.path  # type: ignore[assignment]  # one of them is set
                out = torch.load(mapped, map_location=map_location, weights_only=weights_only, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # only an old (non-zip) format cannot be mapped
                    raise
                source.file.seek(0)
                out = torch.load(source.file, map_location=map_location, weights_only=weights_only)
            if source.stamp is not None:
                st = os.fstat(source.file.fileno()) if target else os.stat(source.path)  # type: ignore[arg-type]
                if _stamp(st) != source.stamp:
                    raise CorruptCheckpointError(f"{url} changed while it was being loaded; load it again")
            return out
        # a spool: by its /proc/self/fd path where there is one, so torch reads straight into the
        # tensors (through a Python file object every record is read into bytes, then copied)
        spool_path = _fd_path(source.file)
        source.file.seek(0)
        return torch.load(spool_path or source.file, map_location=map_location, weights_only=weights_only)
    except Exception as exc:
        if isinstance(exc, _CallerMapLocationError):  # the caller's own code failed: its error, as it was
            if _DEVICE_MISSING.search(str(exc.error)):
                raise _device_error(url, map_location, exc.error) from exc.error
            raise exc.error from None
        if isinstance(exc, (CheckpointError, MemoryError)):
            raise
        # torch versions differ in what they wrap into an UnpicklingError: by the words, any type
        if _DEVICE_MISSING.search(str(exc)):
            raise _device_error(url, map_location, exc) from exc
        # why torch refused is decided by scanning the pickles ourselves, not by its wording
        refused = refused_global(source.file) if weights_only else None
        if refused is not None:
            raise UnsafeCheckpointError(
                f"{url} holds objects that weights-only loading refuses (global {refused}). "
                "If you trust the file, load it with weights_only=False."
            ) from exc
        raise CorruptCheckpointError(_unreadable(url, source, exc)) from exc


_ZIP_HEAD, _ZIP_END = b"PK\x03\x04", b"PK\x05\x06"
#: what torch.save wrote before torch 1.6 (no zip): a pickled magic number first
_LEGACY_HEAD = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _unreadable(url: str, source: _Source, exc: BaseException) -> str:
    """Why ``url`` cannot be loaded, saying what the file is instead of only torch's last words."""
    detail = str(exc).strip()
    if "WeightsUnpickler error:" in detail:  # the one useful line of torch's weights-only boilerplate
        detail = detail.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n", 1)[0]
    detail = detail.splitlines()[0] if detail else ""
    detail = f"{type(exc).__name__}: {detail[:157] + '...' if len(detail) > 160 else detail}".rstrip(": ")
    try:
        source.file.seek(0)
        head = source.file.read(64)
        end = source.file.seek(0, io.SEEK_END)
        source.file.seek(max(0, end - 65_558))  # a zip's end record sits in its last 64 KiB + 22 B
        tail = source.file.read()
    except (OSError, ValueError):
        head = tail = b""
    if head.startswith(_ZIP_HEAD):
        if _ZIP_END not in tail:
            what = "a zip archive cut short (its central directory is missing): truncated"
        else:
            what = "a zip archive, but not a readable torch checkpoint"
    elif head.startswith(_LEGACY_HEAD):
        what = "a torch file in the pre-1.6 format, damaged or truncated"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = "a plain pickle, not a torch checkpoint"
    else:
        what = f"not a torch checkpoint (neither a zip archive nor a pickle; it starts with {head[:16]!r})"
    return f"{url} is not a readable checkpoint: {what} ({detail})"


def _device_error(url: str, map_location: MapLocation, exc: Exception) -> DeviceUnavailableError:
    return DeviceUnavailableError(
        f"{url} cannot be loaded with map_location={map_location!r} on this machine: {exc} (lightning-ckpt "
        "loads onto the CPU by default; pass map_location='cpu' or a mapping of the saved devices)"
    )


class _CallerMapLocationError(Exception):
    """Carries what a caller's ``map_location`` callable raised past torch and our translation."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _CallerMapLocation:
    """A caller's ``map_location`` callable whose errors stay the caller's (never "corrupt checkpoint")."""

    def __init__(self, fn: Callable[[Any, str], Any]) -> None:
        self.fn = fn

    def __call__(self, storage: Any, location: str) -> Any:
        try:
            return self.fn(storage, location)
        except Exception as exc:
            raise _CallerMapLocationError(exc) from exc

    def __repr__(self) -> str:
        return repr(self.fn)


#: torch.serialization's words for a storage whose device (saved, or from map_location) is not here
_DEVICE_MISSING = re.compile(
    r"Attempting to deserialize object on|device module is not registered|don't know how to restore data location"
    r"|Storage device not recognized|Torch not compiled with \w+ enabled"
)


def _check_device(map_location: MapLocation, url: str) -> MapLocation:
    """``map_location`` for ``torch.load`` (bytes as text: torch's own bytes path is broken);
    one that is no device, or names a device this machine lacks, is refused before anything is read."""
    import torch

    if map_location is None or isinstance(map_location, Mapping):
        return map_location  # torch says which saved location has no device (see _DEVICE_MISSING)
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        return _CallerMapLocation(map_location)
    if isinstance(map_location, bytes):  # torch.load takes bytes too
        map_location = map_location.decode("ascii", "replace")
    if not isinstance(map_location, (str, torch.device)):
        raise ConfigurationError(
            f"map_location={map_location!r} is not a device, a mapping of locations or a callable (see torch.load)"
        )
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError) as exc:
        raise ConfigurationError(f"map_location={map_location!r} is not a device: {exc}") from exc
    module = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
    if module is None:
        return map_location
    available = getattr(module, "is_available", None)
    if callable(available) and not available():
        raise DeviceUnavailableError(
            f"cannot load {url} onto {str(device)!r}: torch.{device.type}.is_available() is False on this "
            "machine; pass map_location='cpu' (the default) to load it here"
        )
    count = getattr(module, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise DeviceUnavailableError(
            f"cannot load {url} onto {str(device)!r}: this machine has {count()} {device.type.upper()} "
            "device(s); pass map_location to one that exists"
        )
    return map_location


def load_checkpoint(
    url: str,
    storage_options: dict[str, Any] | None = None,
    map_location: MapLocation = "cpu",
    weights_only: bool = True,
    *,
    signer: Signer | None = None,
    encryptor: Encryptor | None = None,
    spool_dir: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Verify and load the checkpoint at ``url`` (any fsspec URL) without Lightning."""
    directory, name = split_url(url)
    manager = CheckpointManager(directory, storage_options, signer=signer, encryptor=encryptor, spool_dir=spool_dir)
    return manager.load(name, map_location, weights_only, progress=progress)
