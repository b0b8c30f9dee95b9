"""The checkpoint manager: save, list, verify, load, copy, prune and clean one directory.

No Lightning here, so the CLI and plain-PyTorch users reuse it. The commit protocol for a
checkpoint ``NAME`` in the directory is::

    NAME.pending          written first: "a save (or delete) of NAME by us is in progress"
    NAME                  the payload, a plain ``torch.save`` file, written whole or not at all
    NAME.manifest.json    written last: size, digest, epoch, step, metrics -> NAME is committed
    (NAME.pending removed)

With a :class:`~lightning_ckpt.security.Signer` every manifest carries an HMAC signature that
readers check; with an :class:`~lightning_ckpt.security.Encryptor` the payload is encrypted
while it streams (torch.save -> encrypting writer -> hashing writer -> storage), and the manifest
records the ciphertext's size and digest, so verifying needs no key. Digests are xxh3-128, or
BLAKE3 under a signer (why: :mod:`lightning_ckpt.digest`); manifests of sha256 still verify.

Readers see only committed checkpoints. A crash leaves at most a ``.pending`` marker and a
payload without a manifest; :meth:`CheckpointManager.cleanup` removes exactly those (the marker
proves we wrote them) and never touches any other file. Deletion runs the protocol backwards
(marker, manifest, payload, marker), so a checkpoint is never half-deleted and visible.

Who does what: the protocol's names and the classification of a listing live in
:mod:`lightning_ckpt.layout`, its write steps in :mod:`lightning_ckpt.commit` (the base class of
:class:`CheckpointManager`), manifest fields in :mod:`lightning_ckpt.integrity`, turning verified
bytes into objects in :mod:`lightning_ckpt.payload`, what to keep in :mod:`lightning_ckpt.policies`.
This module owns what ties them to one directory: reading and authenticating manifests, choosing (latest,
best), verifying, loading, pruning and cleaning. It must not import Lightning, touch fsspec
(:class:`~lightning_ckpt.storage.Storage` does) or re-derive any of the above.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from lightning_ckpt import digest as digests
from lightning_ckpt import layout, pieces, policies
from lightning_ckpt.commit import CommitProtocol, SaveResult
from lightning_ckpt.errors import (
    CheckpointNotFoundError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    KeyMissingError,
    ShardedCheckpointError,
    StorageError,
    TamperedCheckpointError,
    UncommittedCheckpointError,
)
from lightning_ckpt.integrity import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from lightning_ckpt.layout import PENDING_SUFFIX, DirectoryScan, manifest_name, pending_name
from lightning_ckpt.payload import MapLocation, calls_caller_code, check_device, deserialize
from lightning_ckpt.policies import KeepTopK, RetentionPolicy, best_of, recency
from lightning_ckpt.security import Encryptor, Signer
from lightning_ckpt.storage import Expected, Progress, RetryPolicy, Source, Storage, split_url

# torch is imported by the methods that serialize or load (about 1.5 s): listing, reading
# manifests, verifying and pruning need none of it, so `lightning-ckpt ls/verify/prune` start fast

__all__ = ["PENDING_SUFFIX", "CheckpointManager", "DirectoryScan", "SaveResult", "load_checkpoint"]

log = logging.getLogger("lightning_ckpt")


class CheckpointManager(CommitProtocol):
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
        self._verified: dict[str, tuple[Manifest, Source]] = {}
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

    def _parse_manifest(self, data: bytes, name: str) -> Manifest:
        """Parse (and with a signer, authenticate) the manifest bytes of ``name``.

        With an encryptor, an unencrypted checkpoint is refused here (unless the encryptor allows
        plaintext), so listing skips it like any other checkpoint that is not ours.
        """
        return parse_manifest(data, self.url_of(name), signer=self.signer, encryptor=self.encryptor)

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

        Reads every manifest and marker, never a payload, and changes nothing (see :func:`layout.scan`).
        """
        found = layout.scan(
            {f.name: f.mtime for f in self.storage.list()},
            read_manifest=lambda name: self._parse_manifest(self._read_manifest_bytes(name), name),
            read_marker=self._read_or_none,
            dirs=self.storage.dirs,
            stale_after=self.stale_after,
        )
        found.committed.sort(key=recency)
        return found

    def is_pending(self, name: str) -> bool:
        """Whether a save (or delete) of ``name`` by us was begun and has not finished (or was interrupted)."""
        return self.storage.exists(pending_name(name)) or bool(self._marker_files(name))

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

    def manifest_or_none(self, name: str, unverified_ok: Callable[[], bool] | None = None) -> Manifest | None:
        """The committed manifest of ``name``, or None where ``name`` has none and no save of ours
        left it there (a checkpoint another tool wrote: readable only unverified).

        Raises :class:`UncommittedCheckpointError` for an interrupted save of ours, or where
        ``unverified_ok()`` says a manifest-less ``name`` must not be read; and
        :class:`CheckpointNotFoundError` when nothing is there.
        """
        try:
            return self.read_manifest(name)
        except UncommittedCheckpointError:
            if self.is_pending(name) or (unverified_ok is not None and not unverified_ok()):
                raise
            return None

    # -- verifying and loading --------------------------------------------------------------

    def verify(self, name: str, keep: bool = False, progress: Progress | None = None) -> Manifest:
        """Stream ``name`` and check size and digest against its manifest.

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
        table = pieces.table_of(manifest)
        if table is not None:  # an incremental checkpoint: every piece it references, too
            try:
                pieces.verify_table(self.storage, table, self.url_of(name))
            except BaseException:
                source.close()
                raise
        if keep:
            self._keep(name, manifest, source)
        else:
            source.close()
        return manifest

    def _keep(self, name: str, manifest: Manifest, source: Source) -> None:
        for _, old in self._verified.values():
            old.close()
        self._verified = {name: (manifest, source)}

    def _fetch(self, name: str, manifest: Manifest | None, progress: Progress | None = None,
               overlap: bool = False) -> Source:
        """The payload of ``name`` opened by the storage, checked against ``manifest`` (size and
        digest) as it streams; unchecked without one."""
        if manifest is None:
            expected, physical, algorithm = None, name, digests.XXH3_128  # nothing is hashed
        else:
            expected = Expected(manifest.size, manifest.digest, manifest.digest_algorithm)
            physical, algorithm = self._payload_name(manifest), manifest.digest_algorithm
        hasher = functools.partial(digests.new, algorithm)
        return self.storage.fetch(physical, shown_as=name, expected=expected, hasher=hasher,
                                  progress=progress, spool_dir=self.spool_dir, overlap=overlap,
                                  in_memory=manifest is None or not manifest.extra.get("encryption"))

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
        map_location = check_device(map_location, self.url_of(name))
        kept = self._verified.pop(name, None)
        if kept is not None:
            manifest: Manifest | None
            manifest, source = kept
        else:
            manifest = self.manifest_or_none(name, unverified_ok=lambda: verify)
            if manifest is None:
                if self.signer is not None:
                    raise TamperedCheckpointError(
                        f"{self.url_of(name)} has no lightning-ckpt manifest, so no signature; a signer is "
                        "configured (refusing it)"
                    )
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
            # a local weights-only load maps the file while a worker hashes it (digest's rule)
            # (not under a signer: there no byte reaches torch's parsers before its digest matched;
            # not with a map_location callable: that is the caller's code, handed each storage)
            overlap = (verify and weights_only and self.signer is None and not manifest.extra.get("encryption")
                       and not calls_caller_code(map_location))
            with self._progress("loading", name, progress) as bar:
                source = self._fetch(name, manifest if verify else None, bar, overlap=overlap)
                return self._deserialize(name, manifest, source, map_location, weights_only)
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
        self, name: str, manifest: Manifest | None, source: Source, map_location: MapLocation, weights_only: bool
    ) -> Any:
        url = self.url_of(name)
        obj = deserialize(url, manifest, source, map_location, weights_only, self.encryptor,
                          lambda exc: self.storage.translate(exc, "read", url))
        table = pieces.table_of(manifest) if manifest is not None else None
        if table is None:
            return obj
        from lightning_ckpt.incremental import join

        return join(obj, table, self.storage, self.encryptor, map_location, url)  # each piece checked as read

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
        accept: then starting afresh would overwrite a run saved under another key, so refuse.
        Likewise for checkpoints whose digest algorithm this version does not know."""
        if found.unknown_algorithms:
            names = ", ".join(f"{n} ({a})" for n, a in found.unknown_algorithms)
            raise IncompatibleCheckpointError(
                f"no checkpoint in {self.url} verifies, and {names} name a digest algorithm this lightning-ckpt "
                f"does not know. Refusing to resolve {which!r} (a fresh start would overwrite them): upgrade "
                "lightning-ckpt, or remove them"
            )
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

    def prune(
        self,
        policy: RetentionPolicy,
        owner: str | None = None,
        protect: set[str] | frozenset[str] = frozenset(),
        dry_run: bool = False,
    ) -> list[str]:
        """Delete the committed checkpoints of ``owner`` that ``policy`` does not keep.

        Judged per owner (:func:`lightning_ckpt.policies.doomed`, the decision the callback applies
        too): each owner's newest committed checkpoint and the names in ``protect`` (say, the one
        the run resumed from) are always kept. Returns the names deleted (or that would be, with
        ``dry_run``).
        """
        doomed = policies.doomed(policy, self.manifests(owner), protect)
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
        removed.extend(pieces.collect(self.storage, self.stale_after))  # packs of interrupted saves
        return removed

    # -- sharded checkpoints (directories written by many processes) ---------------------------

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
