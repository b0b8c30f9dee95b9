"""A fault-injecting fsspec filesystem for tests: ``faulty://`` over any other filesystem.

:class:`FaultyFileSystem` wraps a target filesystem (``target_protocol`` + ``target_options``,
or an instance as ``fs=``) and delegates every operation to it with the path unchanged:
``faulty:///tmp/x`` is ``/tmp/x`` on the local target, ``faulty://bucket/x`` is ``bucket/x``
(``/bucket/x``) on a memory target. With no faults it behaves like the target. Faults are
:class:`Fault` rules held by a :class:`FaultPlan`: raise an exception (``"error"``), write or
read only part of the data (``"short"``), block until the test releases it (``"hang"``), or
sleep (``"slow"``), for one kind of operation, on paths matching a glob, from the ``nth``
matching call for ``times`` calls. Every operation is recorded in ``plan.calls``.

Reaching the configured instance from code under test: fsspec caches instances by constructor
arguments *per thread* (for synchronous filesystems like this one), so
``fsspec.filesystem("faulty", **opts)`` and ``fsspec.core.url_to_fs("faulty://b/x", **opts)``
return the same instance in one thread but not across threads. Faults and calls therefore live
in the plan, not the instance: pass one ``plan=FaultPlan()`` in the storage options and every
instance built from those options, in any thread, shares it. Nothing is global: :func:`register`
adds the protocol to fsspec when a test asks for it, and there is no environment knob.

Ops (what a :class:`Fault` can target, and what ``calls`` records):

=============  ==========================================================================
``open_write``  ``open`` in a write/append mode (also ``touch``); ``pipe_file`` goes through
                ``open_write`` → ``write`` → ``close``
``open_read``   ``open`` in a read mode
``write``       each ``write()`` on a file opened for writing
``close``       ``close()`` of a file opened for writing: where the data is committed
``read``        each ``read()``/``readinto()``/``readline()`` of an open file, and ``cat_file``
``ls``          ``ls``, ``find``, ``glob``, ``walk``, ``du``
``info``        ``info``, ``exists``, ``isdir``, ``isfile``, ``size``, ``created``,
                ``modified``, ``checksum``, ``ukey``
``rm``          ``rm``, ``rm_file``, ``rmdir``
``mv``          ``mv`` (a fault's glob may match the source or the destination)
``copy``        ``cp_file``, ``copy`` (likewise)
``mkdir``       ``mkdir``, ``makedirs``
=============  ==========================================================================
"""

from __future__ import annotations

import copy
import errno
import fnmatch
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from fsspec.utils import stringify_path

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Call", "Fault", "FaultPlan", "FaultyFile", "FaultyFileSystem", "register"]

Op = Literal["open_write", "open_read", "write", "close", "read", "ls", "info", "rm", "mv", "copy", "mkdir"]
Kind = Literal["error", "short", "hang", "slow"]
OPS: frozenset[str] = frozenset(get_args(Op))
KINDS: frozenset[str] = frozenset(get_args(Kind))
_SHORT_OPS = frozenset({"write", "close", "read"})
_PROTOCOL = "faulty"


def register() -> None:
    """Make ``faulty://`` known to fsspec (idempotent; replaces an earlier registration)."""
    fsspec.register_implementation(_PROTOCOL, FaultyFileSystem, clobber=True)


class Call(NamedTuple):
    """One recorded operation: its op, its path, and for ``mv``/``copy`` the destination."""

    op: str
    path: str
    dest: str | None = None


@dataclass(eq=False)
class Fault:
    """One rule: make the ``nth`` (and the next ``times - 1``) matching ``op`` calls misbehave.

    - ``kind="error"``: raise ``exc`` (default ``OSError(EIO)``) before the operation happens.
      On ``close`` the target file is abandoned uncommitted (an s3fs upload is aborted; memory
      and local targets keep what was already written, as they would), unless ``commit=True``:
      then the data is committed first and the error raised after — an ambiguous commit.
    - ``kind="short"`` (``write``, ``read``, ``close``): keep ``data[:keep]`` (default: half).
      On ``write`` only that part reaches the target; on ``read``/``cat_file`` only that part is
      returned; on ``close`` the committed object is truncated to it. Silent unless ``exc`` is
      given, which is then raised afterwards.
    - ``kind="hang"``: set ``entered``, then block until ``release`` is set (the operation then
      proceeds, or raises ``exc`` if given) or ``timeout`` passes (``TimeoutError``).
    - ``kind="slow"``: ``sleep(delay)``, then proceed. ``sleep`` is :func:`time.sleep` unless the
      test passes a fake clock's advance, so "this write took 5 s" needs no real waiting.

    ``path`` is an ``fnmatch`` glob over the ``faulty`` path (``*`` also matches ``/``).
    ``times=None`` means every matching call from the ``nth`` on.
    """

    op: Op
    kind: Kind = "error"
    path: str = "*"
    nth: int = 1
    times: int | None = 1
    exc: BaseException | None = None
    keep: int | None = None
    commit: bool = False
    delay: float = 0.0
    sleep: Callable[[float], Any] = time.sleep
    timeout: float = 30.0
    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {sorted(OPS)}, not {self.op!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, not {self.kind!r}")
        if self.kind == "short" and self.op not in _SHORT_OPS:
            raise ValueError(f"kind='short' applies to {sorted(_SHORT_OPS)}, not {self.op!r}")
        if self.nth < 1 or (self.times is not None and self.times < 1):
            raise ValueError("nth and times count from 1 (times=None: no limit)")
        if self.exc is not None and not isinstance(self.exc, BaseException):
            raise TypeError("exc must be an exception instance, e.g. OSError(errno.ENOSPC, '...')")
        if self.kind == "slow" and (self.delay <= 0 or self.exc is not None):
            raise ValueError("kind='slow' needs delay > 0 and takes no exc")
        if self.commit and (self.op != "close" or self.kind != "error"):
            raise ValueError("commit=True applies to op='close', kind='error' only")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")

    def matches(self, op: str, *paths: str) -> bool:
        """Whether a call of ``op`` on any of ``paths`` is one this rule counts."""
        return op == self.op and any(fnmatch.fnmatchcase(p, self.path) for p in paths if p)

    def error(self) -> BaseException:
        """A fresh copy of the exception to raise (the same instance raised twice would chain)."""
        exc = self.exc if self.exc is not None else OSError(errno.EIO, f"injected {self.op} fault")
        try:
            return copy.copy(exc)
        except TypeError:  # an exception class whose constructor copy cannot replay
            return exc

    def cut(self, data: Any) -> Any:
        """``data[:keep]``, half of it when ``keep`` is None."""
        return data[: len(data) // 2 if self.keep is None else self.keep]


class FaultPlan:
    """The faults and the call log shared by every :class:`FaultyFileSystem` built with it.

    Deliberately shared, not copied: ``copy.deepcopy`` of storage options keeps the same plan.
    """

    def __init__(self, *faults: Fault) -> None:
        self._lock = threading.Lock()
        self.faults: list[Fault] = list(faults)
        self.calls: list[Call] = []

    def __repr__(self) -> str:
        # fsspec builds its instance-cache key from repr(): it must differ between plans and
        # stay the same while faults and calls are added.
        return f"<FaultPlan at {id(self):#x}>"

    def __copy__(self) -> FaultPlan:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FaultPlan:
        return self

    def add(self, fault: Fault) -> Fault:
        """Add a rule; return it, so the test can ``release`` a hang or read ``fired``."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Drop every fault and every recorded call."""
        with self._lock:
            self.faults.clear()
            self.calls.clear()

    def count(self, op: str, path: str = "*") -> int:
        """How many ``op`` calls were made on paths (or destinations) matching the glob."""
        with self._lock:
            calls = list(self.calls)
        return sum(
            1
            for c in calls
            if c.op == op and any(fnmatch.fnmatchcase(p, path) for p in (c.path, c.dest) if p)
        )

    def apply(
        self,
        op: str,
        path: str,
        dest: str | None = None,
        on_raise: Callable[[Fault], None] | None = None,
    ) -> Fault | None:
        """Record the call and carry out the faults that fire on it.

        Sleeps for ``slow``, blocks for ``hang``, raises for ``error`` (calling ``on_raise`` with
        the fault first); returns a firing ``short`` fault for the caller to apply (it knows the
        data), else None.
        """
        with self._lock:
            self.calls.append(Call(op, path, dest))
            firing = []
            for fault in self.faults:
                if not fault.matches(op, path, dest or ""):
                    continue
                fault.seen += 1
                if fault.seen >= fault.nth and (fault.times is None or fault.fired < fault.times):
                    fault.fired += 1
                    firing.append(fault)
        short: Fault | None = None
        for fault in firing:  # outside the lock: a hang must not block other threads' calls
            if fault.kind == "slow":
                fault.sleep(fault.delay)
            elif fault.kind == "hang":
                fault.entered.set()
                released = fault.release.wait(fault.timeout)
                if not released or fault.exc is not None:
                    if on_raise is not None:
                        on_raise(fault)
                    if not released:
                        raise TimeoutError(f"hang fault on {op} {path!r} not released in {fault.timeout} s")
                    raise fault.error()
            elif fault.kind == "error":
                if on_raise is not None:
                    on_raise(fault)
                raise fault.error()
            else:
                short = fault
        return short


class FaultyFile:
    """A file of the target filesystem with faults injected into write/read/close.

    Everything not intercepted (``seek``, ``tell``, attributes such as ``size``) goes straight
    to the target file. Not an ``io.IOBase``: no ``__del__`` that would close — and so commit,
    or fire a close fault — at garbage collection.
    """

    def __init__(self, fs: FaultyFileSystem, path: str, target_path: str, mode: str, f: Any) -> None:
        self.fs = fs
        self.path = path
        self.target_path = target_path
        self.mode = mode
        self.target_file = f
        self._writing = any(c in mode for c in "wax+")
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        if name == "target_file":  # not set yet (copy/unpickle): no endless recursion
            raise AttributeError(name)
        return getattr(self.target_file, name)

    def __repr__(self) -> str:
        return f"<FaultyFile {self.path!r} mode={self.mode!r} over {self.target_file!r}>"

    @property
    def closed(self) -> bool:
        return self._closed or bool(getattr(self.target_file, "closed", False))

    def readable(self) -> bool:
        return bool(self.target_file.readable())

    def writable(self) -> bool:
        return bool(self.target_file.writable())

    def seekable(self) -> bool:
        return bool(self.target_file.seekable())

    def write(self, data: Any) -> int:
        short = self.fs.plan.apply("write", self.path)
        if short is None:
            return int(self.target_file.write(data))
        self.target_file.write(short.cut(data))
        if short.exc is not None:
            raise short.error()
        return len(data)  # a silent short write claims it wrote everything

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def read(self, size: int = -1) -> Any:
        short = self.fs.plan.apply("read", self.path)
        data = self.target_file.read(size)
        return data if short is None else self._short_read(short, data)

    def read1(self, size: int = -1) -> Any:
        return self.read(size)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readline(self, size: int = -1) -> Any:
        short = self.fs.plan.apply("read", self.path)
        data = self.target_file.readline(size)
        return data if short is None else self._short_read(short, data)

    def __iter__(self) -> Iterator[Any]:
        while line := self.readline():
            yield line

    def flush(self) -> None:
        self.target_file.flush()

    def close(self) -> None:
        """Close, committing the data; a ``close`` fault fires here (writes only)."""
        if self._closed:
            return
        if not self._writing:
            self._closed = True
            self.target_file.close()
            return
        short = self.fs.plan.apply("close", self.path, on_raise=self._fail_close)
        self._closed = True
        self.target_file.close()
        if short is not None:
            target = self.fs.target
            target.pipe_file(self.target_path, short.cut(target.cat_file(self.target_path)))
            if short.exc is not None:
                raise short.error()

    def discard(self) -> None:
        """Abandon the file without committing, as far as the target allows."""
        self._closed = True
        _abandon(self.target_file)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _short_read(self, fault: Fault, data: Any) -> Any:
        data = fault.cut(data)
        if fault.exc is not None:
            raise fault.error()
        return data

    def _fail_close(self, fault: Fault) -> None:
        self._closed = True
        if fault.commit:
            self.target_file.close()  # the data lands, yet the caller sees an error
        else:
            _abandon(self.target_file)


def _abandon(f: Any) -> None:
    """Release a target file without committing where the target has uncommitted data at all."""
    if isinstance(f, AbstractBufferedFile):  # s3fs and friends: abort the upload
        f.discard()
        f.closed = True  # else its __del__ would try to commit again
    else:  # memory and local (autocommit) files: the written bytes are already in place
        f.close()


class FaultyFileSystem(AbstractFileSystem):
    """``faulty://`` — the target filesystem, with the faults of :attr:`plan` injected.

    ``fsspec.filesystem("faulty", target_protocol="memory", plan=plan, name="t1")``; see the
    module docstring for why faults live in a shared :class:`FaultPlan`.
    """

    protocol = _PROTOCOL
    root_marker = ""

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        fs: AbstractFileSystem | None = None,
        plan: FaultPlan | None = None,
        name: str | None = None,
        **storage_options: Any,
    ) -> None:
        """Wrap ``fs``, or a filesystem built from ``target_protocol`` and ``target_options``.

        ``plan`` holds the faults and calls (a new, private one when omitted); ``name`` only
        keeps instances apart in fsspec's cache and in ``repr``.
        """
        super().__init__(**storage_options)
        if (fs is None) == (target_protocol is None):
            raise ValueError("give exactly one of target_protocol= and fs=")
        if target_protocol == _PROTOCOL:
            raise ValueError("a faulty filesystem cannot wrap another faulty filesystem")
        self.target: AbstractFileSystem = (
            fs if fs is not None else fsspec.filesystem(target_protocol, **(target_options or {}))
        )
        self.plan = plan if plan is not None else FaultPlan()
        self.name = name

    def __repr__(self) -> str:
        return f"<FaultyFileSystem {self.name or ''} over {type(self.target).__name__}, {self.plan!r}>"

    # ------------------------------------------------------------------ faults and calls
    @property
    def faults(self) -> list[Fault]:
        """The plan's fault rules (shared by every instance built with the same plan)."""
        return self.plan.faults

    @property
    def calls(self) -> list[Call]:
        """Every operation so far, in order, as :class:`Call` ``(op, path, dest)``."""
        return self.plan.calls

    def add_fault(self, fault: Fault) -> Fault:
        """Add a rule to the plan and return it."""
        return self.plan.add(fault)

    def count(self, op: str, path: str = "*") -> int:
        """How many ``op`` calls hit paths matching the glob."""
        return self.plan.count(op, path)

    # ------------------------------------------------------------------------- paths
    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, (list, tuple)):
            return [cls._strip_protocol(p) for p in path]
        path = stringify_path(path)
        if path.startswith(f"{_PROTOCOL}://"):
            path = path[len(_PROTOCOL) + 3 :]
        elif path.startswith(f"{_PROTOCOL}::"):
            path = path[len(_PROTOCOL) + 2 :]
        stripped = path.rstrip("/")
        return stripped or ("/" if path.startswith("/") else "")

    def _to_target(self, path: str) -> str:
        return str(self.target._strip_protocol(self._strip_protocol(path)))

    def _mapper(self, path: str) -> Any:
        """Map the target's names back to the caller's spelling of ``path``.

        A target may normalise paths (memory adds a leading ``/``, local makes a relative path
        absolute); whatever prefix it added to ``path`` is removed from the names it returns, so
        ``ls("bucket/x")`` on a memory target lists ``bucket/x/a``, not ``/bucket/x/a``.
        """
        given = self._strip_protocol(path)
        target = self._to_target(path)
        prefix = target[: len(target) - len(given)] if given and target.endswith(given) else ""

        def back(name: str) -> str:
            return name[len(prefix) :] if prefix and name.startswith(prefix) else name

        return back

    def _map_info(self, info: dict[str, Any], back: Any) -> dict[str, Any]:
        return {**info, "name": back(info["name"])}

    def _map_listing(self, out: Any, back: Any) -> Any:
        if isinstance(out, dict):
            return {back(k): self._map_info(v, back) for k, v in out.items()}
        return [self._map_info(e, back) if isinstance(e, dict) else back(e) for e in out]

    # ----------------------------------------------------------------------- reading
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self.plan.apply("ls", self._strip_protocol(path))
        out = self.target.ls(self._to_target(path), detail=detail, **kwargs)
        return self._map_listing(out, self._mapper(path))

    def find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self.plan.apply("ls", self._strip_protocol(path))
        out = self.target.find(self._to_target(path), *args, **kwargs)
        return self._map_listing(out, self._mapper(path))

    def glob(self, path: str, **kwargs: Any) -> Any:
        self.plan.apply("ls", self._strip_protocol(path))
        out = self.target.glob(self._to_target(path), **kwargs)
        return self._map_listing(out, self._mapper(path))

    def walk(self, path: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        self.plan.apply("ls", self._strip_protocol(path))
        back = self._mapper(path)
        for root, dirs, files in self.target.walk(self._to_target(path), *args, **kwargs):
            if isinstance(dirs, dict):
                dirs = {k: self._map_info(v, back) for k, v in dirs.items()}
                files = {k: self._map_info(v, back) for k, v in files.items()}
            yield back(root), dirs, files

    def du(self, path: str, total: bool = True, **kwargs: Any) -> Any:
        self.plan.apply("ls", self._strip_protocol(path))
        out = self.target.du(self._to_target(path), total=total, **kwargs)
        if total:
            return out
        back = self._mapper(path)
        return {back(k): v for k, v in out.items()}

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        self.plan.apply("info", self._strip_protocol(path))
        return self._map_info(self.target.info(self._to_target(path), **kwargs), self._mapper(path))

    def exists(self, path: str, **kwargs: Any) -> bool:
        # A fault here raises: "cannot tell" must not read as "absent".
        self.plan.apply("info", self._strip_protocol(path))
        return bool(self.target.exists(self._to_target(path), **kwargs))

    def isdir(self, path: str) -> bool:
        self.plan.apply("info", self._strip_protocol(path))
        return bool(self.target.isdir(self._to_target(path)))

    def isfile(self, path: str) -> bool:
        self.plan.apply("info", self._strip_protocol(path))
        return bool(self.target.isfile(self._to_target(path)))

    def size(self, path: str) -> int | None:
        self.plan.apply("info", self._strip_protocol(path))
        size = self.target.size(self._to_target(path))
        return None if size is None else int(size)

    def created(self, path: str) -> Any:
        self.plan.apply("info", self._strip_protocol(path))
        return self.target.created(self._to_target(path))

    def modified(self, path: str) -> Any:
        self.plan.apply("info", self._strip_protocol(path))
        return self.target.modified(self._to_target(path))

    def checksum(self, path: str) -> int:
        self.plan.apply("info", self._strip_protocol(path))
        return int(self.target.checksum(self._to_target(path)))

    def ukey(self, path: str) -> str:
        self.plan.apply("info", self._strip_protocol(path))
        return str(self.target.ukey(self._to_target(path)))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        short = self.plan.apply("read", self._strip_protocol(path))
        data = self.target.cat_file(self._to_target(path), start=start, end=end, **kwargs)
        if short is None:
            return bytes(data)
        data = short.cut(data)
        if short.exc is not None:
            raise short.error()
        return bytes(data)

    # -------------------------------------------------------------------- open/write
    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> FaultyFile:
        """Open on the target (text modes and ``compression`` included) and wrap the file."""
        fpath = self._strip_protocol(path)
        writing = any(c in mode for c in "wax+")
        self.plan.apply("open_write" if writing else "open_read", fpath)
        tpath = self._to_target(path)
        return FaultyFile(self, fpath, tpath, mode, self.target.open(tpath, mode, **kwargs))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> FaultyFile:
        return self.open(path, mode, **kwargs)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        """Write through :meth:`open`, so ``open_write``/``write``/``close`` faults apply."""
        with self.open(path, "xb" if mode == "create" else "wb", **kwargs) as f:
            f.write(value)

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        self.plan.apply("open_write", self._strip_protocol(path))
        self.target.touch(self._to_target(path), truncate=truncate, **kwargs)

    # --------------------------------------------------------------- namespace changes
    def mkdir(self, path: str, *args: Any, **kwargs: Any) -> None:
        self.plan.apply("mkdir", self._strip_protocol(path))
        self.target.mkdir(self._to_target(path), *args, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.plan.apply("mkdir", self._strip_protocol(path))
        self.target.makedirs(self._to_target(path), exist_ok=exist_ok)

    def rm_file(self, path: str) -> None:
        self.plan.apply("rm", self._strip_protocol(path))
        self.target.rm_file(self._to_target(path))

    def rm(self, path: Any, *args: Any, **kwargs: Any) -> None:
        paths = [path] if isinstance(path, str) else list(path)
        for p in paths:
            self.plan.apply("rm", self._strip_protocol(p))
        targets = [self._to_target(p) for p in paths]
        self.target.rm(targets[0] if isinstance(path, str) else targets, *args, **kwargs)

    def rmdir(self, path: str) -> None:
        self.plan.apply("rm", self._strip_protocol(path))
        self.target.rmdir(self._to_target(path))

    def mv(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> None:
        self.plan.apply("mv", self._strip_protocol(path1), self._strip_protocol(path2))
        self.target.mv(self._to_target(path1), self._to_target(path2), *args, **kwargs)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        self.plan.apply("copy", self._strip_protocol(path1), self._strip_protocol(path2))
        self.target.cp_file(self._to_target(path1), self._to_target(path2), **kwargs)

    def copy(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> None:
        self.plan.apply("copy", self._strip_protocol(path1), self._strip_protocol(path2))
        self.target.copy(self._to_target(path1), self._to_target(path2), *args, **kwargs)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(None if path is None else self._to_target(path))
