"""Sources: a stored payload fetched into an open, checked file, ready to be deserialized.

Owns :class:`Source` (an open file: a local checkpoint kept open where it was hashed, an
anonymous download spool, or an in-memory file), :func:`fetch` (behind
:meth:`Storage.fetch <lightning_ckpt.storage.Storage.fetch>`: open or spool a file while hashing
it, then check its size and digest against an :class:`Expected`), :func:`memory_file` (a memfd
on Linux, so torch can map decrypted plaintext) and the identity checks that tell a local file
changed under us. Must not decide *what* a file should be (the caller passes the expectation
and the hash function) nor unpickle anything: the bytes it returns are only checked bytes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_ckpt.digest import ChunkHasher
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError, StorageError
from lightning_ckpt.storage.base import CHUNK, Progress
from lightning_ckpt.storage.reads import open_regular, read_blocks
from lightning_ckpt.storage.retry import translate

__all__ = ["Expected", "Source", "fd_path", "fetch", "hash_file", "memory_budget", "memory_file", "stamp"]

if TYPE_CHECKING:
    from lightning_ckpt.storage.facade import Storage

#: ``hasher()`` -> an object with ``update(bytes)`` and ``hexdigest()`` (hashlib's interface)
Hasher = Callable[[], Any]


@dataclass(frozen=True)
class Expected:
    """What a fetched file must be: ``size`` bytes whose hex digest is ``digest`` (as recorded in
    the checkpoint's manifest)."""

    size: int
    digest: str
    #: the digest's algorithm, as named in messages (default: the hasher's ``name``)
    algorithm: str | None = None


@dataclass
class Source:
    """A payload ready for ``torch.load``: an open file (a local checkpoint, a download spool or
    decrypted plaintext) and, for a local file, its path and identity when it was hashed."""

    file: Any
    path: str | None = None
    stamp: tuple[int, ...] | None = None
    size: int = 0
    #: the check of a local file still being hashed in a worker thread (``fetch(..., overlap=True)``)
    pending: concurrent.futures.Future[None] | None = None

    def check(self) -> None:
        """Wait for a check still running (``overlap=True``); raise what it found."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        if self.pending is not None:  # the worker reads this descriptor: never close it under it
            with contextlib.suppress(Exception):
                self.pending.result()
            self.pending = None
        with contextlib.suppress(OSError):
            self.file.close()

    def fd_path(self) -> str | None:
        """A path naming exactly this open file (Linux ``/proc/self/fd``), if the OS has one."""
        return fd_path(self.file)

    def changed(self, by_descriptor: bool) -> bool:
        """Whether the local file hashed into this source is no longer the same (replaced or
        modified in place); checked on the open descriptor, or with ``by_descriptor=False`` by path."""
        if self.stamp is None:
            return False
        st = os.fstat(self.file.fileno()) if by_descriptor else os.stat(self.path)  # type: ignore[arg-type]
        return stamp(st) != self.stamp


def stamp(st: os.stat_result) -> tuple[int, ...]:
    """A file's identity and version: device, inode, size, modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def fd_path(f: Any) -> str | None:
    """A path naming exactly the open file ``f`` (Linux ``/proc/self/fd``), if the OS has one."""
    try:
        path = f"/proc/self/fd/{f.fileno()}"
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return path if os.path.exists(path) else None


#: where this process's control groups are listed, and where the cgroup filesystem is mounted
PROC_SELF_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"


def memory_budget() -> int:
    """The largest download held in memory rather than spooled to disk: half the memory the
    kernel reports available now (``MemAvailable``), or half the room left under this process's
    cgroup memory limit where that is less (a container: there ``MemAvailable`` is the host's,
    and a memfd beyond the limit ends the process); 0 where the kernel reports none (no memfd)."""
    available = 0
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    room = _cgroup_room()
    return (available if room is None else min(available, room)) // 2


def _cgroup_room() -> int | None:
    """Bytes left under the tightest cgroup memory limit of this process and its ancestors
    (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``), reclaimable page cache counted as
    free; None where no limit applies or nothing can be read."""
    try:
        with open(PROC_SELF_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    room: int | None = None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base, limit_file, usage_file, cache_key = CGROUP_ROOT, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            base = os.path.join(CGROUP_ROOT, "memory")
            limit_file, usage_file, cache_key = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
        else:
            continue
        parts = [p for p in path.split("/") if p and p != ".."]
        for depth in range(len(parts), -1, -1):
            group = os.path.join(base, *parts[:depth])
            left = _room_in(group, limit_file, usage_file, cache_key)
            if left is not None:
                room = left if room is None else min(room, left)
    return room


def _room_in(group: str, limit_file: str, usage_file: str, cache_key: str) -> int | None:
    try:
        with open(os.path.join(group, limit_file)) as f:
            text = f.read().strip()
        if text == "max" or int(text) >= 2**62:  # no limit (v1 writes "unlimited" as ~2^63)
            return None
        limit = int(text)
        with open(os.path.join(group, usage_file)) as f:
            usage = int(f.read().strip())
    except (OSError, ValueError):
        return None
    cache = 0
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(group, "memory.stat")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
                    break
    return max(0, limit - max(0, usage - cache))


def memory_file(label: str = "lckpt-plaintext") -> Any:
    """A growable in-memory file: a memfd (Linux, mappable by torch.load) or a BytesIO."""
    create = getattr(os, "memfd_create", None)
    if create is not None:
        with contextlib.suppress(OSError):
            f = os.fdopen(create(label, getattr(os, "MFD_CLOEXEC", 0)), "w+b")
            if fd_path(f) is not None:
                return f
            f.close()
    return io.BytesIO()


def hash_file(
    f: Any,
    digest: Any,
    limit: int | None,
    progress: Progress | None,
    translate: Callable[[BaseException], Exception],
    sink: Callable[[memoryview], Any] | None = None,
) -> int:
    """Read open file ``f`` in blocks into ``digest``/``sink`` (like :meth:`Storage.stream` for an
    open file); an OS error becomes ``translate(error)``."""

    def take(block: memoryview) -> None:
        if digest is not None:
            digest.update(block)
        if sink is not None:
            sink(block)

    try:
        return read_blocks(f, take, limit, progress)
    except OSError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise translate(exc) from exc


def fetch(
    storage: Storage,
    name: str,
    *,
    shown_as: str | None = None,
    expected: Expected | None = None,
    hasher: Hasher = hashlib.sha256,
    progress: Progress | None = None,
    spool_dir: str | None = None,
    overlap: bool = False,
    in_memory: bool = True,
) -> Source:
    """File ``name`` of ``storage`` as an open :class:`Source`, checked against ``expected``.

    ``in_memory=False`` always spools a download to disk (an encrypted payload: its plaintext
    is what goes to memory).

    With ``overlap=True`` a local file is returned at once, its size checked, while a worker
    thread hashes it: the caller must call :meth:`Source.check` before it trusts anything read
    from it (see the rule in :mod:`lightning_ckpt.digest`).

    A local file is hashed in place and kept open. A remote one is downloaded (ranged reads, several
    in flight) into memory -- a memfd that ``torch.load`` then maps, so the download is the only
    copy -- when ``expected.size`` is at most :func:`memory_budget`, else into an anonymous
    temporary spool file in ``spool_dir``; its ranges are hashed in a worker thread, in order,
    while the next ones download and are written. Messages name ``shown_as`` (the checkpoint's
    name) rather than ``name``. Without ``expected`` nothing is hashed or checked.
    """
    url = storage.url_of(shown_as or name)
    digest = hasher() if expected is not None else None
    limit = None if expected is None else expected.size
    if storage.is_local:
        try:
            source = _open_local(storage, name, url)
        except StorageError as exc:
            if expected is not None and isinstance(exc.__cause__, IsADirectoryError):
                raise CorruptCheckpointError(f"{url} is a directory, but its manifest describes a file") from None
            raise
        if overlap and expected is not None:
            return _hash_behind(source, digest, expected, url, progress)
        try:
            n = hash_file(source.file, digest, limit, progress, lambda exc: translate(exc, "read", url))
        except BaseException:
            source.close()
            raise
    else:
        source = _spool(storage, name, url, expected, spool_dir, in_memory)
        spool = source.file
        if digest is not None:
            digest = ChunkHasher(hasher)  # ranges arrive as bytes: hashed in a worker, in order

        def sink(block: memoryview) -> None:
            if digest is not None:
                digest.feed(block)
            try:
                spool.write(block)
            except OSError as exc:  # the local spool, not the storage, failed
                where = "memory" if source.path else spool_dir or tempfile.gettempdir()
                raise StorageError(exc.errno or errno.EIO, f"could not spool {url} to {where}: {exc}") from exc

        def restart() -> None:
            spool.seek(0)
            spool.truncate()
            if digest is not None:
                digest.reset()

        try:
            n = storage.stream(name, sink, limit=limit, restart=restart, progress=progress)
            spool.flush()
            if digest is not None:
                digest.result()
        except BaseException:
            if digest is not None:
                digest.close()
            source.close()
            raise
    source.size = n
    if expected is not None:
        try:
            _check(url, n, digest, expected)
        except BaseException:
            source.close()
            raise
    return source


def _hash_behind(source: Source, digest: Any, expected: Expected, url: str, progress: Progress | None) -> Source:
    """``source`` with its size checked now and its digest checked by a worker thread (``pending``).

    The worker reads with ``pread`` on the source's descriptor, so the caller may read or map
    the same file meanwhile; a file longer than expected is found too."""
    try:
        size = os.fstat(source.file.fileno()).st_size
    except OSError as exc:
        source.close()
        raise translate(exc, "read", url) from exc
    if size != expected.size:
        source.close()
        _check(url, size, None, expected)
    source.size = size
    fd = source.file.fileno()
    done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def work() -> None:
        try:
            block = bytearray(CHUNK)
            view, total = memoryview(block), 0
            while True:
                n = os.preadv(fd, [view], total)
                if n == 0:
                    break
                digest.update(view[:n])
                total += n
                if progress is not None:
                    progress(min(total, expected.size), expected.size)
            _check(url, total, digest, expected)
            done.set_result(None)
        except OSError as exc:
            done.set_exception(exc if isinstance(exc, CheckpointError) else translate(exc, "read", url))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the check
            done.set_exception(exc)

    threading.Thread(target=work, name="lckpt-verify", daemon=True).start()
    source.pending = done
    return source


def _check(url: str, n: int, digest: Any, expected: Expected) -> None:
    if n != expected.size:
        raise CorruptCheckpointError(
            f"{url} is {'longer' if n > expected.size else f'{n} bytes'}; its manifest says "
            f"{expected.size} bytes (truncated or overwritten)"
        )
    if digest.hexdigest() != expected.digest:
        algorithm = expected.algorithm or getattr(digest, "name", "")
        raise CorruptCheckpointError(f"{url} does not match the {algorithm} digest in its manifest (damaged)")


def _open_local(storage: Storage, name: str, url: str) -> Source:
    path = storage.path(name)
    try:
        f = open_regular(path)  # a FIFO or device named like a checkpoint is refused, never read
    except CorruptCheckpointError:
        raise CorruptCheckpointError(
            f"{url} is not a regular file (a FIFO, socket or device?); refusing to read it"
        ) from None
    except OSError as exc:
        raise translate(exc, "read", url) from exc
    try:
        st = os.fstat(f.fileno())
    except OSError as exc:
        f.close()
        raise translate(exc, "read", url) from exc
    return Source(file=f, path=path, stamp=stamp(st))


def _spool(storage: Storage, name: str, url: str, expected: Expected | None, spool_dir: str | None,
           in_memory: bool = True) -> Source:
    where = spool_dir or tempfile.gettempdir()
    if expected is not None:
        try:
            stored = storage.info(name).size
        except StorageError as exc:
            if isinstance(exc.__cause__, IsADirectoryError):
                raise CorruptCheckpointError(f"{url} is a directory, not a checkpoint file") from None
            raise
        if stored != expected.size:  # before downloading: a size claim must not fill a disk
            raise CorruptCheckpointError(
                f"{url} is {stored} bytes; its manifest says {expected.size} bytes (truncated or overwritten)"
            )
        if in_memory and expected.size <= memory_budget():
            memory = memory_file("lckpt-download")
            path = fd_path(memory)
            if path is not None:  # a memfd: torch maps it, the download stays the only copy
                return Source(file=memory, path=path)
            memory.close()
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = None
        if free is not None and free < expected.size:
            raise StorageError(
                errno.ENOSPC,
                f"cannot download {url} ({expected.size / 2**20:.0f} MiB) into {where}: only "
                f"{free / 2**20:.0f} MiB free (pass spool_dir= a larger local directory)",
            )
    try:
        # anonymous: unlinked at once where the OS allows, so even a SIGKILL leaves nothing behind
        spool = tempfile.TemporaryFile(prefix="lckpt-spool-", dir=spool_dir)  # noqa: SIM115
    except OSError as exc:
        raise StorageError(exc.errno or errno.EIO, f"cannot create a download spool file in {where}: {exc}") from exc
    return Source(file=spool)
