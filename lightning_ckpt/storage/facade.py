"""The :class:`Storage` facade: one directory URL on any fsspec filesystem.

A :class:`Storage` is one directory URL (a plain path, ``file://``, ``memory://``, ``s3://``,
``gs://``, ``az://``, ...) plus the explicit ``storage_options`` used for every call. It knows
how to write a file so that it appears whole or not at all (temporary name + fsync + rename on
local disks; a streamed upload that only becomes an object when it completes on object stores,
discarded on failure), how to list, read, copy and delete, and how to tell a real "not found"
from an outage: only ``FileNotFoundError`` means absent, everything else becomes a
:class:`~lightning_ckpt.errors.StorageError` naming the URL (:mod:`.retry`).

GCS writes through gcsfs's resumable upload (chunks of :data:`GCS_CHUNK`, one at a time), S3
and Azure Blob through :mod:`.uploads`. Nothing is visible before an upload completes, so a
failed rewrite keeps the committed object; Azure's server-side copies are waited for, and a
never-committed Azure blob left by a failed or killed writer is deleted. A missing bucket is a
:class:`~lightning_ckpt.errors.BucketNotFoundError`, never an empty directory. Must not know the
commit protocol (the manager does) nor decide what a checkpoint should contain.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_ckpt import layout
from lightning_ckpt.errors import (
    BucketNotFoundError,
    CheckpointNotFoundError,
    ConfigurationError,
    StorageError,
    UnsupportedURLError,
)
from lightning_ckpt.storage import retry as _retry
from lightning_ckpt.storage import sources
from lightning_ckpt.storage.base import CHUNK, FileInfo, Progress
from lightning_ckpt.storage.reads import open_regular, read_blocks, readinto, stream_ranged
from lightning_ckpt.storage.retry import RetryPolicy, bucket_missing, causes, missing_bucket
from lightning_ckpt.storage.sources import Expected, Hasher, Source
from lightning_ckpt.storage.uploads import (
    GCS_CHUNK,
    AzureUpload,
    CountingWriter,
    S3Upload,
    TranslatingWriter,
    discard,
)

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
        return _retry.call(self.retry, what, self.url_of(name) if name else self.url, fn, retry)

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
            raise bucket_missing(bucket, self.url) from cause

    @staticmethod
    def translate(exc: BaseException, what: str, target: str) -> Exception:
        """Map a raw filesystem exception to the matching :class:`CheckpointError`."""
        return _retry.translate(exc, what, target)

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

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``name`` from ``offset`` (fewer where the file is shorter)."""
        path = self.path(name)

        def op() -> bytes:
            if size == 0:
                return b""
            if self.is_local:
                with open_regular(path) as f:
                    f.seek(offset)
                    return f.read(size)
            return bytes(self.fs.cat_file(path, start=offset, end=offset + size))

        return self._call("read", name, op)

    def _open_read(self, path: str) -> Any:
        """``path`` open for reading in blocks; a local one only if it is a regular file."""
        return open_regular(path) if self.is_local else self.fs.open(path, "rb", block_size=CHUNK)

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
        path = self.path(name)
        if self._s3 or self._atomic_uploads:  # s3fs, gcsfs, adlfs: async clients with ranged reads
            return self._call("read", name, lambda: stream_ranged(self.fs, path, sink, limit, progress, self.retry), retry=False)
        attempts = [0]

        def op() -> int:
            if attempts[0] and restart is not None:
                restart()
            attempts[0] += 1
            with self._open_read(path) as f:
                return read_blocks(f, sink, limit, progress)

        return self._call("read", name, op, retry=restart is not None)


    def fetch(
        self,
        name: str,
        *,
        shown_as: str | None = None,
        expected: Expected | None = None,
        hasher: Hasher = hashlib.sha256,
        progress: Progress | None = None,
        spool_dir: str | None = None,
    ) -> Source:
        """``name`` as an open :class:`~lightning_ckpt.storage.sources.Source` whose size and
        ``hasher`` digest were checked against ``expected`` while it streamed (nothing is checked
        without it).

        A local file is hashed in place and kept open (the caller then reads exactly the bytes
        that were hashed); a remote one is downloaded into an anonymous spool file in
        ``spool_dir`` (default: the system's temporary directory). A mismatch is a
        :class:`CorruptCheckpointError` naming ``shown_as``; the caller closes the source.
        """
        return sources.fetch(self, name, shown_as=shown_as, expected=expected, hasher=hasher,
                             progress=progress, spool_dir=spool_dir)

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
                counted = CountingWriter(f, progress) if progress is not None else None
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
            f = self.fs.open(path, "wb", block_size=GCS_CHUNK if self._gcs else CHUNK)
        except Exception as exc:
            raise self._write_error(exc, "open for writing", url) from exc
        try:
            writer: Any = TranslatingWriter(f, lambda exc: self._write_error(exc, "write", url))
            if progress is not None:
                writer = CountingWriter(writer, progress)
            yield writer
        except BaseException:
            discard(f)
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
        if any(isinstance(e, FileNotFoundError) for e in causes(exc)) and not missing_bucket(exc):
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
        kind = AzureUpload if self._azure else S3Upload
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
