"""Incremental saves: a tensor whose bytes a committed checkpoint of the directory already holds is
referenced, not written again; every checkpoint stays complete.

:class:`Incremental` belongs to one training run (the callback keeps one). For each save it makes
an :class:`IncrementalSave`: :meth:`Incremental.prepare` runs on the caller's thread before any
copy, :meth:`IncrementalSave.write` runs inside :meth:`CheckpointManager.save` after the save's
marker is written, and :meth:`IncrementalSave.committed` after the commit.

Which tensors become pieces: plain strided tensors of at least ``min_bytes`` (default 64 KiB)
that own their whole storage, reached through dicts, ``OrderedDict``\\ s, lists and tuples, whose
storage no other tensor of the state shares (tied weights stay inline, so their sharing survives).
Everything else stays in the payload.

The rule for "unchanged" (the shortcut): a tensor is taken as unchanged since the last committed
save of this run -- no device-to-host copy, no hash -- only when it is the same storage (we hold a
reference to it, so its memory cannot have been reused), with the same dtype, shape and device,
and its version counter (``Tensor._version``, bumped by every in-place operation autograd sees,
also under ``no_grad``) has not moved, and its piece is still referenced by a committed checkpoint
when the save runs. Writes the version counter does not see (through ``.data``, through numpy or
DLPack views, by custom kernels, in ``inference_mode``) would fool it, so it is never trusted
alone: every tensor is hashed again (a content hash, then written only if its bytes are new) after
at most ``confirm_every`` shortcut saves (staggered, so each save confirms about
1/``confirm_every`` of them), and on every save where the cache has no entry (the first save of a
process, after a resume). A confirmation reads the live tensor inside the save (in the background
thread with ``async_save``: still no snapshot copy). A tensor it finds changed is hashed on every
save from then on, with a warning; a synchronous save writes its new bytes, a background one
fails (its bytes at the snapshot are unknown) and the next save writes them.

A pack lives while any of its pieces is referenced; pieces that outlive the pack they were
written into (a frozen layer in the first save's pack of mostly trained tensors) are copied once
into a pack of their own, so dead bytes do not pile up (:meth:`IncrementalSave._compact`).

Owns: choosing pieces, the shortcut cache, splitting a state into payload + pieces, and joining
them on load. Must not: touch storage beyond :mod:`lightning_ckpt.pieces` and the manager's
``Storage``, decide commit order (the manager does), or import Lightning.
"""

from __future__ import annotations

import io
import logging
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lightning_ckpt import layout, pieces
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
)
from lightning_ckpt.pieces import PieceRef, PieceTable
from lightning_ckpt.tensors import is_dense

if TYPE_CHECKING:
    from lightning_ckpt.security import Encryptor
    from lightning_ckpt.storage import Storage

__all__ = ["Incremental", "IncrementalSave", "join", "plan"]

log = logging.getLogger("lightning_ckpt")

Path = tuple[Any, ...]
_CONTAINERS = (dict, OrderedDict, list, tuple)


@dataclass
class _Seen:
    """What the shortcut knows about the tensor at one path after a committed save."""

    tensor: torch.Tensor  # held: its storage cannot be freed and its address reused
    ptr: int
    version: int
    key: tuple[Any, ...]
    ref: PieceRef
    age: int = 0
    untrusted: bool = False


class _Reuse:
    """Stands for a tensor the shortcut found unchanged: its piece, and the live tensor as a
    fallback. Copied as itself (the async snapshot must not copy the tensor)."""

    __slots__ = ("confirm", "live", "ref", "version")

    def __init__(self, ref: PieceRef, live: torch.Tensor, version: int, confirm: bool = False) -> None:
        self.ref, self.live, self.version, self.confirm = ref, live, version, confirm

    def __deepcopy__(self, memo: dict[int, Any]) -> _Reuse:
        return self


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.dtype, tuple(t.shape), str(t.device))


class Incremental:
    """Incremental saves for one run. Pass it as ``CheckpointManager.save(..., incremental=inc)``.

    Args:
        min_bytes: tensors smaller than this stay inside the payload.
        confirm_every: a tensor the shortcut found unchanged is hashed again after at most this
            many saves (see the module docstring); 1 hashes every tensor on every save.
    """

    def __init__(self, min_bytes: int = 64 * 1024, confirm_every: int = 10) -> None:
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 1:
            raise ConfigurationError(f"Incremental(min_bytes={min_bytes!r}) must be a positive number of bytes")
        if isinstance(confirm_every, bool) or not isinstance(confirm_every, int) or confirm_every < 1:
            raise ConfigurationError(f"Incremental(confirm_every={confirm_every!r}) must be a positive integer")
        self.min_bytes = min_bytes
        self.confirm_every = confirm_every
        self._seen: dict[Path, _Seen] = {}
        self._untrusted: set[Path] = set()

    def __deepcopy__(self, memo: dict[int, Any]) -> Incremental:
        return self  # a run's cache is one object (the async saver deep-copies save arguments)

    def __repr__(self) -> str:
        return f"Incremental(min_bytes={self.min_bytes}, confirm_every={self.confirm_every})"

    def reset(self) -> None:
        """Forget the shortcut cache: the next save hashes every tensor."""
        self._seen.clear()

    def prepare(self, state: Any) -> IncrementalSave:
        """Plan one save of ``state`` (the caller's live state; call before copying it)."""
        job = IncrementalSave(self)
        shared = _shared_storages(state)
        job.state = _rebuild(state, (), {}, lambda t, path: self._visit(job, t, path, shared))
        return job

    def _visit(self, job: IncrementalSave, t: torch.Tensor, path: Path, shared: set[tuple[str, int]]) -> Any:
        if id(t) in job.memo:  # one tensor at two places stays one object
            return job.memo[id(t)]
        job.memo[id(t)] = out = self._plan(job, t, path, shared)
        return out

    def _plan(self, job: IncrementalSave, t: torch.Tensor, path: Path, shared: set[tuple[str, int]]) -> Any:
        if not self._candidate(t) or (str(t.device), t.untyped_storage().data_ptr()) in shared:
            return t
        version = t._version
        job.live[path] = (t, t.untyped_storage().data_ptr(), version, _key(t))
        seen = self._seen.get(path)
        if (
            seen is not None
            and not seen.untrusted
            and path not in self._untrusted
            and seen.ptr == t.untyped_storage().data_ptr()
            and seen.version == version
            and seen.key == _key(t)
        ):
            job.reused[path] = seen.ref
            # due for confirmation: hashed by the save itself (in the background with async_save),
            # still without a copy into the snapshot
            return _Reuse(seen.ref, t, version, confirm=seen.age + 1 >= self.confirm_every)
        return t

    def _candidate(self, t: torch.Tensor) -> bool:
        return (
            type(t) is torch.Tensor
            and is_dense(t)
            and not t.is_inference()
            and t.is_contiguous()
            and t.storage_offset() == 0
            and t.numel() * t.element_size() >= self.min_bytes
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        )

    def _committed(self, job: IncrementalSave) -> None:
        seen: dict[Path, _Seen] = {}
        for path, (tensor, ptr, version, key) in job.live.items():
            ref = job.refs_by_path.get(path)
            if ref is None:
                continue
            old = self._seen.get(path)
            if path in job.confirmed:
                age = 0
            elif path in job.reused:
                age = (old.age + 1) if old is not None else 0
            elif old is not None and old.ptr == ptr and old.version == version and old.key == key:
                # a confirmation: the shortcut would have said "unchanged"
                if old.ref.id != ref.id and path not in self._untrusted:
                    self._untrusted.add(path)
                    warnings.warn(
                        f"the tensor at {_show(path)} changed without its version counter moving (a write "
                        "through .data, numpy or a custom kernel?); it is hashed on every save from now on",
                        CheckpointWarning,
                        stacklevel=2,
                    )
                age = 0
            else:
                # staggered, so each save confirms about 1/confirm_every of the shortcut tensors
                age = zlib.crc32(repr(path).encode()) % self.confirm_every
            seen[path] = _Seen(tensor, ptr, version, key, ref, age, path in self._untrusted)
        self._seen = seen


@dataclass
class IncrementalSave:
    """One save planned by :meth:`Incremental.prepare`."""

    owner: Incremental
    state: Any = None
    #: path -> (the live tensor, its storage address, version, key) at prepare time
    live: dict[Path, tuple[torch.Tensor, int, int, tuple[Any, ...]]] = field(default_factory=dict)
    reused: dict[Path, PieceRef] = field(default_factory=dict)
    #: paths the shortcut took as unchanged whose bytes this save hashed again (and found equal)
    confirmed: set[Path] = field(default_factory=set)
    #: whether the state handed to :meth:`write` is the caller's live state (a synchronous save)
    live_state: bool = False
    refs_by_path: dict[Path, PieceRef] = field(default_factory=dict)
    table: PieceTable | None = None
    #: bytes of pieces this save wrote, and of pieces it referenced without writing
    written: int = 0
    shared: int = 0
    pack: str | None = None
    pack_name: str = ""
    memo: dict[int, Any] = field(default_factory=dict, repr=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> IncrementalSave:
        return self

    def write(self, storage: Storage, state: Any, token: str, committed_manifests: list[Any],
              encryptor: Encryptor | None, stale_after: float) -> Any:
        """Write this save's new pieces into one pack file; return the payload (placeholders in
        place of pieces). ``state`` is ``self.state`` or the async saver's copy of it."""
        pieces.wait_for_collectors(storage, stale_after)
        sizes = {f.name: f.size for f in storage.list()}
        files = set(sizes)
        encryption = encryptor.describe() if encryptor is not None else None
        known = pieces.index(committed_manifests, files, encryption)
        id_key = _id_key(encryptor)
        refs: list[PieceRef | None] = []
        pack = self.pack_name = pieces.pack_name(token)
        writer = _PackWriter(storage, pack)
        placeholders: dict[int, Any] = {}

        def visit(t: Any, path: Path) -> Any:
            if id(t) in placeholders:
                return placeholders[id(t)]
            placeholders[id(t)] = out = place(t, path)
            return out

        def place(t: Any, path: Path) -> Any:
            if isinstance(t, _Reuse) and t.confirm and (self.live_state or t.live._version == t.version):
                ref = self._confirm(t, path, id_key, known, writer, encryptor)
                self.refs_by_path[path] = ref
                refs.append(ref)
                return torch.empty(t.live.shape, dtype=t.live.dtype, device="meta")
            if isinstance(t, _Reuse):
                ref = known.get(t.ref.id)
                if ref is None:
                    if t.live._version != t.version:
                        raise CheckpointError(
                            f"the piece of {_show(path)} is gone from the directory (deleted by another process?) and "
                            "the tensor changed since the save began; the save did not commit")
                    ref = self._store(t.live, path, id_key, known, writer, encryptor)
                else:
                    self.shared += ref.size
                meta = torch.empty(t.live.shape, dtype=t.live.dtype, device="meta")
                self.refs_by_path[path] = ref
                refs.append(ref)
                return meta
            if not isinstance(t, torch.Tensor):
                return t
            if t.device.type == "meta":
                refs.append(None)  # the state's own meta tensor: a placeholder with no piece
                return t
            if path not in self.live:
                return t
            ref = self._store(t, path, id_key, known, writer, encryptor)
            self.refs_by_path[path] = ref
            refs.append(ref)
            return torch.empty(t.shape, dtype=t.dtype, device="meta")

        stable = _PackWriter(storage, pieces.pack_name(layout.new_token()))
        try:
            payload = _rebuild(state, (), {}, visit, reuse=True)
            moved = self._compact(storage, refs, sizes, stable, str(storage.url))
            writer.close()
            stable.close()
        except BaseException:
            writer.abort()
            stable.abort()
            raise
        self.pack = pack if writer.size else None  # (and the stable pack, if it moved pieces)
        self.table = PieceTable(tuple(moved.get(r, r) if r is not None else None for r in refs), encryption)
        self.refs_by_path = {p: moved.get(r, r) for p, r in self.refs_by_path.items()}
        return payload

    def _compact(self, storage: Storage, refs: list[PieceRef | None], sizes: dict[str, int], writer: _PackWriter,
                 where: str) -> dict[PieceRef, PieceRef]:
        """Copy forward the pieces this save references in packs it would keep mostly for dead
        bytes: a pack lives while any of its pieces is referenced, so one whose pieces this save
        uses make up less than half of it is left to age out with the older checkpoints, and its
        pieces still in use move into ``writer``, a pack of pieces that outlived a save (read
        back, digest checked, copied as stored: ciphertext stays ciphertext). Such a pack is then
        fully used by the next save, so a piece moves once, not at every save."""
        used: dict[str, dict[tuple[int, int], PieceRef]] = {}
        for ref in refs:
            if ref is not None and ref.file != self.pack_name:
                used.setdefault(ref.file, {})[(ref.offset, ref.size)] = ref
        moved: dict[PieceRef, PieceRef] = {}
        for file, distinct in used.items():
            if 2 * sum(size for _, size in distinct) >= sizes.get(file, 0):
                continue
            for ref in distinct.values():
                data = pieces.read_piece(storage, ref, where)
                moved[ref] = PieceRef(ref.id, writer.name, writer.write(data), ref.size, ref.digest, ref.device)
                self.written += ref.size
                self.shared -= ref.size
        if moved:  # a piece referenced twice moves once
            for ref in refs:
                if ref is not None and ref not in moved and ref.file in used:
                    twin = next((m for o, m in moved.items() if (o.file, o.offset) == (ref.file, ref.offset)), None)
                    if twin is not None:
                        moved[ref] = twin
        return moved

    def _confirm(self, t: _Reuse, path: Path, id_key: bytes | None, known: dict[str, PieceRef],
                 writer: _PackWriter, encryptor: Encryptor | None) -> PieceRef:
        """Hash a tensor the shortcut took as unchanged; store it if it did change after all."""
        ref = self._store(t.live, path, id_key, known, writer, encryptor)
        if ref.id == t.ref.id:
            self.confirmed.add(path)
            return ref
        self.owner._untrusted.add(path)  # hashed (from the snapshot) at every save from now on
        warnings.warn(
            f"the tensor at {_show(path)} changed without its version counter moving (a write through .data, "
            "numpy or a custom kernel?); it is hashed on every save from now on", CheckpointWarning, stacklevel=2)
        if not self.live_state:
            # a background save: the bytes at the snapshot are unknown, so this checkpoint cannot be exact
            raise CheckpointError(f"the tensor at {_show(path)} changed without its version counter moving; this "
                                  "save did not commit (the next one writes it)")
        return ref

    def _store(self, t: torch.Tensor, path: Path, id_key: bytes | None, known: dict[str, PieceRef],
               writer: _PackWriter, encryptor: Encryptor | None) -> PieceRef:
        import blake3

        data = _bytes(t)
        hasher = blake3.blake3(key=id_key, max_threads=blake3.blake3.AUTO) if id_key else \
            blake3.blake3(max_threads=blake3.blake3.AUTO)
        hasher.update(data)
        pid = hasher.hexdigest()
        ref = known.get(pid)
        if ref is not None:
            self.shared += ref.size
            return ref
        if encryptor is not None:
            sink = io.BytesIO()
            stream = encryptor.writer(sink)  # type: ignore[arg-type]
            stream.write(data)
            stream.close()
            stored: Any = sink.getbuffer()
            digest = pieces.digest(stored)
        else:
            stored, digest = data, pid
        offset = writer.write(stored)
        ref = PieceRef(pid, writer.name, offset, len(stored), digest, str(t.device))
        known[pid] = ref  # a second tensor with the same bytes in this save shares it
        self.written += len(stored)
        return ref

    def manifest_fields(self) -> dict[str, Any]:
        """What the manifest records: the piece table, and the format that readers must know."""
        from lightning_ckpt.integrity import INCREMENTAL_FORMAT_VERSION

        if self.table is None or not self.table.refs:
            return {}
        return {"pieces": self.table.to_json(), "format_version": INCREMENTAL_FORMAT_VERSION}

    def committed(self) -> None:
        """The save committed: remember what the next save may take as unchanged."""
        self.owner._committed(self)


class _PackWriter:
    """The pack file of one save, opened on its first piece."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.name = storage, name
        self.size = 0
        self._cm: Any = None
        self._f: Any = None

    def write(self, data: Any) -> int:
        if self._f is None:
            self._cm = self.storage.open_write(self.name)
            self._f = self._cm.__enter__()
        offset = self.size
        view = memoryview(data).cast("B")
        for start in range(0, len(view), 8 * 2**20):
            self._f.write(view[start:start + 8 * 2**20])
        self.size += len(view)
        return offset

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm, self._f = self._cm, None, None
            cm.__exit__(None, None, None)

    def abort(self) -> None:
        if self._cm is not None:
            cm, self._cm, self._f = self._cm, None, None
            try:
                cm.__exit__(CheckpointError, CheckpointError("aborted"), None)
            except CheckpointError:
                pass
        try:
            self.storage.delete(self.name)
        except CheckpointError as exc:  # the collector removes it later
            log.warning("could not remove %s after a failed save (%s)", self.name, exc)


def plan(incremental: Incremental | IncrementalSave, state: Any) -> tuple[IncrementalSave, Any]:
    """The save of ``state``: planned now for an :class:`Incremental`, or one a caller planned
    (then ``state`` is its state, or the async saver's copy of it)."""
    if isinstance(incremental, Incremental):
        job = incremental.prepare(state)
        job.live_state = True  # the caller waits for this save: its state is the state to save
        return job, job.state
    if not isinstance(incremental, IncrementalSave):
        raise ConfigurationError(f"incremental={incremental!r} must be an Incremental(...)")
    return incremental, state


def _id_key(encryptor: Encryptor | None) -> bytes | None:
    if encryptor is None:
        return None
    import blake3

    return blake3.blake3(encryptor.keys[0], derive_key_context="lightning-ckpt 2026-11 piece id").digest()


def _bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _show(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def _shared_storages(state: Any) -> set[tuple[str, int]]:
    """Storages reached by more than one tensor object (tied weights, views): kept inline."""
    owners: dict[tuple[str, int], int] = {}
    shared: set[tuple[str, int]] = set()
    seen: set[int] = set()
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if id(item) in seen or item.device.type == "meta" or item.layout != torch.strided:
                continue
            seen.add(id(item))
            try:
                key = (str(item.device), item.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):
                continue
            if key in owners and owners[key] != id(item):
                shared.add(key)
            owners[key] = id(item)
        elif type(item) in _CONTAINERS and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return shared


def _rebuild(obj: Any, path: Path, memo: dict[int, Any], visit: Callable[[Any, Path], Any],
             reuse: bool = False) -> Any:
    """``obj`` with every tensor (and :class:`_Reuse`) replaced by ``visit(t, path)``; exact
    dicts, OrderedDicts, lists and tuples are rebuilt (shared ones once), anything else kept."""
    if isinstance(obj, (torch.Tensor, _Reuse)):
        return visit(obj, path)
    kind = type(obj)
    if kind not in _CONTAINERS:
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    if kind is list:
        out: Any = []
        memo[id(obj)] = out
        out.extend(_rebuild(v, (*path, i), memo, visit, reuse) for i, v in enumerate(obj))
    elif kind is tuple:
        out = tuple(_rebuild(v, (*path, i), memo, visit, reuse) for i, v in enumerate(obj))
        memo[id(obj)] = out
    else:
        out = kind()
        memo[id(obj)] = out
        for k, v in obj.items():
            out[k] = _rebuild(v, (*path, k), memo, visit, reuse)
    return out


def join(payload: Any, table: PieceTable, storage: Storage, encryptor: Encryptor | None,
         map_location: Any, where: str) -> Any:
    """Put every piece back in place of its placeholder (each read checked against its digest)."""
    from lightning_ckpt.errors import KeyMissingError

    if table.encryption and encryptor is None:
        raise KeyMissingError(f"{where}'s pieces are encrypted (key id {table.encryption.get('key_id')}); "
                              "pass encryptor=Encryptor(...) with its key to load it")
    refs = iter(table.refs)
    done: dict[int, Any] = {}

    def visit(t: Any, path: Path) -> Any:
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return t
        if id(t) in done:  # one tensor at two places (pickle kept it one object)
            return done[id(t)]
        done[id(t)] = result = fill(t, path)
        return result

    def fill(t: torch.Tensor, path: Path) -> Any:
        try:
            ref = next(refs)
        except StopIteration:
            raise CorruptCheckpointError(f"{where}: its payload has more placeholders than its manifest has "
                                         "pieces") from None
        if ref is None:
            return t
        data: Any = pieces.read_piece(storage, ref, where)
        if table.encryption:
            assert encryptor is not None
            data = encryptor.decrypt(data, table.encryption, where)
        n = t.numel() * t.element_size()
        if len(data) != n:
            raise CorruptCheckpointError(f"{where}: the piece of {_show(path)} holds {len(data)} bytes, its "
                                         f"placeholder needs {n}")
        buf = bytearray(data) if not isinstance(data, bytearray) else data
        tensor = torch.frombuffer(buf, dtype=torch.uint8).view(t.dtype).view(t.shape) if n else \
            torch.empty(t.shape, dtype=t.dtype)
        return _place(tensor, ref.device, map_location)

    out = _rebuild(payload, (), {}, visit)
    if next(refs, "end") != "end":
        raise CorruptCheckpointError(f"{where}: its manifest lists more pieces than its payload has placeholders")
    return out


def _place(tensor: torch.Tensor, saved_on: str, map_location: Any) -> torch.Tensor:
    if map_location is None:
        target: Any = saved_on
    elif isinstance(map_location, (str, torch.device)):
        target = map_location
    elif isinstance(map_location, dict):
        target = map_location.get(saved_on, saved_on)
    elif callable(map_location):
        storage = map_location(tensor.untyped_storage(), saved_on)
        if storage is None:
            return tensor.to(saved_on)
        return torch.empty(0, dtype=tensor.dtype, device=storage.device).set_(
            storage, 0, tensor.shape, tensor.stride())
    else:
        target = "cpu"
    return tensor if str(target) == "cpu" else tensor.to(target)
