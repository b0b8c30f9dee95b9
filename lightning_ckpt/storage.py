"""The storage layer: the only module that talks to fsspec.

A :class:`Storage` is one directory URL (a plain path, ``file://``, ``memory://``, ``s3://``,
``gs://``, ``az://``, ...) plus the explicit ``storage_options`` used for every call. It knows
how to write a file so that it appears whole or not at all (temporary name + fsync + rename on
local disks; a streamed upload that only becomes an object when it completes on object stores,
discarded on failure), how to list, read, copy and delete, and how to tell a real "not found"
from an outage: only ``FileNotFoundError`` means absent, everything else becomes a
:class:`~lightning_ckpt.errors.StorageError` naming the URL. Transient failures (connection
resets, timeouts, throttling, 5xx) are retried with exponential backoff by :class:`RetryPolicy`;
permission and "no space" errors are not.

S3 gets its own transfer code on top of s3fs's client: uploads of up to four parts at once with
part sizes that grow with the upload (:func:`part_size`), ranged downloads four at a time (GCS
and Azure too, through gcsfs's and adlfs's async clients), and
:meth:`Storage.abort_incomplete_uploads` for writers that were killed mid-upload. A missing
bucket is a :class:`~lightning_ckpt.errors.BucketNotFoundError`, never an empty directory.
Transfers report their progress to an optional ``progress(done, total)`` callback.

GCS writes through gcsfs's resumable upload (chunks of :data:`GCS_CHUNK`, one at a time), Azure
Blob through the S3 writer on the block API (blocks staged four at a time, committed at the end).
Nothing is visible before an upload completes, so a failed rewrite keeps the committed object. Their SDKs' refusals (HTTP 401/403, also when adlfs wraps them in ``RuntimeError``) are
:class:`~lightning_ckpt.errors.StoragePermissionError`; Azure's server-side copies are waited
for, and a never-committed Azure blob left by a failed or killed writer is deleted.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import errno
import hashlib
import io
import logging
import os
import random
import stat
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_ckpt import layout
from lightning_ckpt.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    StorageError,
    StoragePermissionError,
    UnsupportedURLError,
)

__all__ = ["TEMP_MARK", "FileInfo", "Progress", "RetryPolicy", "Storage", "part_size", "split_url"]

T = TypeVar("T")
#: ``progress(bytes_done, bytes_total_or_None)``, called at block granularity during a transfer.
Progress = Callable[[int, "int | None"], None]

log = logging.getLogger("lightning_ckpt")

#: Every temporary file this package creates contains this mark (and its writer), so leftovers
#: are provably ours; checkpoint names may not contain it (:func:`lightning_ckpt.layout.check_name`).
TEMP_MARK = layout.TEMP_MARK

_CHUNK = 8 * 2**20
#: chunk of a GCS resumable upload: each is one request, sent one after the other, so larger
#: chunks mean fewer round trips (google-cloud-storage itself uses 100 MiB); memory ~2.5 chunks
GCS_CHUNK = 32 * 2**20
# S3 multipart uploads: at most 10,000 parts of 5 MiB to 5 GiB each (the last may be smaller)
S3_MIN_PART = 5 * 2**20
S3_MAX_PART = 5 * 2**30
S3_MAX_PARTS = 10_000
#: first part size of our S3 uploads, and how many parts are uploaded at once
PART_SIZE = 16 * 2**20
PARTS_IN_FLIGHT = 4
#: ranged GETs of a download, PARTS_IN_FLIGHT at once
RANGE_SIZE = 8 * 2**20
#: the part size doubles every this many parts, so 10,000 parts reach S3's 5 TiB object limit
PART_GROWTH_EVERY = 1000
# how S3 (NoSuchBucket) and Azure (ContainerNotFound) word a missing bucket or container
_NO_BUCKET = ("bucket does not exist", "container does not exist", "containernotfound")
# HTTP statuses of a refusal: Azure's SDK and gcsfs carry them on their exceptions
_REFUSED = {401, 403}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EAGAIN, errno.EPIPE, errno.EBUSY}
_TRANSIENT_WORDS = ("throttl", "slowdown", "slow down", "timeout", "timed out", "503", "500", "502", "504",
                    "internalerror", "serviceunavailable", "connection reset", "connection aborted",
                    # botocore's connection errors are not OSErrors and s3fs does not retry them
                    "endpointconnectionerror", "connectionclosederror", "could not connect")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient storage failures with exponential backoff and jitter.

    Args:
        attempts: total tries per operation (1 disables retrying).
        initial_delay: seconds before the second try.
        max_delay: cap of a single backoff sleep.
    """

    attempts: int = 5
    initial_delay: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(f"RetryPolicy(attempts={self.attempts}) must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("RetryPolicy delays must not be negative")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th failure (1-based)."""
        base = min(self.max_delay, self.initial_delay * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (a network blip, not a refusal or a full disk)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if _refused(exc) or _missing_bucket(exc):
        return False
    status = getattr(exc, "status_code", None) or getattr(exc, "code", None)  # azure-core / gcsfs HttpError
    if isinstance(status, int) and 400 <= status < 600:
        return status in (408, 429) or status >= 500
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _TRANSIENT_ERRNOS
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT_WORDS)


def part_size(part_number: int, base: int = PART_SIZE, grow_every: int = PART_GROWTH_EVERY) -> int:
    """Size of part ``part_number`` (1-based) of a multipart upload.

    ``base`` for the first ``grow_every`` parts, doubling every ``grow_every`` parts after that,
    always within S3's 5 MiB .. 5 GiB. With the defaults the first 1,000 parts hold 15.6 GiB and
    10,000 parts more than S3's 5 TiB object limit (fixed 8 MiB parts stop at 78 GiB).
    """
    if not 1 <= part_number <= S3_MAX_PARTS:
        raise ValueError(f"part number {part_number} is outside 1..{S3_MAX_PARTS}")
    if base < 1 or grow_every < 1:
        raise ValueError("base and grow_every must be positive")
    tier = (part_number - 1) // grow_every
    size = base << min(tier, 62)  # past 2**62 the cap applies anyway
    return max(S3_MIN_PART, min(S3_MAX_PART, size))


@dataclass(frozen=True)
class FileInfo:
    """One entry of a directory listing (name relative to the storage root)."""

    name: str
    size: int
    #: modification time where the backend reports one cheaply (local disks), else None
    mtime: float | None = None


def split_url(url: str) -> tuple[str, str]:
    """Split a file URL into (directory URL, file name)."""
    url = str(url).rstrip("/")
    head, _, name = url.rpartition("/")
    if not name:
        raise ConfigurationError(f"{url!r} does not name a file")
    if not head:
        head = "."
    elif head.endswith((":/", ":")):  # "memory://x" -> ("memory://", "x")
        head = url[: len(url) - len(name)]
    return head, name


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
        self.fs = fs
        self.is_local = isinstance(fs, LocalFileSystem)
        self._s3 = _is_s3(fs)
        self._atomic_uploads = _publishes_on_completion(fs)
        self._azure = type(fs).__module__.split(".")[0] == "adlfs"
        self._gcs = type(fs).__module__.split(".")[0] == "gcsfs"
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")
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
        return f"{self.url.rstrip('/')}/{name}" if self.url != "/" else f"/{name}"

    # -- error handling ---------------------------------------------------------------------

    def _call(self, what: str, name: str | None, fn: Callable[[], T], retry: bool = True) -> T:
        """Run ``fn``, retrying transient failures; translate errors into our tree."""
        target = self.url_of(name) if name else self.url
        attempts = self.retry.attempts if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:
                cause = exc.__cause__ if isinstance(exc, StorageError) else None
                if attempt < attempts and cause is not None and is_transient(cause):
                    time.sleep(self.retry.delay(attempt))  # a whole small write, retried as a unit
                    continue
                if isinstance(exc, CheckpointError):  # ours already (a special file, a not found, ...)
                    raise
                if attempt < attempts and is_transient(exc):
                    time.sleep(self.retry.delay(attempt))
                    continue
                raise self.translate(exc, what, target) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_bucket(self, cause: BaseException) -> None:
        """After a "not found" on an object store: raise if the bucket itself is missing."""
        split = getattr(self.fs, "split_path", None)  # s3fs, gcsfs, adlfs: stores with buckets
        if self.is_local or split is None or not self.root:
            return
        bucket = split(self.root)[0]
        self.fs.invalidate_cache(bucket)
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise _bucket_missing(bucket, self.url) from cause

    @staticmethod
    def translate(exc: BaseException, what: str, target: str) -> Exception:
        """Map a raw filesystem exception to the matching :class:`CheckpointError`."""
        message = f"could not {what} {target}: {type(exc).__name__}: {exc}"
        if _missing_bucket(exc):
            return BucketNotFoundError(errno.ENOENT, f"could not {what} {target}: {exc} (check the bucket name)")
        if isinstance(exc, FileNotFoundError):
            return CheckpointNotFoundError(errno.ENOENT, f"could not {what} {target}: not found")
        if _refused(exc):
            return StoragePermissionError(errno.EACCES, message)
        err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        return StorageError(err, message)

    def check_directory(self) -> None:
        """Raise :class:`ConfigurationError` if this directory's path is a regular file."""

        def op() -> bool:
            self.fs.invalidate_cache(self.root)
            try:
                return self.fs.info(self.root).get("type") == "file"
            except FileNotFoundError:
                return False

        if self.root and self._call("stat", None, op):
            raise ConfigurationError(f"the checkpoint directory {self.url} is a file, not a directory")

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
            out = []
            for entry in entries:
                if entry.get("type") == "directory":
                    continue
                name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
                mtime = entry.get("mtime") if self.is_local else None
                out.append(FileInfo(name=name, size=int(entry.get("size") or 0),
                                    mtime=float(mtime) if isinstance(mtime, (int, float)) else None))
            return out

        return self._call("list", None, op)

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """The whole content of a small file; with ``limit``, at most ``limit + 1`` bytes of it
        (a longer result says the file is larger than the caller accepts)."""
        path = self.path(name)

        def op() -> bytes:
            if self.is_local:
                with open_regular(path) as f:
                    return f.read() if limit is None else f.read(limit + 1)
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

        return self._call("read", name, op)

    def _open_read(self, path: str) -> Any:
        """``path`` open for reading in blocks; a local one only if it is a regular file."""
        return open_regular(path) if self.is_local else self.fs.open(path, "rb", block_size=_CHUNK)

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
                    n = _readinto(f, buffer[total : total + _CHUNK])
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
        path = self.path(name)
        if self._s3 or self._atomic_uploads:  # s3fs, gcsfs, adlfs: async clients with ranged reads
            return self._call("read", name, lambda: self._stream_ranged(path, sink, limit, progress), retry=False)
        attempts = [0]

        def op() -> int:
            if attempts[0] and restart is not None:
                restart()
            attempts[0] += 1
            block = memoryview(bytearray(_CHUNK))
            total = 0
            with self._open_read(path) as f:
                while limit is None or total < limit:
                    want = _CHUNK if limit is None else min(_CHUNK, limit - total)
                    n = _readinto(f, block[:want])
                    if n == 0:
                        return total
                    sink(block[:n])
                    total += n
                    if progress is not None:
                        progress(total, limit)
                return total + 1 if f.read(1) else total

        return self._call("read", name, op, retry=restart is not None)

    def _stream_ranged(self, path: str, sink: Callable[[memoryview], None], limit: int | None,
                       progress: Progress | None) -> int:
        """Ranged GETs of :data:`RANGE_SIZE`, :data:`PARTS_IN_FLIGHT` at once, handed on in order.

        Each range is retried on its own on transient errors, so a blip costs one range, not a
        restart; at most ``PARTS_IN_FLIGHT`` ranges are in memory.
        """
        from fsspec.asyn import sync

        self.fs.invalidate_cache(path)
        info = sync(self.fs.loop, self.fs._info, path)
        if info.get("type") == "directory":
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a checkpoint file")
        size = int(info.get("size") or 0)
        end = size if limit is None else min(size, limit)
        starts = list(range(0, end, RANGE_SIZE))
        pending: list[concurrent.futures.Future[bytes]] = []

        async def fetch(start: int) -> bytes:
            for attempt in range(1, self.retry.attempts + 1):
                try:
                    data = await self.fs._cat_file(path, start=start, end=min(start + RANGE_SIZE, end))
                    if len(data) != min(RANGE_SIZE, end - start):  # replaced by a shorter object meanwhile
                        raise OSError(errno.EIO, f"range at {start} came back with {len(data)} bytes")
                    return bytes(data)
                except Exception as exc:
                    if attempt >= self.retry.attempts or not is_transient(exc):
                        raise
                    await asyncio.sleep(self.retry.delay(attempt))
            raise AssertionError("unreachable")  # pragma: no cover

        done = 0
        try:
            for i in range(len(starts)):
                while len(pending) < PARTS_IN_FLIGHT and i + len(pending) < len(starts):
                    pending.append(asyncio.run_coroutine_threadsafe(fetch(starts[i + len(pending)]), self.fs.loop))
                data = pending.pop(0).result()
                sink(memoryview(data))
                done += len(data)
                del data
                if progress is not None:
                    progress(done, limit)
        finally:
            for future in pending:
                future.cancel()
        return limit + 1 if limit is not None and size > limit else done

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
        path = self.path(name)
        if self.is_local:
            with self._open_local(name, path) as f:
                counted = _CountingWriter(f, progress) if progress is not None else None
                yield counted if counted is not None else f  # type: ignore[misc]  # a write-only stream
            if counted is not None and progress is not None:
                progress(counted.size, counted.size)
            return
        if self._s3 or self._azure:
            with self._open_s3(name, path, progress) as f:
                yield f
            return
        # object stores have no directories; s3fs's makedirs would even *create a missing bucket*
        # (a typo in the URL would silently make a new one), so nothing is created there
        url = self.url_of(name)
        try:
            f = self.fs.open(path, "wb", block_size=GCS_CHUNK if self._gcs else _CHUNK)
        except Exception as exc:
            raise self._write_error(exc, "open for writing", url) from exc
        try:
            writer: Any = _TranslatingWriter(f, lambda exc: self._write_error(exc, "write", url))
            if progress is not None:
                writer = _CountingWriter(writer, progress)
            yield writer
        except BaseException:
            _discard(f)
            self._remove_partial(path)
            raise
        try:
            f.close()
        except Exception as exc:
            self._remove_partial(path)
            raise self._write_error(exc, "finish writing", url) from exc
        finally:
            self.fs.invalidate_cache(self.root)
        if progress is not None:
            progress(writer.size, writer.size)

    def _remove_partial(self, path: str) -> None:
        """After a failed upload: delete what a non-atomic store may have left under ``path``.

        GCS (resumable upload) and Azure (uncommitted blocks) publish an object only when it
        completes, so there the name still holds its previous, committed content,
        which a failed rewrite must not destroy.
        """
        if not self._atomic_uploads:
            with contextlib.suppress(Exception):
                self.fs.rm_file(path)
        elif self._azure:
            with contextlib.suppress(Exception):
                self._delete_uncommitted_azure(path)
        self.fs.invalidate_cache(self.root)

    def _delete_uncommitted_azure(self, path: str) -> bool:
        """Delete the blob at ``path`` if it has staged blocks but was never committed.

        A committed blob of that name is kept (its staged blocks go with the next commit, or after
        a week); listings never show an uncommitted one, but it holds its blocks until deleted.
        """
        from azure.core.exceptions import ResourceNotFoundError
        from fsspec.asyn import sync

        self.fs.invalidate_cache(path)
        try:
            self.fs.info(path)
            return False  # committed: not ours to delete here
        except FileNotFoundError:
            pass
        container, key, _ = self.fs.split_path(path)
        blob = self.fs.service_client.get_container_client(container).get_blob_client(key)
        try:
            sync(self.fs.loop, blob.delete_blob)
        except ResourceNotFoundError:
            return False
        return True

    def _write_error(self, exc: BaseException, what: str, url: str) -> Exception:
        """Translate a failed upload; a "not found" there usually means the bucket is missing."""
        if any(isinstance(e, FileNotFoundError) for e in _causes(exc)) and not _missing_bucket(exc):
            try:
                self._check_bucket(exc)
            except BucketNotFoundError as missing:
                return missing
            except Exception:  # noqa: BLE001 - the check itself failed: report the write's own error
                pass
        return self.translate(exc, what, url)

    @contextlib.contextmanager
    def _open_s3(self, name: str, path: str, progress: Progress | None) -> Iterator[IO[bytes]]:
        url = self.url_of(name)
        kind = _AzureUpload if self._azure else _S3Upload
        upload = kind(self.fs, path, self.retry, lambda exc, what: self.translate(exc, what, url), progress)
        try:
            yield upload  # type: ignore[misc]
            upload.close()
        except BaseException:
            upload.abort()
            raise
        finally:
            self.fs.invalidate_cache(self.root)

    @contextlib.contextmanager
    def _open_local(self, name: str, path: str) -> Iterator[IO[bytes]]:
        temp = layout.temp_name(name)
        with layout.in_flight(temp):
            try:
                os.makedirs(self.root, exist_ok=True)
                tmp = os.path.join(self.root, temp)
                f = open(tmp, "wb")  # noqa: SIM115 - closed below on every path
            except Exception as exc:
                raise self.translate(exc, "open for writing", self.url_of(name)) from exc
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(tmp, path)
                _fsync_dir(self.root)
            except BaseException as exc:
                # closing flushes what is buffered: on a full disk that fails too, and the
                # temporary file must still go
                with contextlib.suppress(OSError):
                    f.close()
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                    raise self.translate(exc, "write", self.url_of(name)) from exc
                raise

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file atomically (retried as a whole on transient failures)."""

        if self.is_local or self._s3:

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

        def op() -> None:
            os.replace(src_path, dst_path)
            _fsync_dir(self.root)

        self._call("rename to", dst, op)

    def copy(self, src: str, dst: str, link: bool = True) -> None:
        """Make ``dst`` a complete copy of ``src`` (server-side where the backend can).

        On a local disk ``link=True`` makes a hard link (free and instant, but the same bytes: a
        damaged block damages both names); ``link=False`` copies the bytes into an independent file.
        """
        src_path, dst_path = self.path(src), self.path(dst)
        if self.is_local:

            def local_op() -> None:
                tmp = os.path.join(self.root, layout.temp_name(dst))
                try:
                    if not link:
                        raise OSError("an independent copy was asked for")
                    os.link(src_path, tmp)
                except OSError:
                    self.fs.cp_file(src_path, tmp)
                    _fsync_file(tmp)
                try:
                    os.replace(tmp, dst_path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                _fsync_dir(self.root)

            self._call("copy to", dst, local_op)
            return

        def op() -> None:
            self.fs.cp_file(src_path, dst_path)
            if self._azure:
                self._wait_azure_copy(dst_path)
            self.fs.invalidate_cache(self.root)

        self._call("copy to", dst, op)

    def _wait_azure_copy(self, path: str, timeout: float = 600.0) -> None:
        """Azure's Copy Blob may finish after it answered (adlfs does not wait): wait for it."""
        from fsspec.asyn import sync

        container, key, _ = self.fs.split_path(path)
        blob = self.fs.service_client.get_container_client(container).get_blob_client(key)
        deadline, delay = time.monotonic() + timeout, 0.05
        while True:
            copy = sync(self.fs.loop, blob.get_blob_properties).copy
            if copy is None or copy.status in (None, "success"):
                return
            if copy.status != "pending":
                raise OSError(errno.EIO, f"server-side copy to {path} ended {copy.status}: {copy.status_description}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server-side copy to {path} still pending after {timeout:.0f} s")
            time.sleep(delay)
            delay = min(1.0, delay * 2)

    def abort_incomplete_uploads(self, names: Collection[str]) -> builtins.list[str]:
        """Abort unfinished multipart uploads of ``names`` in this directory; return those names.

        A writer killed mid-upload (SIGKILL, a lost node) leaves its parts on the server, unseen by
        listings but stored (and billed) until aborted. Only uploads to exactly these names are
        touched. S3: the multipart uploads are aborted. Azure: a blob that has staged blocks but
        was never committed is deleted (a committed blob of that name is left alone). A no-op
        elsewhere: local and memory have no such leftovers, and GCS cannot list its resumable
        upload sessions (they expire by themselves after a week).
        """
        if self._azure and names:
            return self._call("abort the unfinished uploads in", None, lambda: self._abort_azure(names))
        if not self._s3 or not names:
            return []
        from fsspec.asyn import sync

        bucket, prefix, _ = self.fs.split_path(self.root)
        ours = {f"{prefix}/{name}" if prefix else name: name for name in names}

        def call(method: str, **kwargs: Any) -> Any:
            return sync(self.fs.loop, self.fs._call_s3, method, Bucket=bucket, **kwargs)

        def op() -> builtins.list[str]:
            aborted: builtins.list[str] = []
            query: dict[str, str] = {"Prefix": f"{prefix}/" if prefix else ""}
            while True:
                page = call("list_multipart_uploads", **query)
                for upload in page.get("Uploads") or []:
                    name = ours.get(upload.get("Key", ""))
                    if name is None:
                        continue
                    try:
                        call("abort_multipart_upload", Key=upload["Key"], UploadId=upload["UploadId"])
                    except FileNotFoundError:
                        continue  # completed or aborted meanwhile
                    aborted.append(name)
                if not page.get("IsTruncated"):
                    return aborted
                query.update(KeyMarker=page.get("NextKeyMarker", ""), UploadIdMarker=page.get("NextUploadIdMarker", ""))

        return self._call("abort the unfinished uploads in", None, op)

    def _abort_azure(self, names: Collection[str]) -> builtins.list[str]:
        from fsspec.asyn import sync

        container, prefix, _ = self.fs.split_path(self.root)
        ours = {f"{prefix}/{name}" if prefix else name: name for name in names}
        client = self.fs.service_client.get_container_client(container)

        async def listed() -> builtins.list[str]:  # committed blobs and never-committed ones
            return [blob.name async for blob in client.list_blobs(
                name_starts_with=f"{prefix}/" if prefix else None, include=["uncommittedblobs"])
                if blob.name in ours]

        aborted = []
        for key in sync(self.fs.loop, listed):
            if self._delete_uncommitted_azure(f"{container}/{key}"):
                aborted.append(ours[key])
        self.fs.invalidate_cache(self.root)
        return aborted

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
                self.fs.rm(path, recursive=True)
                if not self.is_local:
                    # stores with a filer (SeaweedFS, MinIO...) keep an empty folder entry, S3
                    # has none: deleting the "dir/" key is harmless either way
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(path + "/")
            except FileNotFoundError:
                pass
            finally:
                self.fs.invalidate_cache(self.root)
                self.fs.invalidate_cache(path)

        self._call("delete", name, op)

    def copy_to(self, name: str, other: Storage) -> None:
        """Copy ``name`` into directory ``other`` on the same filesystem (server-side on stores)."""
        src, dst = self.path(name), other.path(name)

        def op() -> None:
            if self.is_local:
                os.makedirs(other.root, exist_ok=True)
            self.fs.cp_file(src, dst)
            if self._azure:
                self._wait_azure_copy(dst)
            self.fs.invalidate_cache(other.root)

        self._call("copy to", name, op)

    def digest(self, name: str) -> tuple[int, str]:
        """Size and sha256 of ``name``, streamed in blocks (memory: one block)."""
        path = self.path(name)

        def op() -> tuple[int, str]:
            digest, size = hashlib.sha256(), 0
            block = bytearray(_CHUNK)
            with self._open_read(path) as f:
                while n := _readinto(f, memoryview(block)):
                    digest.update(memoryview(block)[:n])
                    size += n
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


class _CountingWriter:
    """Forwards writes and reports the running byte count to ``progress``."""

    def __init__(self, f: Any, progress: Progress) -> None:
        self._f = f
        self._progress = progress
        self.size = 0

    def write(self, data: Any) -> int:
        n = int(self._f.write(data) or 0)
        self.size += n
        self._progress(self.size, None)
        return n

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True


class _S3Upload:
    """A write-only stream that uploads to S3 in parts, several at once, with bounded memory.

    Writes fill a part buffer; a full buffer is handed to s3fs's event loop as an ``UploadPart``
    request while the caller goes on filling the next one. At most :data:`PARTS_IN_FLIGHT`
    buffers exist at any time (the one being filled included), so the extra memory is at most
    ``PARTS_IN_FLIGHT x part_size``; a writer that gets ahead waits for the oldest part. Buffers
    are reused. Nothing is visible until ``CompleteMultipartUpload``; :meth:`abort` cancels what
    is in flight and aborts the upload (what cannot be aborted now, ``cleanup()`` aborts later).
    Content smaller than one part is sent with a single ``PutObject``.
    """

    _max_part = S3_MAX_PART

    def __init__(
        self,
        fs: Any,
        path: str,
        retry: RetryPolicy,
        translate: Callable[[BaseException, str], Exception],
        progress: Progress | None,
        in_flight: int = PARTS_IN_FLIGHT,
    ) -> None:
        self._fs = fs
        self._bucket, self._key, _ = fs.split_path(path)
        self._retry = retry
        self._translate = translate
        self._progress = progress
        self._max_buffers = max(1, in_flight)
        self._part = 1
        self._cap = min(part_size(1), self._max_part)
        self._buf = bytearray()  # grows as written: a small object never costs a whole part
        self._fill = 0
        self._free: list[bytearray] = []
        self._buffers = 1
        self._upload_id: str | None = None
        self._pending: dict[concurrent.futures.Future[str], tuple[int, bytearray]] = {}
        self._etags: dict[int, str] = {}
        self._done = False
        self.size = 0

    # -- the stream -------------------------------------------------------------------------

    def write(self, data: Any) -> int:
        if self._done:
            raise ValueError("write to a closed upload")
        view = memoryview(data).cast("B")
        pos = 0
        while pos < view.nbytes:
            if self._part > S3_MAX_PARTS:
                raise self._translate(OSError(errno.EFBIG, f"larger than {S3_MAX_PARTS} parts can hold"), "write")
            take = min(self._cap - self._fill, view.nbytes - pos)
            if len(self._buf) == self._fill:
                self._buf += view[pos : pos + take]
            else:  # a preallocated (reused) part buffer
                self._buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self._cap:
                self._send_part()
        self.size += view.nbytes
        if self._progress is not None:
            self._progress(self.size, None)
        return view.nbytes

    def flush(self) -> None:
        """Parts are sent when full; nothing to do."""

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Send what is left and complete the upload (or put a small object whole)."""
        if self._done:
            return
        if self._upload_id is None:
            self._call("put_object", "write", Body=memoryview(self._buf)[: self._fill])
        else:
            if self._fill:
                self._submit(self._part, self._buf, self._fill)
            self._wait(until=0)
            parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
            self._call("complete_multipart_upload", "finish writing", UploadId=self._upload_id,
                       MultipartUpload={"Parts": parts})
        self._done = True
        self._buf = bytearray()
        self._free.clear()
        if self._progress is not None:
            self._progress(self.size, self.size)

    def abort(self) -> None:
        """Abandon the upload: cancel parts in flight, abort it on the server. Never raises."""
        self._done = True
        for future in self._pending:
            future.cancel()
        concurrent.futures.wait(list(self._pending), timeout=60)
        self._pending.clear()
        self._buf = bytearray()
        self._free.clear()
        if self._upload_id is not None:
            try:
                self._call("abort_multipart_upload", "abort the upload of", UploadId=self._upload_id)
            except Exception as exc:  # noqa: BLE001 - reported; cleanup() aborts it later
                log.warning("%s; cleanup() will abort it", exc)

    # -- internals --------------------------------------------------------------------------

    def _call(self, method: str, what: str, **kwargs: Any) -> Any:
        """One request on s3fs's loop, retried on transient errors, errors translated."""
        from fsspec.asyn import sync

        try:
            return sync(self._fs.loop, self._retrying, method, **kwargs)
        except Exception as exc:
            raise self._translate(exc, what) from exc

    async def _upload_part(self, number: int, body: memoryview) -> str:
        out = await self._retrying("upload_part", UploadId=self._upload_id, PartNumber=number, Body=body)
        return str(out["ETag"])

    async def _retrying(self, method: str, **kwargs: Any) -> Any:
        body = kwargs.pop("Body", None)
        for attempt in range(1, self._retry.attempts + 1):
            if body is not None:
                # a fresh reader per attempt (rewound); aiohttp would copy a bytearray body twice.
                # Buffers are never resized: the HTTP client may hold a view of one for a while
                kwargs["Body"] = _BufferReader(body)
            try:
                return await self._fs._call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)
            except Exception as exc:
                if attempt >= self._retry.attempts or not is_transient(exc):
                    raise
                await asyncio.sleep(self._retry.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = str(self._call("create_multipart_upload", "start writing")["UploadId"])
        self._submit(self._part, self._buf, self._fill)
        self._part += 1
        self._reap()
        if self._part > S3_MAX_PARTS:  # only reachable past ~8 TiB; the next write raises
            self._buf, self._fill = bytearray(), 0
            return
        self._cap = min(part_size(self._part), self._max_part)
        self._buf, self._fill = self._next_buffer(self._cap), 0

    def _next_buffer(self, size: int) -> bytearray:
        while True:
            for stale in [b for b in self._free if len(b) != size]:  # parts grew: drop smaller ones
                self._free.remove(stale)
                self._buffers -= 1
            if self._free:
                return self._free.pop()
            if self._buffers < self._max_buffers:
                self._buffers += 1
                return bytearray(size)
            self._wait(until=len(self._pending) - 1)

    def _submit(self, number: int, buffer: bytearray, length: int) -> None:
        future = asyncio.run_coroutine_threadsafe(
            self._upload_part(number, memoryview(buffer)[:length]), self._fs.loop
        )
        self._pending[future] = (number, buffer)

    def _collect(self, future: concurrent.futures.Future[str]) -> None:
        number, body = self._pending.pop(future)
        try:
            self._etags[number] = future.result()
        except Exception as exc:
            raise self._translate(exc, "write") from exc
        self._free.append(body)

    def _reap(self) -> None:
        """Collect finished parts without waiting (a failure surfaces at the next write)."""
        for future in [f for f in self._pending if f.done()]:
            self._collect(future)

    def _wait(self, until: int) -> None:
        """Wait until at most ``until`` parts are in flight; raise the first failure."""
        while len(self._pending) > until:
            done, _ = concurrent.futures.wait(list(self._pending), return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                self._collect(future)


class _AzureUpload(_S3Upload):
    """The S3 writer's parallel, bounded-memory upload, on Azure Blob's block API.

    A part is a staged block (``Put Block``, several at once), completing is ``Put Block List``
    (the moment the blob appears), a small object is one ``Put Blob``, and aborting deletes the
    blob if it was never committed (a committed blob of that name keeps its content; its staged
    blocks go with the next commit). Blocks are at most 4000 MiB, Azure's limit.
    """

    def __init__(self, fs: Any, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(fs, path, *args, **kwargs)
        container, key, _ = fs.split_path(path)
        self._blob = fs.service_client.get_container_client(container).get_blob_client(key)
        self._path = path
        self._prefix = uuid.uuid4().hex[:16]  # block ids: same length, unique to this upload

    _max_part = 4000 * 2**20  # the largest block Azure accepts

    def _block_id(self, number: int) -> str:
        import base64

        return base64.b64encode(f"{self._prefix}-{number:08d}".encode()).decode()

    async def _retrying(self, method: str, **kwargs: Any) -> Any:
        body = kwargs.pop("Body", None)
        for attempt in range(1, self._retry.attempts + 1):
            try:
                return await self._azure(method, body, **kwargs)
            except Exception as exc:
                if attempt >= self._retry.attempts or not is_transient(exc):
                    raise
                await asyncio.sleep(self._retry.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _azure(self, method: str, body: memoryview | None, **kwargs: Any) -> Any:
        if method == "put_object":
            assert body is not None
            return await self._blob.upload_blob(_BufferReader(body), length=len(body), overwrite=True)
        if method == "create_multipart_upload":
            return {"UploadId": self._prefix}
        if method == "upload_part":
            assert body is not None
            block = self._block_id(kwargs["PartNumber"])
            await self._blob.stage_block(block, _BufferReader(body), length=len(body))
            return {"ETag": block}
        if method == "complete_multipart_upload":
            from azure.storage.blob import BlobBlock

            parts = kwargs["MultipartUpload"]["Parts"]
            return await self._blob.commit_block_list([BlobBlock(block_id=p["ETag"]) for p in parts])
        if method == "abort_multipart_upload":
            from azure.core.exceptions import ResourceNotFoundError

            try:
                await self._blob.get_blob_properties()
                return None  # committed (an older version): keep it
            except ResourceNotFoundError:
                pass
            with contextlib.suppress(ResourceNotFoundError):
                await self._blob.delete_blob()
            return None
        raise ValueError(f"no Azure equivalent of {method}")  # pragma: no cover


class _BufferReader(io.RawIOBase):
    """A seekable, zero-copy reader over a part buffer (the HTTP client reads it in small chunks)."""

    def __init__(self, data: memoryview) -> None:
        self._view = data
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

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


def open_regular(path: str) -> IO[bytes]:
    """Open local ``path`` for reading only if it is a regular file.

    A FIFO, socket or device named like a checkpoint would block or never end; it is opened
    non-blocking (so opening a FIFO cannot hang), checked on the open descriptor (so it cannot be
    swapped in between), and refused as a :class:`CorruptCheckpointError`.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a checkpoint file", path)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(
                f"{path} is not a regular file (a FIFO, socket or device?); refusing to read it"
            )
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_s3(fs: Any) -> bool:
    # an S3FileSystem exists only once s3fs is imported: never import it (~0.5 s) to find out
    s3fs = sys.modules.get("s3fs")
    return s3fs is not None and isinstance(fs, s3fs.S3FileSystem)


def _publishes_on_completion(fs: Any) -> bool:
    """Whether an fsspec upload to ``fs`` becomes visible only once complete (nothing partial)."""
    # memory:// is not: its files are in the store from open() on
    return type(fs).__module__.split(".")[0] in ("gcsfs", "adlfs")


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class _TranslatingWriter:
    """Forwards writes to a remote file; the backend's own errors (botocore, aiohttp, ...) become
    :class:`StorageError` naming the URL, so a dead server mid-upload is reported like any outage."""

    def __init__(self, f: Any, translate: Callable[[BaseException], Exception]) -> None:
        self._f = f
        self._translate = translate

    def write(self, data: Any) -> int:
        try:
            return int(self._f.write(data))
        except Exception as exc:  # every backend failure is translated
            raise self._translate(exc) from exc

    def flush(self) -> None:
        try:
            self._f.flush()
        except Exception as exc:
            raise self._translate(exc) from exc

    def writable(self) -> bool:
        return True


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (adlfs wraps Azure's errors in RuntimeError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _missing_bucket(exc: BaseException) -> bool:
    """Whether the store said the bucket (S3, GCS) or container (Azure) itself does not exist."""
    for e in _causes(exc):
        text = str(e).lower()
        if getattr(e, "error_code", None) == "ContainerNotFound" or any(word in text for word in _NO_BUCKET):
            return True
    return False


def _refused(exc: BaseException) -> bool:
    """Whether the store refused the credentials or the permission (never worth a retry)."""
    for e in _causes(exc):
        if isinstance(e, PermissionError):
            return True
        status = getattr(e, "status_code", None) or getattr(e, "code", None)  # azure-core / gcsfs HttpError
        if isinstance(status, int) and status in _REFUSED:
            return True
        if type(e) is OSError and str(e).startswith("Forbidden: "):  # gcsfs's word for HTTP 403
            return True
    return False


def _bucket_missing(bucket: str, url: str) -> BucketNotFoundError:
    return BucketNotFoundError(
        errno.ENOENT, f"the bucket {bucket!r} of {url} does not exist (check the URL and storage_options)"
    )


def _readinto(f: Any, view: memoryview) -> int:
    if hasattr(f, "readinto"):
        return int(f.readinto(view) or 0)
    data = f.read(len(view))
    view[: len(data)] = data
    return len(data)


def _discard(f: Any) -> None:
    """Abandon a half-written remote file without committing it (aborts multipart uploads)."""
    discard = getattr(f, "discard", None)
    with contextlib.suppress(Exception):
        if discard is not None:
            discard()
        else:
            f.close()
    # fsspec's buffered files commit on close(); make sure a later close() is a no-op
    with contextlib.suppress(Exception):
        f.closed = True


def _fsync_dir(path: str) -> None:
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
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
