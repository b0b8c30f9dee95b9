"""Reads: opening, streaming and ranged downloading of stored files.

Owns :func:`open_regular` (a local file opened only if it is a regular file, so a FIFO or device
named like a checkpoint never hangs a reader) and :func:`stream_ranged` (an object store's file
as ranged GETs, several in flight, each retried on its own). Must not decide whether a payload is
the right one (the manager says what to expect) nor translate errors itself (the caller runs it
under :func:`lightning_ckpt.storage.retry.call`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import os
import stat
from collections.abc import Callable
from typing import IO, Any

from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.storage.base import CHUNK, Progress
from lightning_ckpt.storage.retry import RetryPolicy, call_async
from lightning_ckpt.storage.uploads import PARTS_IN_FLIGHT

__all__ = ["open_regular", "read_blocks", "readinto", "stream_ranged"]

#: ranged GETs of a download, PARTS_IN_FLIGHT at once
RANGE_SIZE = 8 * 2**20


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


def readinto(f: Any, view: memoryview) -> int:
    """Fill ``view`` from ``f`` (``readinto`` where the file has it); the number of bytes read."""
    if hasattr(f, "readinto"):
        return int(f.readinto(view) or 0)
    data = f.read(len(view))
    view[: len(data)] = data
    return len(data)


def stream_ranged(fs: Any, path: str, sink: Callable[[memoryview], None], limit: int | None,
                  progress: Progress | None, retry: RetryPolicy) -> int:
    """Ranged GETs of :data:`RANGE_SIZE`, :data:`PARTS_IN_FLIGHT` at once, handed on in order.

    Each range is retried on its own on transient errors, so a blip costs one range, not a
    restart; at most ``PARTS_IN_FLIGHT`` ranges are in memory.
    """
    from fsspec.asyn import sync

    fs.invalidate_cache(path)
    info = sync(fs.loop, fs._info, path)
    if info.get("type") == "directory":
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a checkpoint file")
    size = int(info.get("size") or 0)
    end = size if limit is None else min(size, limit)
    starts = list(range(0, end, RANGE_SIZE))
    pending: list[concurrent.futures.Future[bytes]] = []

    async def fetch(start: int) -> bytes:
        data = await fs._cat_file(path, start=start, end=min(start + RANGE_SIZE, end))
        if len(data) != min(RANGE_SIZE, end - start):  # replaced by a shorter object meanwhile
            raise OSError(errno.EIO, f"range at {start} came back with {len(data)} bytes")
        return bytes(data)

    done = 0
    try:
        for i in range(len(starts)):
            while len(pending) < PARTS_IN_FLIGHT and i + len(pending) < len(starts):
                request = functools.partial(fetch, starts[i + len(pending)])
                pending.append(asyncio.run_coroutine_threadsafe(call_async(retry, request), fs.loop))
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


def read_blocks(f: Any, sink: Callable[[memoryview], Any], limit: int | None = None,
                progress: Progress | None = None) -> int:
    """Read open file ``f`` from where it stands in blocks of :data:`CHUNK`, handing each to ``sink``.

    Returns the number of bytes read; with ``limit``, reads at most ``limit`` bytes and reports a
    longer file by returning ``limit + 1``. ``progress(bytes_read, limit)`` is called after every
    block. Blocks are views of one reused buffer: ``sink`` must copy what it keeps.
    """
    block = memoryview(bytearray(CHUNK))
    total = 0
    while limit is None or total < limit:
        want = CHUNK if limit is None else min(CHUNK, limit - total)
        n = readinto(f, block[:want])
        if n == 0:
            return total
        sink(block[:n])
        total += n
        if progress is not None:
            progress(total, limit)
    return total + 1 if f.read(1) else total
