"""Object-store backends: S3 (s3fs), Google Cloud Storage (gcsfs) and Azure Blob (adlfs).

Owns what these stores do differently from plain fsspec: ranged downloads several at a time
through their async clients (:func:`~lightning_ckpt.storage.reads.stream_ranged`), our own
parallel uploads for S3 and Azure (:mod:`.uploads`), gcsfs's resumable upload in large chunks,
aborting the unfinished uploads a killed writer left (S3 multipart uploads, never-committed
Azure blobs) and waiting for Azure's server-side copies. Must not be chosen anywhere but
:func:`lightning_ckpt.storage.backends.choose`, nor retry whole operations (the facade does).
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable, Collection, Iterator
from typing import IO, Any

from lightning_ckpt.storage.backends import FsspecBackend, Runner
from lightning_ckpt.storage.base import Progress
from lightning_ckpt.storage.reads import stream_ranged
from lightning_ckpt.storage.retry import RetryPolicy, translate
from lightning_ckpt.storage.uploads import GCS_CHUNK, AzureUpload, S3Upload

__all__ = ["AzureBackend", "GcsBackend", "S3Backend"]


class _RangedReads(FsspecBackend):
    """A store with an async client: downloads are ranged GETs, each retried on its own."""

    def stream(self, path: str, sink: Callable[[memoryview], None], limit: int | None,
               restart: Callable[[], None] | None, progress: Progress | None, run: Runner[int],
               retry: RetryPolicy) -> int:
        return run(lambda: stream_ranged(self.fs, path, sink, limit, progress, retry), False)


class GcsBackend(_RangedReads):
    """GCS: gcsfs's resumable upload (one chunk of :data:`GCS_CHUNK` at a time), which publishes
    the object only when it completes, so a failed rewrite keeps the committed object."""

    write_block = GCS_CHUNK

    def remove_partial(self, path: str) -> None:
        """Nothing to remove: an unfinished resumable upload is no object (the old one stays)."""


class S3Backend(_RangedReads):
    """S3: our multipart uploads (:class:`~lightning_ckpt.storage.uploads.S3Upload`), aborted on
    failure; a small object is one ``PutObject``, so it appears whole."""

    whole_writes = True
    upload = S3Upload

    @contextlib.contextmanager
    def open_write(self, path: str, url: str, root: str, progress: Progress | None,
                   retry: RetryPolicy) -> Iterator[IO[bytes]]:
        upload = self.upload(self.fs, path, retry, lambda exc, what: translate(exc, what, url), progress)
        try:
            yield upload  # type: ignore[misc]
            upload.close()
        except BaseException:
            upload.abort()
            raise
        finally:
            self.fs.invalidate_cache(root)

    def abort_incomplete_uploads(self, root: str, names: Collection[str]) -> list[str]:
        """Abort the multipart uploads of exactly ``names`` (a killed writer's parts are billed)."""
        if not names:
            return []
        from fsspec.asyn import sync

        bucket, prefix, _ = self.fs.split_path(root)
        ours = {f"{prefix}/{name}" if prefix else name: name for name in names}

        def call(method: str, **kwargs: Any) -> Any:
            return sync(self.fs.loop, self.fs._call_s3, method, Bucket=bucket, **kwargs)

        aborted: list[str] = []
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


class AzureBackend(S3Backend):
    """Azure Blob: the S3 writer on the block API (:class:`~lightning_ckpt.storage.uploads.AzureUpload`);
    server-side copies are waited for, and a never-committed blob a writer left is deleted."""

    whole_writes = False
    upload = AzureUpload

    def after_copy(self, path: str, timeout: float = 600.0) -> None:
        """Azure's Copy Blob may finish after it answered (adlfs does not wait): wait for it."""
        from fsspec.asyn import sync

        deadline, delay = time.monotonic() + timeout, 0.05
        while True:
            copy = sync(self.fs.loop, self._blob(path).get_blob_properties).copy
            if copy is None or copy.status in (None, "success"):
                return
            if copy.status != "pending":
                raise OSError(errno.EIO, f"server-side copy to {path} ended {copy.status}: {copy.status_description}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server-side copy to {path} still pending after {timeout:.0f} s")
            time.sleep(delay)
            delay = min(1.0, delay * 2)

    def abort_incomplete_uploads(self, root: str, names: Collection[str]) -> list[str]:
        """Delete the blobs of ``names`` that have staged blocks but were never committed (a
        committed blob of that name is left alone)."""
        if not names:
            return []
        from fsspec.asyn import sync

        container, prefix, _ = self.fs.split_path(root)
        ours = {f"{prefix}/{name}" if prefix else name: name for name in names}
        client = self.fs.service_client.get_container_client(container)

        async def listed() -> list[str]:  # committed blobs and never-committed ones
            return [blob.name async for blob in client.list_blobs(
                name_starts_with=f"{prefix}/" if prefix else None, include=["uncommittedblobs"])
                if blob.name in ours]

        aborted = []
        for key in sync(self.fs.loop, listed):
            if self._delete_uncommitted(f"{container}/{key}"):
                aborted.append(ours[key])
        self.fs.invalidate_cache(root)
        return aborted

    def _delete_uncommitted(self, path: str) -> bool:
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
        try:
            sync(self.fs.loop, self._blob(path).delete_blob)
        except ResourceNotFoundError:
            return False
        return True

    def _blob(self, path: str) -> Any:
        container, key, _ = self.fs.split_path(path)
        return self.fs.service_client.get_container_client(container).get_blob_client(key)
