"""The :class:`Storage` facade: one directory URL on any fsspec filesystem.

A :class:`Storage` is one directory URL (a plain path, ``file://``, ``memory://``, ``s3://``,
``gs://``, ``az://``, ...) plus the explicit ``storage_options`` used for every call. It knows
how to write a file so that it appears whole or not at all (temporary name + fsync + rename on
local disks; a streamed upload that only becomes an object when it completes on object stores,
discarded on failure), how to list, read, copy and delete, and how to tell a real "not found"
from an outage: only ``FileNotFoundError`` means absent, everything else becomes a
:class:`~lightning_ckpt.errors.StorageError` naming the URL (:mod:`.retry`).

What differs between stores is a :class:`~lightning_ckpt.storage.backends.Backend` chosen once
here, at construction (:mod:`.backends` for local disks and generic fsspec, :mod:`.objectstores`
for S3, GCS and Azure); the facade itself branches on nothing but the backend's ``local``
capability (paths of this machine). Every operation runs through :func:`.retry.call`. A missing
bucket is a :class:`~lightning_ckpt.errors.BucketNotFoundError`, never an empty directory.
Owns: the one directory URL and its operations. Must not know the commit protocol (the manager does) nor decide what a checkpoint should contain.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
from collections.abc import Callable, Collection, Iterator
from typing import IO, Any, TypeVar

import fsspec

from lightning_ckpt import layout
from lightning_ckpt.errors import CheckpointNotFoundError, ConfigurationError, UnsupportedURLError
from lightning_ckpt.storage import retry as _retry
from lightning_ckpt.storage import sources
from lightning_ckpt.storage.backends import Backend, choose
from lightning_ckpt.storage.base import CHUNK, FileInfo, Progress
from lightning_ckpt.storage.reads import read_blocks, readinto
from lightning_ckpt.storage.retry import RetryPolicy

__all__ = ["Storage"]

T = TypeVar("T")


class Storage:
    """A directory on any fsspec filesystem, with crash-safe writes and honest errors.

    Args:
        url: the directory, as a path or URL. It need not exist yet.
        storage_options: passed to fsspec for every operation (credentials, endpoint, ...).
        retry: how transient failures are retried.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not isinstance(url, (str, os.PathLike)) or not str(url):
            raise ConfigurationError(f"a checkpoint directory must be a non-empty path or URL, got {url!r}")
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.retry = retry or RetryPolicy()
        url = os.fspath(url)
        try:
            fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        except ImportError as exc:
            raise UnsupportedURLError(f"cannot open {url!r}: {exc}") from exc
        except ValueError as exc:
            raise UnsupportedURLError(f"cannot open {url!r}: {exc}") from exc
        #: what differs between stores, chosen here once (:func:`.backends.choose`)
        self.backend: Backend = choose(fs)
        self.fs = fs  # the one filesystem object: only this package (and tests) may use it
        #: paths are this machine's (renames are atomic, files can be hashed in place)
        self.is_local = self.backend.local
        self.root = self.backend.normalize_root(root)
        # the user's scheme where the filesystem has several (adlfs answers az:// with abfs://)
        scheme = url.split("://", 1)[0] if "://" in url else ""
        self._scheme = scheme if scheme in _protocols(fs) else ""
        self.url = self.root if self.is_local and "://" not in url else self._unstrip(self.root)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    # -- names and URLs ---------------------------------------------------------------------

    def path(self, name: str) -> str:
        """The filesystem path of ``name`` inside this directory."""
        if not name or "/" in name or name in (".", ".."):
            raise ConfigurationError(f"invalid checkpoint file name {name!r}")
        return f"{self.root}/{name}" if self.root else name

    def url_of(self, name: str) -> str:
        """The URL a user would pass back to us for ``name``."""
        if self.url.endswith("://"):  # a store's root ("memory://"): "memory://NAME", not "memory:/NAME"
            return self.url + name
        return f"{self.url.rstrip('/')}/{name}" if self.url != "/" else f"/{name}"

    # -- error handling ---------------------------------------------------------------------

    def _call(self, what: str, name: str | None, fn: Callable[[], T], retry: bool = True) -> T:
        """Run ``fn``, retrying transient failures; translate errors into our tree."""
        return _retry.call(self.retry, what, self.url_of(name) if name else self.url, fn, retry)

    def _check_bucket(self, cause: BaseException) -> None:
        """After a "not found" on an object store: raise if the bucket itself is missing."""
        self.backend.check_bucket(self.root, self.url, cause)

    @staticmethod
    def translate(exc: BaseException, what: str, target: str) -> Exception:
        """Map a raw filesystem exception to the matching :class:`CheckpointError`."""
        return _retry.translate(exc, what, target)

    def check_directory(self) -> None:
        """Raise :class:`ConfigurationError` if this directory's path is a regular file."""
        if self.root and self.kind() == "file":
            raise ConfigurationError(f"the checkpoint directory {self.url} is a file, not a directory")

    def kind(self) -> str | None:
        """What this directory's own path is: ``"directory"``, ``"file"``, or ``None`` where there
        is nothing (on object stores a prefix with objects under it is a directory). An outage
        raises, never reads as "nothing there"."""

        def op() -> str | None:
            self.fs.invalidate_cache(self.root)
            try:
                return "file" if self.fs.info(self.root).get("type") == "file" else "directory"
            except FileNotFoundError:
                return None

        return self._call("stat", None, op)

    # -- reading ----------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        """True if ``name`` exists (a file, or the directory of a sharded checkpoint); False only on
        a real "not found", never on an outage."""
        path = self.path(name)

        def op() -> bool:
            self.fs.invalidate_cache(path)
            self.fs.info(path)
            return True

        try:
            return self._call("stat", name, op)
        except CheckpointNotFoundError:
            return False

    def info(self, name: str) -> FileInfo:
        """Size of ``name``; raises :class:`CheckpointNotFoundError` if absent."""
        path = self.path(name)

        def op() -> FileInfo:
            self.fs.invalidate_cache(path)
            info = self.fs.info(path)
            if info.get("type") == "directory":
                raise IsADirectoryError(errno.EISDIR, "is a directory, not a checkpoint file")
            return FileInfo(name=name, size=int(info.get("size") or 0))

        return self._call("stat", name, op)

    def list(self) -> list[FileInfo]:
        """Files directly inside this directory.

        An absent directory (or prefix) is empty; an absent *bucket* is not: it raises
        :class:`BucketNotFoundError`, so a misspelt bucket never looks like "no checkpoint yet".
        """

        def op() -> list[FileInfo]:
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError as exc:
                self._check_bucket(exc)
                return []
            # an object store's directory marker ("run/", left by a filer such as SeaweedFS) is no file
            entries = [e for e in entries if not str(e["name"]).endswith("/")]
            if len(entries) == 1 and entries[0].get("type") == "file" and \
                    str(entries[0]["name"]) == self.root.rstrip("/"):
                # ls of a file lists the file: a dirpath naming a checkpoint file is no empty directory
                raise NotADirectoryError(errno.ENOTDIR, "a file, not a directory", self.root)
            out = []
            for entry in entries:
                if entry.get("type") == "directory":
                    continue
                name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
                out.append(FileInfo(name=name, size=int(entry.get("size") or 0), mtime=self.backend.mtime(entry)))
            return out

        return self._call("list", None, op)

    def modified(self, name: str) -> float:
        """When ``name`` was last modified (a POSIX time); raises :class:`CheckpointNotFoundError`
        if absent."""
        path = self.path(name)

        def op() -> float:
            self.fs.invalidate_cache(path)
            return float(self.fs.modified(path).timestamp())

        return self._call("stat", name, op)

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """The whole content of a small file; with ``limit``, at most ``limit + 1`` bytes of it
        (a longer result says the file is larger than the caller accepts)."""
        path = self.path(name)

        def op() -> bytes:
            return self.backend.read_small(path, limit)

        return self._call("read", name, op)

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``name`` from ``offset`` (fewer where the file is shorter)."""
        path = self.path(name)

        def op() -> bytes:
            return self.backend.read_range(path, offset, size) if size else b""

        return self._call("read", name, op)

    def _open_read(self, path: str) -> Any:
        """``path`` open for reading in blocks; a local one only if it is a regular file."""
        return self.backend.open_read(path)

    def read_into(self, name: str, buffer: memoryview, sink: Callable[[memoryview], None] | None = None) -> int:
        """Stream ``name`` into ``buffer`` chunk by chunk, calling ``sink`` on each chunk.

        Returns the number of bytes read; reads at most ``len(buffer)`` bytes and reports a
        longer file by returning ``len(buffer) + 1``.
        """
        path = self.path(name)

        def op() -> int:
            total = 0
            with self._open_read(path) as f:
                while total < len(buffer):
                    n = readinto(f, buffer[total : total + CHUNK])
                    if n == 0:
                        return total
                    if sink is not None:
                        sink(buffer[total : total + n])
                    total += n
                return total + 1 if f.read(1) else total

        return self._call("read", name, op)

    def stream(
        self,
        name: str,
        sink: Callable[[memoryview], None],
        *,
        limit: int | None = None,
        restart: Callable[[], None] | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Read ``name`` from the start in blocks of 8 MiB, handing each block to ``sink``.

        Returns the number of bytes read; with ``limit``, reads at most ``limit`` bytes and
        reports a longer file by returning ``limit + 1``. A transient failure restarts the read
        from the beginning after calling ``restart()`` (the sink must forget what it got);
        without ``restart`` a failure is not retried. ``progress(bytes_read, limit)`` is called
        after every block. Blocks are views of one reused buffer: ``sink`` must copy what it keeps.
        """
        return self.backend.stream(self.path(name), sink, limit, restart, progress,
                                   lambda op, retry: self._call("read", name, op, retry=retry), self.retry)

    #: ``fetch(name, *, shown_as=, expected=, hasher=, progress=, spool_dir=, overlap=, in_memory=)``: ``name`` as an
    #: open, size-and-digest-checked :class:`~lightning_ckpt.storage.sources.Source`
    #: (:func:`.sources.fetch`)
    fetch = sources.fetch

    # -- writing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_write(self, name: str, progress: Progress | None = None) -> Iterator[IO[bytes]]:
        """Write ``name`` so that it appears complete or not at all.

        Local disks: a temporary sibling, fsync, atomic rename, fsync of the directory.
        S3: a multipart upload of up to :data:`PARTS_IN_FLIGHT` parts at once (parts of
        :func:`part_size`; one ``PutObject`` for what fits in one part), aborted on failure; each
        part is retried on transient errors. Other object stores: fsspec's streamed upload.
        The stream itself is not retried: a failed write is raised.
        ``progress(bytes_written, None)`` is called as blocks are written.
        """
        with self.backend.open_write(self.path(name), self.url_of(name), self.root, progress, self.retry) as f:
            yield f

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file atomically (retried as a whole on transient failures)."""
        if self.backend.whole_writes:

            def op() -> None:
                with self.open_write(name) as f:
                    f.write(data)

            self._call("write", name, op)
            return
        # other stores: a streamed upload may be visible half-written where the backend writes in
        # place (a local target behind a wrapper); a temporary name then a move keeps the old file
        # whole until the new one is complete wherever the backend's move is atomic
        temp = layout.temp_name(name)

        def moved() -> None:
            tmp = self.path(temp)
            try:
                with self.open_write(temp) as f:
                    f.write(data)
                self.fs.mv(tmp, self.path(name))
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(tmp)
                raise
            finally:
                self.fs.invalidate_cache(self.root)

        with layout.in_flight(temp):
            self._call("write", name, moved)

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` onto ``dst`` atomically (local disks only: one ``rename``)."""
        if not self.is_local:
            raise ConfigurationError(f"{self.url} cannot rename atomically")
        src_path, dst_path = self.path(src), self.path(dst)
        self._call("rename to", dst, lambda: self.backend.rename(src_path, dst_path, self.root))

    def copy(self, src: str, dst: str, link: bool = True) -> None:
        """Make ``dst`` a complete copy of ``src`` (server-side where the backend can).

        On a local disk ``link=True`` makes a hard link (free and instant, but the same bytes: a
        damaged block damages both names); ``link=False`` copies the bytes into an independent file.
        """
        src_path, dst_path = self.path(src), self.path(dst)
        self._call("copy to", dst, lambda: self.backend.copy(src_path, dst_path, self.root, link))

    def abort_incomplete_uploads(self, names: Collection[str]) -> builtins.list[str]:
        """Abort unfinished multipart uploads of ``names`` in this directory; return those names.

        A writer killed mid-upload (SIGKILL, a lost node) leaves its parts on the server, unseen by
        listings but stored (and billed) until aborted. Only uploads to exactly these names are
        touched. S3: the multipart uploads are aborted. Azure: a blob that has staged blocks but
        was never committed is deleted (a committed blob of that name is left alone). A no-op
        elsewhere: local and memory have no such leftovers, and GCS cannot list its resumable
        upload sessions (they expire by themselves after a week).
        """
        if not names:
            return []
        return self._call("abort the unfinished uploads in", None,
                          lambda: self.backend.abort_incomplete_uploads(self.root, names))

    def delete(self, name: str) -> None:
        """Delete ``name``; an absent file is fine (object stores cannot tell the difference)."""
        path = self.path(name)

        def op() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
            finally:
                self.fs.invalidate_cache(self.root)

        self._call("delete", name, op)

    # -- directories (sharded checkpoints) ------------------------------------------------------

    def child(self, name: str) -> Storage:
        """The directory ``name`` inside this one, as a :class:`Storage` of its own.

        Same filesystem instance, options and retry policy; nothing is created.
        """
        path = self.path(name)
        sub = object.__new__(Storage)
        sub.__dict__.update(self.__dict__)
        sub.root, sub.url = path, self.url_of(name)
        return sub

    def dirs(self) -> builtins.list[str]:
        """Names of the directories directly inside this one (an absent directory has none)."""

        def op() -> builtins.list[str]:
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return []
            return [str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]

        return self._call("list", None, op)

    def delete_tree(self, name: str) -> None:
        """Delete directory ``name`` and everything in it; an absent one is fine."""
        path = self.path(name)

        def op() -> None:
            try:
                self.backend.delete_tree(path)
            except FileNotFoundError:
                pass
            finally:
                self.fs.invalidate_cache(self.root)
                self.fs.invalidate_cache(path)

        self._call("delete", name, op)

    def copy_to(self, name: str, other: Storage) -> None:
        """Copy ``name`` into directory ``other`` on the same filesystem (server-side on stores)."""
        src, dst = self.path(name), other.path(name)
        self._call("copy to", name, lambda: self.backend.copy_into(src, dst, other.root))

    def digest(self, name: str, hasher: Callable[[], Any] = hashlib.sha256) -> tuple[int, str]:
        """Size and hex digest (``hasher()``'s, sha256 by default) of ``name``, streamed in blocks
        (memory: one block)."""
        path = self.path(name)

        def op() -> tuple[int, str]:
            digest = hasher()
            with self._open_read(path) as f:
                size = read_blocks(f, digest.update)
            return size, digest.hexdigest()

        return self._call("read", name, op)

    def fsspec_target(self, name: str) -> tuple[str, dict[str, Any]]:
        """URL and fsspec options of ``name`` for writers that open files themselves.

        ``torch.distributed.checkpoint``'s fsspec reader and writer take exactly these; they
        build their own filesystem from them (same options, same credentials).
        """
        path = self.path(name)
        url = path if self.is_local else self._unstrip(path)
        return url, dict(self.storage_options)

    def _unstrip(self, path: str) -> str:
        """``path`` as a URL with the scheme the user gave."""
        url = self.fs.unstrip_protocol(path)
        if self._scheme and "://" in url and not url.startswith(f"{self._scheme}://"):
            url = f"{self._scheme}://{url.split('://', 1)[1]}"
        return url


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
