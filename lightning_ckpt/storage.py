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
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_ckpt.errors import (
    BucketNotFoundError,
    CheckpointNotFoundError,
    ConfigurationError,
    StorageError,
    StoragePermissionError,
    UnsupportedURLError,
)

__all__ = ["TEMP_MARK", "FileInfo", "RetryPolicy", "Storage", "split_url"]

T = TypeVar("T")

#: Every temporary file this package creates contains this mark, so leftovers are provably ours.
TEMP_MARK = ".lckpt-tmp-"

_CHUNK = 8 * 2**20
# how S3 (NoSuchBucket), GCS and Azure word a missing bucket once fsspec made it a FileNotFoundError
_NO_BUCKET = "bucket does not exist"
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
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _TRANSIENT_ERRNOS
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT_WORDS)


@dataclass(frozen=True)
class FileInfo:
    """One entry of a directory listing (name relative to the storage root)."""

    name: str
    size: int


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
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")
        self.url = self.root if self.is_local and "://" not in url else fs.unstrip_protocol(self.root)

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
                if isinstance(exc, (CheckpointNotFoundError, StorageError, ConfigurationError)):
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
        if isinstance(exc, FileNotFoundError) and _NO_BUCKET in str(exc).lower():
            return BucketNotFoundError(errno.ENOENT, f"could not {what} {target}: {exc} (check the bucket name)")
        if isinstance(exc, FileNotFoundError):
            return CheckpointNotFoundError(errno.ENOENT, f"could not {what} {target}: not found")
        if isinstance(exc, PermissionError):
            return StoragePermissionError(errno.EACCES, message)
        err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        return StorageError(err, message)

    # -- reading ----------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        """True if ``name`` exists; False only on a real "not found", never on an outage."""
        try:
            self.info(name)
        except CheckpointNotFoundError:
            return False
        return True

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
                out.append(FileInfo(name=name, size=int(entry.get("size") or 0)))
            return out

        return self._call("list", None, op)

    def read_bytes(self, name: str) -> bytes:
        """The whole content of a small file."""
        path = self.path(name)
        return self._call("read", name, lambda: self.fs.cat_file(path))

    def read_into(self, name: str, buffer: memoryview, sink: Callable[[memoryview], None] | None = None) -> int:
        """Stream ``name`` into ``buffer`` chunk by chunk, calling ``sink`` on each chunk.

        Returns the number of bytes read; reads at most ``len(buffer)`` bytes and reports a
        longer file by returning ``len(buffer) + 1``.
        """
        path = self.path(name)

        def op() -> int:
            total = 0
            with self.fs.open(path, "rb", block_size=_CHUNK) as f:
                while total < len(buffer):
                    n = _readinto(f, buffer[total : total + _CHUNK])
                    if n == 0:
                        return total
                    if sink is not None:
                        sink(buffer[total : total + n])
                    total += n
                return total + 1 if f.read(1) else total

        return self._call("read", name, op)

    # -- writing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[IO[bytes]]:
        """Write ``name`` so that it appears complete or not at all.

        Local disks: a temporary sibling, fsync, atomic rename, fsync of the directory.
        Object stores: a streamed (multipart) upload that is aborted on failure.
        Not retried: the caller's data is a stream; a failed write is raised.
        """
        path = self.path(name)
        if self.is_local:
            with self._open_local(name, path) as f:
                yield f
            return
        # object stores have no directories; s3fs's makedirs would even *create a missing bucket*
        # (a typo in the URL would silently make a new one), so nothing is created there
        try:
            f = self.fs.open(path, "wb", block_size=_CHUNK)
        except Exception as exc:
            raise self.translate(exc, "open for writing", self.url_of(name)) from exc
        try:
            yield _TranslatingWriter(f, lambda exc: self.translate(exc, "write", self.url_of(name)))  # type: ignore[misc]
        except BaseException:
            _discard(f)
            with contextlib.suppress(Exception):
                self.fs.rm_file(path)
            self.fs.invalidate_cache(self.root)
            raise
        try:
            f.close()
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.fs.rm_file(path)
            raise self.translate(exc, "finish writing", self.url_of(name)) from exc
        finally:
            self.fs.invalidate_cache(self.root)

    @contextlib.contextmanager
    def _open_local(self, name: str, path: str) -> Iterator[IO[bytes]]:
        try:
            os.makedirs(self.root, exist_ok=True)
            tmp = os.path.join(self.root, f".{name}{TEMP_MARK}{uuid.uuid4().hex[:12]}")
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
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise self.translate(exc, "write", self.url_of(name)) from exc
            raise

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file atomically (retried as a whole on transient failures)."""

        def op() -> None:
            with self.open_write(name) as f:
                f.write(data)

        self._call("write", name, op)

    def copy(self, src: str, dst: str) -> None:
        """Make ``dst`` a complete copy of ``src`` (server-side where the backend can)."""
        src_path, dst_path = self.path(src), self.path(dst)
        if self.is_local:

            def local_op() -> None:
                tmp = os.path.join(self.root, f".{dst}{TEMP_MARK}{uuid.uuid4().hex[:12]}")
                try:
                    os.link(src_path, tmp)  # free and instant on the same file system
                except OSError:
                    self.fs.cp_file(src_path, tmp)
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
            self.fs.invalidate_cache(self.root)

        self._call("copy to", dst, op)

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
