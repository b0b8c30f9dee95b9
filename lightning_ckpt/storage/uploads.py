"""Uploads: streams that write a file so that it appears whole or not at all on object stores.

Owns the S3 multipart writer (:class:`S3Upload`: several parts in flight, bounded memory, part
sizes of :func:`part_size`), its Azure Blob twin on the block API (:class:`AzureUpload`), and
the small stream wrappers every write path uses (progress counting, error translation, discarding
a half-written fsspec file). Must not decide *which* writer a store gets (the backend does, once)
and must not retry anything but single requests: a failed stream is raised to the caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import io
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from lightning_ckpt.storage.base import Progress
from lightning_ckpt.storage.retry import RetryPolicy, call_async

__all__ = ["AzureUpload", "CountingWriter", "S3Upload", "TranslatingWriter", "discard", "part_size"]

log = logging.getLogger("lightning_ckpt")

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
#: the part size doubles every this many parts, so 10,000 parts reach S3's 5 TiB object limit
PART_GROWTH_EVERY = 1000


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


class CountingWriter:
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


class S3Upload:
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

        def attempt() -> Awaitable[Any]:
            if body is not None:
                # a fresh reader per attempt (rewound); aiohttp would copy a bytearray body twice.
                # Buffers are never resized: the HTTP client may hold a view of one for a while
                kwargs["Body"] = _BufferReader(body)
            return self._fs._call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)  # type: ignore[no-any-return]

        return await call_async(self._retry, attempt)

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


class AzureUpload(S3Upload):
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
        return await call_async(self._retry, lambda: self._azure(method, body, **kwargs))

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


class TranslatingWriter:
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


def discard(f: Any) -> None:
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
