"""Backends: what differs between stores, chosen once when a :class:`~lightning_ckpt.storage.Storage` is built.

Owns the :class:`Backend` protocol and the two backends that need no object-store client:
:class:`FsspecBackend` (any fsspec filesystem: ``memory://``, wrappers, test fakes; streamed
writes, sequential reads) and :class:`LocalBackend` (a local disk: temporary name + fsync +
atomic rename, hard links, refusing FIFOs and devices), plus :func:`choose`, the one place that
looks at which filesystem a URL resolved to. Object stores (S3, GCS, Azure) live in
:mod:`.objectstores`. A backend must not retry or translate errors itself (the facade runs every
call through :func:`lightning_ckpt.storage.retry.call`) and must not know the commit protocol.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Collection, Iterator
from typing import IO, Any, Protocol, TypeVar

from lightning_ckpt import layout
from lightning_ckpt.errors import BucketNotFoundError, ConfigurationError, StorageError
from lightning_ckpt.storage.base import CHUNK, Progress
from lightning_ckpt.storage.reads import open_regular, read_blocks
from lightning_ckpt.storage.retry import RetryPolicy, bucket_missing, causes, missing_bucket, translate
from lightning_ckpt.storage.uploads import CountingWriter, TranslatingWriter, discard

__all__ = ["Backend", "FsspecBackend", "LocalBackend", "choose", "fsync_dir"]

T = TypeVar("T")
#: ``run(op, retry)``: the facade's error handling (retries, translation) around one operation
Runner = Callable[[Callable[[], T], bool], T]


class Backend(Protocol):
    """The operations whose implementation depends on the store; everything else is the facade's."""

    fs: Any
    #: paths are paths of this machine: renames are atomic, files have a modification time
    local: bool
    #: a plain write of a small file appears whole or not at all (no temporary name needed)
    whole_writes: bool

    def normalize_root(self, root: str) -> str:
        """The directory path as this backend spells it."""

    def check_bucket(self, root: str, url: str, cause: BaseException) -> None:
        """After a "not found": raise :class:`BucketNotFoundError` if the bucket itself is missing."""

    def mtime(self, entry: dict[str, Any]) -> float | None:
        """A listing entry's modification time where the store reports it cheaply."""

    def open_read(self, path: str) -> IO[bytes]:
        """``path`` open for reading in blocks."""

    def read_small(self, path: str, limit: int | None) -> bytes:
        """The content of a small file; with ``limit``, at most ``limit + 1`` bytes of it."""

    def read_range(self, path: str, offset: int, size: int) -> bytes:
        """``size`` (> 0) bytes of ``path`` from ``offset``; fewer where the file is shorter."""

    def stream(self, path: str, sink: Callable[[memoryview], None], limit: int | None,
               restart: Callable[[], None] | None, progress: Progress | None, run: Runner[int],
               retry: RetryPolicy) -> int:
        """Read ``path`` from the start into ``sink`` (see :meth:`Storage.stream`); ``run`` is the
        facade's error handling, ``retry`` its policy for single requests."""

    def open_write(self, path: str, url: str, root: str, progress: Progress | None,
                   retry: RetryPolicy) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A stream whose content appears at ``path`` whole when the context exits, or not at all."""

    def rename(self, src: str, dst: str, root: str) -> None:
        """Move ``src`` onto ``dst`` atomically, or raise :class:`ConfigurationError`."""

    def copy(self, src: str, dst: str, root: str, link: bool) -> None:
        """Make ``dst`` a complete copy of ``src`` (server-side where the store can)."""

    def copy_into(self, src: str, dst: str, dst_root: str) -> None:
        """Copy ``src`` to ``dst`` in another directory on the same filesystem."""

    def delete_tree(self, path: str) -> None:
        """Delete directory ``path`` and everything in it."""

    def abort_incomplete_uploads(self, root: str, names: Collection[str]) -> list[str]:
        """Abort unfinished uploads of ``names`` in ``root``; return the names aborted."""


class FsspecBackend:
    """Any fsspec filesystem, through fsspec's own API only."""

    local = False
    #: fsspec's streamed upload may be visible half-written where the backend writes in place
    whole_writes = False
    #: block size of fsspec's streamed uploads
    write_block = CHUNK

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def normalize_root(self, root: str) -> str:
        return root.rstrip("/")

    def check_bucket(self, root: str, url: str, cause: BaseException) -> None:
        split = getattr(self.fs, "split_path", None)  # s3fs, gcsfs, adlfs: stores with buckets
        if split is None or not root:
            return
        bucket = split(root)[0]
        self.fs.invalidate_cache(bucket)
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise bucket_missing(bucket, url) from cause

    def mtime(self, entry: dict[str, Any]) -> float | None:
        return None

    def open_read(self, path: str) -> IO[bytes]:
        return self.fs.open(path, "rb", block_size=CHUNK)  # type: ignore[no-any-return]

    def read_small(self, path: str, limit: int | None) -> bytes:
        if limit is None:
            return bytes(self.fs.cat_file(path))
        try:
            return bytes(self.fs.cat_file(path, start=0, end=limit + 1))
        except Exception:
            # S3, GCS and Azure answer a ranged read of an empty object "range not satisfiable"
            self.fs.invalidate_cache(path)
            if int(self.fs.info(path).get("size") or 0) == 0:
                return b""
            raise

    def read_range(self, path: str, offset: int, size: int) -> bytes:
        return bytes(self.fs.cat_file(path, start=offset, end=offset + size))

    def stream(self, path: str, sink: Callable[[memoryview], None], limit: int | None,
               restart: Callable[[], None] | None, progress: Progress | None, run: Runner[int],
               retry: RetryPolicy) -> int:
        attempts = [0]

        def op() -> int:
            if attempts[0] and restart is not None:
                restart()
            attempts[0] += 1
            with self.open_read(path) as f:
                return read_blocks(f, sink, limit, progress)

        return run(op, restart is not None)

    @contextlib.contextmanager
    def open_write(self, path: str, url: str, root: str, progress: Progress | None,
                   retry: RetryPolicy) -> Iterator[IO[bytes]]:
        # object stores have no directories; s3fs's makedirs would even *create a missing bucket*
        # (a typo in the URL would silently make a new one), so nothing is created there
        try:
            f = self.fs.open(path, "wb", block_size=self.write_block)
        except Exception as exc:
            raise self.write_error(exc, "open for writing", url, root) from exc
        try:
            writer: Any = TranslatingWriter(f, lambda exc: self.write_error(exc, "write", url, root))
            if progress is not None:
                writer = CountingWriter(writer, progress)
            yield writer
        except BaseException:
            discard(f)
            self.remove_partial(path)
            self.fs.invalidate_cache(root)
            raise
        try:
            f.close()
        except Exception as exc:
            self.remove_partial(path)
            raise self.write_error(exc, "finish writing", url, root) from exc
        finally:
            self.fs.invalidate_cache(root)
        if progress is not None:
            progress(writer.size, writer.size)

    def remove_partial(self, path: str) -> None:
        """After a failed upload: delete what the store may have left under ``path``."""
        with contextlib.suppress(Exception):
            self.fs.rm_file(path)

    def write_error(self, exc: BaseException, what: str, url: str, root: str) -> Exception:
        """Translate a failed upload; a "not found" there usually means the bucket is missing."""
        if any(isinstance(e, FileNotFoundError) for e in causes(exc)) and not missing_bucket(exc):
            try:
                self.check_bucket(root, url, exc)
            except BucketNotFoundError as missing:
                return missing
            except Exception:  # noqa: BLE001, S110 - the check itself failed: report the write's own error
                pass
        return translate(exc, what, url)

    def rename(self, src: str, dst: str, root: str) -> None:
        raise ConfigurationError(f"{self.fs.unstrip_protocol(root)} cannot rename atomically")

    def copy(self, src: str, dst: str, root: str, link: bool) -> None:
        self.fs.cp_file(src, dst)
        self.after_copy(dst)
        self.fs.invalidate_cache(root)

    def copy_into(self, src: str, dst: str, dst_root: str) -> None:
        self.fs.cp_file(src, dst)
        self.after_copy(dst)
        self.fs.invalidate_cache(dst_root)

    def after_copy(self, path: str) -> None:
        """Wait until a server-side copy to ``path`` has finished (where the store answers early)."""

    def delete_tree(self, path: str) -> None:
        self.fs.rm(path, recursive=True)
        # stores with a filer (SeaweedFS, MinIO...) keep an empty folder entry, S3 has none:
        # deleting the "dir/" key is harmless either way
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path + "/")

    def abort_incomplete_uploads(self, root: str, names: Collection[str]) -> list[str]:
        return []  # memory:// and the like keep no unfinished uploads


class LocalBackend(FsspecBackend):
    """A local disk: writes go to a temporary sibling, are fsynced and renamed into place."""

    local = True
    whole_writes = True

    def normalize_root(self, root: str) -> str:
        return os.path.abspath(root)

    def check_bucket(self, root: str, url: str, cause: BaseException) -> None:
        return  # no buckets

    def mtime(self, entry: dict[str, Any]) -> float | None:
        mtime = entry.get("mtime")
        return float(mtime) if isinstance(mtime, (int, float)) else None

    def open_read(self, path: str) -> IO[bytes]:
        return open_regular(path)  # a FIFO or device named like a checkpoint is refused

    def read_small(self, path: str, limit: int | None) -> bytes:
        with open_regular(path) as f:
            return f.read() if limit is None else f.read(limit + 1)

    def read_range(self, path: str, offset: int, size: int) -> bytes:
        with open_regular(path) as f:
            f.seek(offset)
            return f.read(size)

    @contextlib.contextmanager
    def open_write(self, path: str, url: str, root: str, progress: Progress | None,
                   retry: RetryPolicy) -> Iterator[IO[bytes]]:
        with self._atomic(path, url, root) as f:
            counted = CountingWriter(f, progress) if progress is not None else None
            yield counted if counted is not None else f  # type: ignore[misc]  # a write-only stream
        if counted is not None and progress is not None:
            progress(counted.size, counted.size)

    @contextlib.contextmanager
    def _atomic(self, path: str, url: str, root: str) -> Iterator[IO[bytes]]:
        temp = layout.temp_name(path.rsplit("/", 1)[-1])
        with layout.in_flight(temp):
            try:
                os.makedirs(root, exist_ok=True)
                tmp = os.path.join(root, temp)
                f = open(tmp, "wb")  # noqa: SIM115 - closed below on every path
            except Exception as exc:
                raise translate(exc, "open for writing", url) from exc
            early = _Writeback(f)
            try:
                yield early  # type: ignore[misc]  # a write-only stream
                early.flush()
                early.finish()
                os.fsync(f.fileno())
                early.close()
                os.replace(tmp, path)
                fsync_dir(root)
            except BaseException as exc:
                early.join()  # never close the descriptor under a running fdatasync
                # closing flushes what is buffered: on a full disk that fails too, and the
                # temporary file must still go
                with contextlib.suppress(OSError):
                    early.close()
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                    raise translate(exc, "write", url) from exc
                raise

    def rename(self, src: str, dst: str, root: str) -> None:
        os.replace(src, dst)
        fsync_dir(root)

    def copy(self, src: str, dst: str, root: str, link: bool) -> None:
        """``link=True`` makes a hard link (free and instant, but the same bytes: a damaged block
        damages both names); ``link=False`` copies the bytes into an independent file."""
        tmp = os.path.join(root, layout.temp_name(dst.rsplit("/", 1)[-1]))
        try:
            if not link:
                raise OSError("an independent copy was asked for")
            os.link(src, tmp)
        except OSError:
            self.fs.cp_file(src, tmp)
            _fsync_file(tmp)
        try:
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(root)

    def copy_into(self, src: str, dst: str, dst_root: str) -> None:
        os.makedirs(dst_root, exist_ok=True)
        super().copy_into(src, dst, dst_root)

    def delete_tree(self, path: str) -> None:
        self.fs.rm(path, recursive=True)


def choose(fs: Any) -> Backend:
    """The backend for filesystem ``fs``: decided here, once, by the filesystem's class."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return LocalBackend(fs)
    from lightning_ckpt.storage import objectstores

    s3fs = sys.modules.get("s3fs")  # an S3FileSystem exists only once s3fs is imported: never import it
    if s3fs is not None and isinstance(fs, s3fs.S3FileSystem):
        return objectstores.S3Backend(fs)
    package = type(fs).__module__.split(".")[0]
    if package == "gcsfs":
        return objectstores.GcsBackend(fs)
    if package == "adlfs":
        return objectstores.AzureBackend(fs)
    return FsspecBackend(fs)


#: bytes written between two background flushes of a local save (see :class:`_Writeback`)
WRITEBACK_EVERY = 64 * 2**20


class _Writeback:
    """Writes through to ``f``; every :data:`WRITEBACK_EVERY` bytes it starts an ``fdatasync`` of
    the file in a background thread (one at a time), so the disk writes while the checkpoint is
    still being serialized and the final ``fsync`` finds little left to do.

    An error of a background flush is kept and raised by :meth:`finish`: the kernel reports a
    failed write-back to one ``fsync`` only, so the final one could otherwise succeed after it.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._since = 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._since += n
        if self._since >= WRITEBACK_EVERY and (self._thread is None or not self._thread.is_alive()):
            self._since = 0
            self._f.flush()
            self._thread = threading.Thread(target=self._sync, name="lckpt-writeback", daemon=True)
            self._thread.start()
        return n

    def _sync(self) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(self._f.fileno())
        except OSError as exc:
            if self._error is None:
                self._error = exc

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._f.fileno()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> None:
        """Wait for the background flush; raise what it met."""
        self.join()
        if self._error is not None:
            raise self._error


def fsync_dir(path: str) -> None:
    """Persist a rename: fsync the directory entry (not supported everywhere; best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    """Persist a file's bytes before it is renamed into place."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
