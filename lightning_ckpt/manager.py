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

import hashlib
import io
import json
import logging
import pickle
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    KeyMissingError,
    ShardedCheckpointError,
    TamperedCheckpointError,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
)
from lightning_ckpt.integrity import (
    MANIFEST_SUFFIX,
    PENDING_SUFFIX,
    HashingWriter,
    Manifest,
    manifest_name,
    versions,
)
from lightning_ckpt.policies import KeepLatest, KeepTopK, RetentionPolicy
from lightning_ckpt.security import Encryptor, Signer
from lightning_ckpt.storage import TEMP_MARK, RetryPolicy, Storage, split_url

__all__ = ["PENDING_SUFFIX", "CheckpointManager", "DirectoryScan", "SaveResult", "load_checkpoint"]

log = logging.getLogger("lightning_ckpt")

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
    ) -> None:
        self.storage = storage or Storage(dirpath, storage_options, retry)
        self.signer = signer
        self.encryptor = encryptor
        self._verified: dict[str, tuple[Manifest, bytearray]] = {}

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
    ) -> SaveResult:
        """Serialize ``state`` to ``name`` and commit it; return its manifest.

        ``write(stream)`` may replace the default ``torch.save(state, stream)`` (the async saver
        streams from its own buffers). On any failure nothing new becomes visible and older
        checkpoints are untouched; an existing committed ``name`` is replaced.
        """
        start = time.perf_counter()
        self._begin(name)
        try:
            with self.storage.open_write(name) as f:
                latch = _ErrorLatch(f)
                writer = HashingWriter(latch)  # type: ignore[arg-type]  # a write-only stream suffices
                stream: Any = writer if self.encryptor is None else self.encryptor.writer(writer)  # type: ignore[arg-type]
                try:
                    if write is None:
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
            )
            self._write_manifest(manifest)
        except BaseException:
            self._abandon(name)
            raise
        self._end(name)
        return SaveResult(manifest, self.url_of(name), time.perf_counter() - start)

    def copy(self, src: str, dst: str, **changes: Any) -> SaveResult:
        """Commit ``dst`` as a copy of committed ``src`` (e.g. ``last.ckpt``); server-side on stores."""
        start = time.perf_counter()
        manifest = self.read_manifest(src)
        self._begin(dst)
        try:
            if manifest.sharded:
                self.storage.delete_tree(dst)
                source, target = self.storage.child(src), self.storage.child(dst)
                for path in manifest.files:
                    source.copy_to(path, target)
            else:
                self.storage.copy(src, dst)
            fields = {**manifest.__dict__, **changes, "name": dst, "created": time.time()}
            copied = Manifest(**fields)
            self._write_manifest(copied)
        except BaseException:
            self._abandon(dst)
            raise
        self._end(dst)
        return SaveResult(copied, self.url_of(dst), time.perf_counter() - start)

    def _write_manifest(self, manifest: Manifest) -> None:
        if self.signer is None:
            data = manifest.to_json()
        else:
            fields = json.loads(manifest.to_json())  # exactly what a reader will parse and check
            fields["signature"] = self.signer.sign(fields)
            data = json.dumps(fields, sort_keys=True, indent=1).encode()
        self.storage.write_bytes(manifest_name(manifest.name), data)

    def _parse_manifest(self, data: bytes, name: str) -> Manifest:
        """Parse (and with a signer, authenticate) the manifest bytes of ``name``."""
        where = self.url_of(name)
        manifest = Manifest.from_json(data, where)  # the format checks first: damaged is damaged
        if self.signer is not None:
            self.signer.check(json.loads(data), f"the manifest of {where}")
        return manifest

    def _begin(self, name: str) -> None:
        marker = json.dumps({"name": name, "started": time.time()}).encode()
        self.storage.write_bytes(name + PENDING_SUFFIX, marker)
        # replacing a committed checkpoint: decommit it first so no reader pairs the old
        # manifest with a new, partly written payload
        self.storage.delete(manifest_name(name))
        self._verified.pop(name, None)

    def _end(self, name: str) -> None:
        self.storage.delete(name + PENDING_SUFFIX)

    def _abandon(self, name: str) -> None:
        """Best-effort removal of a failed save; what cannot be removed now, cleanup() will."""
        for leftover in (manifest_name(name), name, name + PENDING_SUFFIX):
            try:
                self.storage.delete(leftover)
            except CheckpointError as exc:
                log.warning("could not remove %s after a failed save (%s); cleanup will retry", leftover, exc)
                return

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

        Reads every manifest, never a payload, and changes nothing.
        """
        files = {f.name for f in self.storage.list()}
        found = DirectoryScan(files=len(files))
        subdirs: set[str] | None = None

        def is_dir(name: str) -> bool:  # a sharded checkpoint is a directory: listed only when one is met
            nonlocal subdirs
            if subdirs is None:
                subdirs = set(self.storage.dirs())
            return name in subdirs

        for fname in sorted(files):
            if TEMP_MARK in fname:
                found.leftovers.append(fname)
            elif fname.endswith(PENDING_SUFFIX):
                found.leftovers.append(fname)
                name = fname[: -len(PENDING_SUFFIX)]
                if name in files and manifest_name(name) not in files:
                    found.leftovers.append(name)
                elif manifest_name(name) not in files and is_dir(name):
                    found.leftovers.append(name + "/")
            elif fname.endswith(MANIFEST_SUFFIX):
                name = fname[: -len(MANIFEST_SUFFIX)]
                if name not in files and not is_dir(name):
                    found.orphaned.append(name)
                    continue
                try:
                    manifest = self._parse_manifest(self.storage.read_bytes(fname), name)
                except CheckpointNotFoundError:
                    continue  # deleted since the listing
                except (CorruptCheckpointError, IncompatibleCheckpointError) as exc:
                    found.damaged.append((name, str(exc)))
                    continue
                if manifest.name != name:
                    found.damaged.append((name, f"its manifest describes {manifest.name!r}"))
                    continue
                found.committed.append(manifest)
        claimed = {*found.leftovers, *found.orphaned, *(m.name for m in found.committed), *(n for n, _ in found.damaged)}
        found.unmanaged = sorted(f for f in files if f.endswith(".ckpt") and f not in claimed)
        found.leftovers.sort()
        found.committed.sort(key=lambda m: (m.global_step or 0, m.created))
        return found

    def read_manifest(self, name: str) -> Manifest:
        """The manifest of committed ``name``; raises if absent or uncommitted."""
        try:
            data = self.storage.read_bytes(manifest_name(name))
        except CheckpointNotFoundError:
            if self.storage.exists(name + PENDING_SUFFIX):
                raise UncommittedCheckpointError(
                    f"{self.url_of(name)} was never committed (an interrupted or failed save)"
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

    def verify(self, name: str, keep: bool = False) -> Manifest:
        """Stream ``name`` and check size and sha256 against its manifest.

        With ``keep=True`` the verified bytes are kept for the next :meth:`load` of ``name``,
        so resolving ``"last"`` and loading it read the payload once.
        """
        manifest = self.read_manifest(name)
        if manifest.sharded:
            self.verify_files(name, manifest)
            return manifest
        buffer = self._read_verified(name, manifest)
        if keep:
            self._verified = {name: (manifest, buffer)}
        return manifest

    def _read_verified(self, name: str, manifest: Manifest) -> bytearray:
        buffer = bytearray(manifest.size)
        digest = hashlib.sha256()
        n = self.storage.read_into(name, memoryview(buffer), sink=digest.update)
        url = self.url_of(name)
        if n != manifest.size:
            raise CorruptCheckpointError(
                f"{url} is {'longer' if n > manifest.size else f'{n} bytes'}; its manifest says "
                f"{manifest.size} bytes (truncated or overwritten)"
            )
        if digest.hexdigest() != manifest.sha256:
            raise CorruptCheckpointError(f"{url} does not match the sha256 in its manifest (damaged)")
        return buffer

    def load(
        self,
        name: str,
        map_location: MapLocation = "cpu",
        weights_only: bool = True,
        verify: bool = True,
    ) -> dict[str, Any]:
        """Verify and deserialize checkpoint ``name``.

        ``weights_only=True`` (the default) refuses pickled code; a payload that needs it raises
        :class:`UnsafeCheckpointError`. A file without a manifest that was not left by one of our
        saves (a plain Lightning checkpoint) loads with a warning that it was not verified.
        """
        kept = self._verified.pop(name, None)
        if kept is not None:
            manifest, buffer = kept
        else:
            try:
                manifest = self.read_manifest(name)
            except UncommittedCheckpointError:
                if self.storage.exists(name + PENDING_SUFFIX) or not verify:
                    raise
                if self.signer is not None:
                    raise TamperedCheckpointError(
                        f"{self.url_of(name)} has no lightning-ckpt manifest, so no signature; a signer is "
                        "configured (refusing it)"
                    ) from None
                warnings.warn(
                    f"{self.url_of(name)} has no lightning-ckpt manifest; loading it unverified",
                    CheckpointWarning,
                    stacklevel=2,
                )
                return self._deserialize(name, self._read_plain(name), map_location, weights_only)
            if manifest.sharded:
                raise ShardedCheckpointError(
                    f"{self.url_of(name)} is a sharded checkpoint ({len(manifest.files)} files written by several "
                    "processes): resume it with trainer.fit(ckpt_path=...) under a sharded strategy, or make one "
                    "file of it with lightning_ckpt.sharded.consolidate() or `lightning-ckpt export`"
                )
            buffer = self._read_verified(name, manifest) if verify else self._read_plain(name)
        return self._deserialize(name, self._decrypt(name, manifest, buffer), map_location, weights_only)

    def _decrypt(self, name: str, manifest: Manifest, buffer: bytearray) -> bytearray:
        """The plaintext of a verified payload (a second buffer: each GCM chunk is checked whole)."""
        info = manifest.extra.get("encryption")
        if not info:
            return buffer
        if self.encryptor is None:
            raise KeyMissingError(
                f"{self.url_of(name)} is encrypted ({info.get('alg')}, key id {info.get('key_id')}); "
                "pass encryptor=Encryptor(...) with its key to load it"
            )
        return self.encryptor.decrypt(buffer, info, self.url_of(name))

    def _read_plain(self, name: str) -> bytearray:
        size = self.storage.info(name).size
        buffer = bytearray(size)
        self.storage.read_into(name, memoryview(buffer))
        return buffer

    def _deserialize(self, name: str, buffer: bytearray, map_location: MapLocation, weights_only: bool) -> Any:
        url = self.url_of(name)
        if not buffer:
            raise CorruptCheckpointError(f"{url} is empty")
        try:
            return torch.load(
                io.BufferedReader(_MemoryReader(memoryview(buffer))),
                map_location=map_location,
                weights_only=weights_only,
            )
        except pickle.UnpicklingError as exc:
            refused = re.search(r"(GLOBAL \S+ was not an allowed global|Unsupported global: \S+)", str(exc))
            if weights_only and refused:
                raise UnsafeCheckpointError(
                    f"{url} holds objects that weights-only loading refuses ({refused.group(1)}). "
                    "If you trust the file, load it with weights_only=False."
                ) from exc
            raise CorruptCheckpointError(f"{url} is not a readable checkpoint: {exc}") from exc
        except (RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
            raise CorruptCheckpointError(f"{url} is not a readable checkpoint: {exc}") from exc

    # -- choosing ---------------------------------------------------------------------------

    def latest(
        self, owner: str | None = None, keep: bool = False, where: Callable[[Manifest], bool] | None = None
    ) -> Manifest | None:
        """The newest committed checkpoint that verifies; damaged ones are skipped with a warning.

        ``where`` filters candidates first (e.g. only those that hold the full training state).
        """
        candidates = [m for m in self.manifests(owner) if where is None or where(m)]
        return self._first_valid(reversed(candidates), keep)

    def best(self, monitor: str, mode: str = "min", owner: str | None = None, keep: bool = False) -> Manifest | None:
        """The best committed, verifying checkpoint by ``monitor``."""
        return self._first_valid(KeepTopK(1, monitor, mode).ranked(self.manifests(owner)), keep)

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
        self.storage.write_bytes(name + PENDING_SUFFIX, b'{"deleting": true}')
        self.storage.delete(manifest_name(name))
        if manifest.sharded:
            self.storage.delete_tree(name)
        else:
            self.storage.delete(name)
        self.storage.delete(name + PENDING_SUFFIX)
        self._verified.pop(name, None)

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

        Only files provably ours are touched: payloads whose ``.pending`` marker exists without
        a manifest, the markers themselves, and temporary files carrying our mark.
        """
        files = {f.name for f in self.storage.list()}
        removed: list[str] = []
        for fname in sorted(files):
            if TEMP_MARK in fname:
                self.storage.delete(fname)
                removed.append(fname)
                continue
            if not fname.endswith(PENDING_SUFFIX):
                continue
            name = fname[: -len(PENDING_SUFFIX)]
            if manifest_name(name) in files and not self._manifest_parses(name):
                # a commit cut short on a filesystem without atomic writes (sftp, a faulty://
                # view, ...): the marker proves the half-written manifest and its payload are ours
                self.storage.delete(manifest_name(name))
                removed.append(manifest_name(name))
                files.discard(manifest_name(name))
            if manifest_name(name) not in files and name in files:
                self.storage.delete(name)
                removed.append(name)
            elif manifest_name(name) not in files and name in self.storage.dirs():
                self.storage.delete_tree(name)  # the shards of an interrupted sharded save
                removed.append(name + "/")
            self.storage.delete(fname)
            removed.append(fname)
        return removed

    # -- sharded checkpoints (directories written by many processes) ---------------------------

    def begin_directory(self, name: str) -> Storage:
        """Mark checkpoint directory ``name`` pending (clearing an older one) and return it.

        Until :meth:`commit` writes its manifest nothing lists, resumes from or prunes it, and
        :meth:`cleanup` removes it after a crash.
        """
        self._begin(name)
        self.storage.delete_tree(name)
        return self.storage.child(name)

    def commit(self, manifest: Manifest) -> None:
        """Commit a checkpoint whose files are all durable: write its manifest, drop the marker."""
        self._write_manifest(manifest)
        self._end(manifest.name)

    def abandon_directory(self, name: str) -> None:
        """Best-effort removal of a failed sharded save (what stays, :meth:`cleanup` removes)."""
        try:
            self.storage.delete(manifest_name(name))
            self.storage.delete_tree(name)
            self.storage.delete(name + PENDING_SUFFIX)
        except CheckpointError as exc:
            log.warning("could not remove %s after a failed save (%s); cleanup will retry", name, exc)

    def verify_files(self, name: str, manifest: Manifest, part: tuple[int, int] = (0, 1)) -> None:
        """Check the files of sharded ``name`` against its manifest.

        ``part=(i, n)`` checks every n-th file from the i-th, so n processes share the reading.
        """
        index, count = part
        directory = self.storage.child(name)
        for path in sorted(manifest.files)[index::count]:
            expected = manifest.files[path]
            where = f"{self.url_of(name)}/{path}"
            try:
                size, sha = directory.digest(path)
            except CheckpointNotFoundError:
                raise CorruptCheckpointError(f"{where} is missing (its manifest lists it)") from None
            if size != expected["size"]:
                raise CorruptCheckpointError(
                    f"{where} is {size} bytes; its manifest says {expected['size']} bytes (truncated or overwritten)"
                )
            if sha != expected["sha256"]:
                raise CorruptCheckpointError(f"{where} does not match the sha256 in its manifest (damaged)")

    def _manifest_parses(self, name: str) -> bool:
        try:
            Manifest.from_json(self.storage.read_bytes(manifest_name(name)), self.url_of(name))
        except CorruptCheckpointError:
            return False
        except (CheckpointNotFoundError, IncompatibleCheckpointError):
            return True  # gone since the listing, or a newer format: not ours to judge
        return True


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


class _MemoryReader(io.RawIOBase):
    """A seekable, zero-copy reader over a memoryview, so torch.load needs no second copy."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        memoryview(b).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


def load_checkpoint(
    url: str,
    storage_options: dict[str, Any] | None = None,
    map_location: MapLocation = "cpu",
    weights_only: bool = True,
    *,
    signer: Signer | None = None,
    encryptor: Encryptor | None = None,
) -> dict[str, Any]:
    """Verify and load the checkpoint at ``url`` (any fsspec URL) without Lightning."""
    directory, name = split_url(url)
    manager = CheckpointManager(directory, storage_options, signer=signer, encryptor=encryptor)
    return manager.load(name, map_location, weights_only)
