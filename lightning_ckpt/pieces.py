"""The shared pieces of incremental checkpoints: pack files, the manifest's piece table, reading,
verifying, and reclaiming pieces no committed checkpoint references.

An incremental checkpoint's payload is an ordinary ``torch.save`` file in which every large tensor
is replaced by a placeholder (a ``meta`` tensor of the same dtype and shape); the tensor's bytes are
a *piece*: a byte range of a pack file ``.~lckpt-pack-<token>`` (one per save that wrote new bytes,
written whole before the manifest). The manifest's ``pieces`` table lists, placeholder by
placeholder, where each piece lies (pack file, offset, size), the BLAKE3 digest of the bytes stored
there, and the piece's *id*, the key under which later saves find it again: the BLAKE3 digest of
the tensor's bytes, or with encryption a BLAKE3 keyed hash of them (key derived from the
encryption key, so the names of pieces say nothing about plaintext that could be checked against a
guess). The table is part of the manifest, so a signature covers every reference.

Reclaiming (:func:`collect`) removes a pack file exactly when it is ours (its name carries the
reserved mark, see :mod:`lightning_ckpt.layout`) and no manifest in the directory references it.
It never races a writer: it first writes a ``gc`` marker, then lists; a writer first writes its
save marker, then lists (:func:`wait_for_collectors`). Whichever lists second sees the other: the
collector gives up while any live writer's marker is present, a writer waits until no live
collector's marker is. A manifest that cannot be parsed stops the collection (nothing can be
proven unreferenced while it might reference a pack).

Owns: pack names, the table's schema, piece reads and checks, the collector. Must not: import
torch or fsspec, or decide which tensors become pieces (that is :mod:`lightning_ckpt.incremental`).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_ckpt import layout
from lightning_ckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, StorageError

if TYPE_CHECKING:
    from lightning_ckpt.storage import Storage

__all__ = [
    "PACK_PREFIX",
    "PieceRef",
    "PieceTable",
    "collect",
    "digest",
    "index",
    "is_pack",
    "missing",
    "pack_name",
    "parse_table",
    "read_piece",
    "reclaim",
    "table_of",
    "verify_table",
    "wait_for_collectors",
]

log = logging.getLogger("lightning_ckpt")

PACK_PREFIX = "." + layout.RESERVED_MARK + "pack-"
_PACK = re.compile(r"^\.~lckpt-pack-[0-9a-f]{16}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: the name the collector's marker is written under (``.lckpt-pieces~lckpt-<token>.pending``)
COLLECTOR = ".lckpt-pieces"
#: how long a writer waits for a live collector to finish before giving up (seconds)
COLLECTOR_WAIT = 120.0
#: a collector stops deleting this long after it listed, so a collector's marker this old (a
#: collector on another host that crashed) no longer holds writers back (seconds)
COLLECTOR_MAX = 300.0
COLLECTOR_STALE = 2 * COLLECTOR_MAX
MAX_REFS = 1_000_000
MAX_SIZE = 2**50
_DEVICE = re.compile(r"^[a-z][a-z0-9_]{0,31}(:[0-9]{1,6})?$")


def pack_name(token: str) -> str:
    """The pack file one save writes its new pieces into."""
    return f"{PACK_PREFIX}{token}"


def is_pack(fname: str) -> bool:
    return bool(_PACK.match(fname))


@dataclass(frozen=True)
class PieceRef:
    """Where one piece lies, and how to recognise it."""

    id: str
    file: str
    offset: int
    size: int
    digest: str
    #: the device the tensor was saved from (``map_location=None`` puts it back there)
    device: str = "cpu"

    def to_json(self) -> list[Any]:
        return [self.id, self.file, self.offset, self.size, self.digest, self.device]


@dataclass(frozen=True)
class PieceTable:
    """A manifest's ``pieces``: one entry per placeholder in the payload, in traversal order
    (``None`` for a ``meta`` tensor that was in the saved state itself)."""

    refs: tuple[PieceRef | None, ...]
    #: the encryption record of the pieces (``Encryptor.describe()``), or None
    encryption: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"refs": [r.to_json() if r is not None else None for r in self.refs]}
        if self.encryption:
            out["encryption"] = dict(self.encryption)
        return out

    @property
    def files(self) -> set[str]:
        return {r.file for r in self.refs if r is not None}

    @property
    def stored_bytes(self) -> int:
        """Bytes of the distinct pieces referenced (what the checkpoint holds beyond its payload)."""
        return sum(r.size for r in {(r.file, r.offset): r for r in self.refs if r is not None}.values())


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
        raise ValueError(f"{what} is not a size")
    return value


def parse_table(raw: Any) -> PieceTable:
    """A piece table from a manifest's JSON; ``ValueError`` saying what is wrong."""
    if not isinstance(raw, dict) or not isinstance(raw.get("refs"), list):
        raise ValueError("pieces must be an object with a list of refs")
    refs = raw["refs"]
    if len(refs) > MAX_REFS:
        raise ValueError(f"more than {MAX_REFS} pieces")
    out: list[PieceRef | None] = []
    for i, ref in enumerate(refs):
        if ref is None:
            out.append(None)
            continue
        if not isinstance(ref, list) or len(ref) != 6:
            raise ValueError(f"piece {i} is not [id, file, offset, size, digest, device]")
        pid, file, offset, size, digest, device = ref
        if not isinstance(pid, str) or not _HEX64.match(pid) or not isinstance(digest, str) or not _HEX64.match(digest):
            raise ValueError(f"piece {i} has no valid id or digest")
        if not isinstance(file, str) or not is_pack(file):
            raise ValueError(f"piece {i} names {str(file)[:80]!r}, not a pack file")
        if not isinstance(device, str) or not _DEVICE.match(device):
            raise ValueError(f"piece {i} has no valid device")
        out.append(PieceRef(pid, file, _int(offset, f"piece {i}'s offset"), _int(size, f"piece {i}'s size"),
                            digest, device))
    encryption = raw.get("encryption")
    if encryption is not None and not isinstance(encryption, dict):
        raise ValueError("pieces' encryption must be an object")
    return PieceTable(tuple(out), encryption or None)


def table_of(manifest: Any) -> PieceTable | None:
    """The piece table of a parsed manifest (None for a full checkpoint)."""
    raw = getattr(manifest, "pieces", None)
    return parse_table(raw) if raw else None


def digest(data: Any) -> str:
    import blake3

    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


def read_piece(storage: Storage, ref: PieceRef, where: str) -> bytes:
    """The stored bytes of ``ref``, checked against its digest (ciphertext with encryption)."""
    try:
        data = storage.read_range(ref.file, ref.offset, ref.size)
    except CheckpointNotFoundError:
        raise CorruptCheckpointError(f"{where}: its piece file {ref.file} is missing") from None
    if len(data) != ref.size:
        raise CorruptCheckpointError(f"{where}: {ref.file} is too short for the piece at {ref.offset} "
                                     "(truncated)")
    if digest(data) != ref.digest:
        raise CorruptCheckpointError(f"{where}: the piece at {ref.offset} of {ref.file} does not match its digest "
                                     "(damaged)")
    return data


def verify_table(storage: Storage, table: PieceTable, where: str) -> int:
    """Read and check every distinct piece ``table`` references; return how many bytes."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for ref in table.refs:
        if ref is None or (ref.file, ref.offset) in seen:
            continue
        seen.add((ref.file, ref.offset))
        read_piece(storage, ref, where)
        total += ref.size
    return total


def missing(storage: Storage, table: PieceTable) -> list[str]:
    """Pack files ``table`` needs that are absent or shorter than its pieces (one listing)."""
    sizes = {f.name: f.size for f in storage.list()}
    need: dict[str, int] = {}
    for ref in table.refs:
        if ref is not None:
            need[ref.file] = max(need.get(ref.file, 0), ref.offset + ref.size)
    return sorted(f for f, n in need.items() if sizes.get(f, -1) < n)


def index(manifests: Iterable[Any], files: set[str], encryption: Mapping[str, Any] | None) -> dict[str, PieceRef]:
    """id -> where it lies, over the committed ``manifests`` whose pieces were stored the way this
    save stores them (same encryption record) and whose pack files exist."""
    found: dict[str, PieceRef] = {}
    wanted = dict(encryption) if encryption else None
    for manifest in sorted(manifests, key=lambda m: -getattr(m, "created", 0.0)):  # the newest copy of a piece
        try:
            table = table_of(manifest)
        except ValueError:
            continue
        if table is None or (table.encryption or None) != wanted:
            continue
        for ref in table.refs:
            if ref is not None and ref.file in files:
                found.setdefault(ref.id, ref)
    return found


def _live_markers(storage: Storage, names: Iterable[str], stale_after: float, collectors: bool,
                  mine: str | None) -> list[str]:
    live = []
    for fname in names:
        parsed = layout.marker_of(fname)
        if parsed is None or parsed[1] == mine:
            continue
        if (parsed[0] == COLLECTOR) != collectors:
            continue
        try:
            data = storage.read_bytes(fname)
        except CheckpointNotFoundError:
            continue
        if not layout.Marker.parse(fname, data).abandoned(stale_after):
            live.append(fname)
    return live


def wait_for_collectors(storage: Storage, stale_after: float, timeout: float = COLLECTOR_WAIT) -> None:
    """Called by a writer after its save marker is written: return once no live collector is at
    work (a collector that started before our marker may be removing packs we would reuse)."""
    deadline = time.monotonic() + timeout
    while True:
        names = [f.name for f in storage.list()]
        live = _live_markers(storage, names, min(stale_after, COLLECTOR_STALE), collectors=True, mine=None)
        if not live:
            return
        if time.monotonic() > deadline:
            raise StorageError(errno.EBUSY, f"{storage.url}: another process has been reclaiming unreferenced "
                               f"pieces for {timeout:.0f} s ({live[0]}); the save did not start")
        time.sleep(0.05)


def reclaim(storage: Storage, stale_after: float) -> list[str]:
    """:func:`collect` after a commit or delete, which has already succeeded: a failure is logged
    (the next collection, or ``cleanup()``, retries)."""
    try:
        return collect(storage, stale_after)
    except CheckpointError as exc:
        log.warning("could not reclaim unreferenced pieces in %s (%s); cleanup() will retry", storage.url, exc)
        return []


def collect(storage: Storage, stale_after: float = layout.STALE_AFTER) -> list[str]:
    """Remove the pack files no manifest in the directory references; return their names.

    Does nothing while any other live writer's marker is in the directory, or while a manifest
    there cannot be read (it might reference a pack). See the module docstring for the handshake.
    """
    if not any(is_pack(f.name) for f in storage.list()):
        return []  # nothing to reclaim (and nothing written: a fresh directory may not exist yet)
    token = layout.new_token()
    marker = layout.Marker.mine(COLLECTOR, token, "gc")
    marker_file = layout.marker_name(COLLECTOR, token)
    layout.hold(token)
    try:
        storage.write_bytes(marker_file, marker.to_json())
        try:
            listed = time.monotonic()
            names = [f.name for f in storage.list()]
            if not any(is_pack(f) for f in names):
                return []
            if _live_markers(storage, names, stale_after, collectors=False, mine=token):
                return []  # a writer is at work: what it references is not ours to judge; next time
            referenced: set[str] = set()
            for fname in names:
                if not fname.endswith(".manifest.json") or layout.is_temp(fname):
                    continue
                try:
                    data = storage.read_bytes(fname, limit=32 * 2**20)
                except CheckpointNotFoundError:
                    continue  # deleted since the listing: it references nothing any more
                try:
                    raw = json.loads(data)
                    pieces = raw.get("pieces") if isinstance(raw, dict) else None
                    if pieces:
                        referenced |= parse_table(pieces).files
                except (ValueError, UnicodeDecodeError):
                    return []  # cannot prove what it references: reclaim nothing
            doomed = sorted(f for f in names if is_pack(f) and f not in referenced)
            deleted = []
            for fname in doomed:
                if time.monotonic() - listed > COLLECTOR_MAX:
                    break  # writers stop waiting for a marker this old: the rest waits for the next collection
                storage.delete(fname)
                deleted.append(fname)
            return deleted
        finally:
            storage.delete(marker_file)
    finally:
        layout.release(token)
