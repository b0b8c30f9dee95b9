"""The commit protocol's file names, who may remove what, and what a directory listing holds.

This module owns every name the protocol uses (``NAME.manifest.json`` commits ``NAME``; markers,
fresh payload names and temporary files carry :data:`RESERVED_MARK`) and :func:`scan`, the one
classification of a listing into committed, damaged, orphaned, leftover, in-progress and foreign
files. It must not do I/O itself (callers pass what they listed and read) nor parse a manifest's
fields (:mod:`lightning_ckpt.integrity` does).

Every file this package creates besides a committed name carries :data:`RESERVED_MARK`, which no
checkpoint name may contain (:func:`check_name` refuses it, so ``filename=`` templates cannot
produce it): a file with the mark is provably ours, any other file is not. The names:

=================================  =============================================================
``NAME~lckpt-<token>``              a payload under a fresh physical name (a re-save of ``NAME``)
``NAME~lckpt-<token>.pending``      the marker of one save or delete of ``NAME`` in progress; its
                                    JSON names the writer (host, pid, start time) and the files
``.~lckpt-tmp-<w>-<rand>.NAME``      a temporary file of writer ``<w>`` (host hash + pid)
=================================  =============================================================

A leftover is removed only when it is *provably abandoned*: its writer is this process and the
save is not in flight, or another process on this host that no longer exists, or a writer on
another host whose marker is older than ``stale_after`` seconds. A live writer's files are never
touched, so a requeued job's start-up cleanup cannot delete the old job's save in progress.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_ckpt.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)

if TYPE_CHECKING:
    from lightning_ckpt.integrity import Manifest

__all__ = [
    "MANIFEST_SUFFIX",
    "MARKER_SUFFIX",
    "PENDING_SUFFIX",
    "RESERVED_MARK",
    "STALE_AFTER",
    "TEMP_MARK",
    "DirectoryScan",
    "History",
    "Marker",
    "check_name",
    "hold",
    "in_flight",
    "is_temp",
    "logical_name",
    "manifest_name",
    "marker_name",
    "marker_of",
    "may_replace",
    "new_token",
    "pending_name",
    "physical_name",
    "release",
    "scan",
    "temp_abandoned",
    "temp_name",
    "versioned_name",
    "writer_tag",
]

RESERVED_MARK = "~lckpt-"
#: temporary files: ``.~lckpt-tmp-<writer>-<random>.NAME``
TEMP_MARK = RESERVED_MARK + "tmp-"
MARKER_SUFFIX = ".pending"
#: ``NAME.manifest.json`` beside ``NAME``: written last, it commits ``NAME``
MANIFEST_SUFFIX = ".manifest.json"
#: ``NAME.pending``: the marker of a save or delete of ``NAME`` (sharded saves; older versions)
PENDING_SUFFIX = MARKER_SUFFIX
#: a marker of a writer on another host is abandoned once this old (seconds); liveness of a writer
#: on this host is checked directly
STALE_AFTER = 6 * 3600.0

_TOKEN = re.compile(r"^(?P<name>.+)~lckpt-(?P<token>[0-9a-f]{16})$")
_TEMP = re.compile(r"^\.~lckpt-tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{12}\.(?P<name>.+)$")
_LEGACY_TEMP = re.compile(r"^\..+\.lckpt-tmp-[0-9a-f]{12}$")  # written by lightning-ckpt <= 0.x (main before #14)

#: tokens of the saves and deletes this process has in flight (a fact about the process, not a
#: setting: it is what proves that a marker of this very process is still alive)
_IN_FLIGHT: set[str] = set()
_LOCK = threading.Lock()


def check_name(name: str) -> None:
    """Refuse a checkpoint name that could be mistaken for one of our own files."""
    if RESERVED_MARK in name or name.endswith((MARKER_SUFFIX, MANIFEST_SUFFIX)):
        raise ConfigurationError(
            f"checkpoint name {name!r} contains {RESERVED_MARK!r} or ends in {MARKER_SUFFIX!r}/'.manifest.json': "
            "these are reserved for lightning-ckpt's own files"
        )


def new_token() -> str:
    return uuid.uuid4().hex[:16]


def manifest_name(name: str) -> str:
    """The manifest file that commits checkpoint ``name``."""
    return name + MANIFEST_SUFFIX


def pending_name(name: str) -> str:
    """``NAME.pending``: the marker of a sharded save or delete of ``name`` (and of older versions' saves)."""
    return name + PENDING_SUFFIX


def physical_name(name: str, token: str) -> str:
    """The fresh physical name of a re-save of ``name``."""
    return f"{name}{RESERVED_MARK}{token}"


def marker_name(name: str, token: str) -> str:
    return f"{name}{RESERVED_MARK}{token}{MARKER_SUFFIX}"


def logical_name(fname: str) -> str | None:
    """``NAME`` for a physical version ``NAME~lckpt-<token>``, else None."""
    m = _TOKEN.match(fname)
    return m.group("name") if m else None


def marker_of(fname: str) -> tuple[str, str | None] | None:
    """``(NAME, token)`` for a marker file (token None for a legacy ``NAME.pending``), else None."""
    if not fname.endswith(MARKER_SUFFIX):
        return None
    stem = fname[: -len(MARKER_SUFFIX)]
    m = _TOKEN.match(stem)
    return (m.group("name"), m.group("token")) if m else (stem, None)


def versioned_name(name: str, version: int, extension: str = ".ckpt") -> str:
    """``base-vN.ckpt`` for ``base.ckpt``: Lightning's version suffix."""
    base = name[: -len(extension)] if extension and name.endswith(extension) else name
    return f"{base}-v{version}{extension if name.endswith(extension) else ''}"


def _host_hash() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def writer_tag() -> str:
    """``<host hash>-<pid>``: which process wrote a temporary file."""
    return f"{_host_hash()}-{os.getpid()}"


def temp_name(name: str) -> str:
    # ends in the name, so a glob for a file's name also matches its temporary file
    return f".{TEMP_MARK}{writer_tag()}-{uuid.uuid4().hex[:12]}.{name}"


def is_temp(fname: str) -> bool:
    return bool(_TEMP.match(fname) or _LEGACY_TEMP.match(fname))


class in_flight:  # noqa: N801 - used as a context manager, like a function
    """Register ``token`` (or a temporary file name) as in flight in this process."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __enter__(self) -> str:
        with _LOCK:
            _IN_FLIGHT.add(self.token)
        return self.token

    def __exit__(self, *exc: object) -> None:
        with _LOCK:
            _IN_FLIGHT.discard(self.token)


def hold(token: str) -> None:
    """Register ``token`` as in flight until :func:`release` (for saves spanning several calls)."""
    with _LOCK:
        _IN_FLIGHT.add(token)


def release(token: str) -> None:
    with _LOCK:
        _IN_FLIGHT.discard(token)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True  # cannot tell: assume alive (never delete on doubt)
    return True


def _writer_alive(host: str, pid: int, token: str | None, started: float, now: float, stale_after: float) -> bool:
    if host == _host_hash():
        if pid == os.getpid():
            with _LOCK:
                return token is not None and token in _IN_FLIGHT
        return _pid_alive(pid)
    return now - started < stale_after


def temp_abandoned(fname: str, mtime: float | None, stale_after: float = STALE_AFTER) -> bool:
    """Whether temporary file ``fname`` (ours by its name) belongs to no live writer."""
    m = _TEMP.match(fname)
    if m is None:
        return bool(_LEGACY_TEMP.match(fname))  # an old version's: no writer recorded
    started = mtime if mtime is not None else 0.0
    return not _writer_alive(m.group("host"), int(m.group("pid")), fname, started, time.time(), stale_after)


@dataclass(frozen=True)
class Marker:
    """The content of a ``.pending`` marker: one save or delete of ``name`` by one writer."""

    name: str
    token: str | None = None
    op: str = "save"
    #: the physical file being written (a save) and the one it replaces, if any
    physical: str | None = None
    old: str | None = None
    host: str | None = None
    pid: int | None = None
    started: float = 0.0

    @classmethod
    def mine(cls, name: str, token: str, op: str = "save", physical: str | None = None, old: str | None = None) -> Marker:
        return cls(name, token, op, physical, old, _host_hash(), os.getpid(), time.time())

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def parse(cls, fname: str, data: bytes | None) -> Marker:
        """A marker read from ``fname``; legacy or unreadable markers have no writer (abandoned)."""
        parsed = marker_of(fname)
        name, token = parsed if parsed else (fname, None)
        raw: Any = {}
        if data is not None:
            try:
                raw = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raw = {}
        if not isinstance(raw, dict):
            raw = {}

        def text(key: str) -> str | None:
            value = raw.get(key)
            return value if isinstance(value, str) and "/" not in value else None

        pid = raw.get("pid")
        started = raw.get("started")
        if token is None and isinstance(raw.get("token"), str):
            token = raw["token"]  # a NAME.pending marker that records its writer (sharded saves)
        return cls(
            name=name,
            token=token,
            op=text("op") or "save",
            physical=text("physical"),
            old=text("old"),
            host=text("host"),
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            started=float(started) if isinstance(started, (int, float)) and not isinstance(started, bool) else 0.0,
        )

    def abandoned(self, stale_after: float = STALE_AFTER, now: float | None = None) -> bool:
        """Provably abandoned: no writer recorded (an older version's marker), or its writer is gone."""
        if self.host is None or self.pid is None:
            return True
        return not _writer_alive(self.host, self.pid, self.token, self.started,
                                 time.time() if now is None else now, stale_after)


@dataclass(frozen=True)
class History:
    """The training history a save belongs to: its run, and the checkpoints its state descends from.

    A checkpoint is *of this history* when this run wrote it, or when it is one of the states this
    run continues from (a checkpoint of an ancestor run at or before the step resumed from). A
    save may replace only a committed checkpoint of its own history: resuming from ``"best"``
    and replaying steps never overwrites the original run's later checkpoints.
    """

    run: str
    #: ``(run, global_step)`` of every checkpoint this state was resumed from, oldest first
    lineage: tuple[tuple[str | None, int], ...] = ()

    @classmethod
    def new(cls) -> History:
        return cls(uuid.uuid4().hex[:16])

    def resumed_from(self, manifest: Any) -> History:
        """This run, continuing from the checkpoint ``manifest`` describes."""
        inherited = tuple((r, int(s)) for r, s in (getattr(manifest, "lineage", None) or []))
        return History(self.run, (*inherited, (getattr(manifest, "run", None), int(manifest.global_step or 0))))

    def fields(self) -> dict[str, Any]:
        """The manifest fields that record this history."""
        return {"run": self.run, "lineage": [[r, s] for r, s in self.lineage]}

    def contains(self, manifest: Any) -> bool:
        run, step = getattr(manifest, "run", None), int(manifest.global_step or 0)
        if run is not None and run == self.run:
            return True
        return any(r == run and step <= s for r, s in self.lineage)


def may_replace(existing: Any, owner: str | None, history: History | None) -> str | None:
    """Why a save by ``owner`` in ``history`` may not replace committed ``existing`` (None: it may)."""
    if existing.owner != owner:
        return f"it was written by another callback ({existing.owner or 'no owner'})"
    if history is not None and not history.contains(existing):
        return (f"it belongs to another training history (run {existing.run or 'unknown'}, step "
                f"{existing.global_step}), which this run does not continue")
    return None


@dataclass
class DirectoryScan:
    """One directory as the commit protocol sees it: what readers use, and what they skip."""

    #: committed checkpoints whose manifest parses (and authenticates, with a signer); the manager
    #: orders them oldest first (:func:`lightning_ckpt.policies.recency`)
    committed: list[Manifest] = field(default_factory=list)
    #: (name, why) for manifests that do not parse, do not authenticate, or describe another file
    damaged: list[tuple[str, str]] = field(default_factory=list)
    #: names whose manifest exists but whose payload does not
    orphaned: list[str] = field(default_factory=list)
    #: leftovers of interrupted saves: exactly what :meth:`CheckpointManager.cleanup` removes
    leftovers: list[str] = field(default_factory=list)
    #: ``*.ckpt`` files with neither a manifest nor a marker (not written by us)
    unmanaged: list[str] = field(default_factory=list)
    #: (name, key seen) for damaged ones refused only for want of a configured key: signed with
    #: another key (its id), ``"unsigned"`` under a signer, ``"unencrypted"`` under an encryptor
    unverifiable: list[tuple[str, str]] = field(default_factory=list)
    #: (name, algorithm) for manifests whose digest algorithm this version does not know
    unknown_algorithms: list[tuple[str, str]] = field(default_factory=list)
    #: markers and files of saves whose writer is still alive (never removed)
    in_progress: list[str] = field(default_factory=list)
    #: files that abandoned saves were writing: on S3 their unfinished uploads are aborted by cleanup
    abandoned_writes: list[str] = field(default_factory=list)
    #: how many files the directory holds
    files: int = 0


def scan(
    listing: Mapping[str, float | None],
    *,
    read_manifest: Callable[[str], Manifest],
    read_marker: Callable[[str], bytes | None],
    dirs: Callable[[], Iterable[str]],
    stale_after: float = STALE_AFTER,
) -> DirectoryScan:
    """Sort one listing of a directory (file name -> modification time, if known) into committed,
    damaged, orphaned, leftover, in-progress and foreign files.

    ``read_manifest(name)`` returns the parsed (and authenticated) manifest of ``name`` or raises
    :class:`CheckpointNotFoundError` (gone since the listing), :class:`CorruptCheckpointError` or
    :class:`IncompatibleCheckpointError`; ``read_marker(fname)`` the bytes of a marker or None;
    ``dirs()`` the subdirectories (asked only once a sharded checkpoint is met). Never reads a
    payload and changes nothing.
    """
    files = set(listing)
    found = DirectoryScan(files=len(files))
    subdirs: set[str] | None = None

    def is_dir(name: str) -> bool:  # a sharded checkpoint is a directory: listed only when one is met
        nonlocal subdirs
        if subdirs is None:
            subdirs = set(dirs())
        return name in subdirs

    markers: list[tuple[bool, Marker]] = []
    for fname in sorted(files):
        if is_temp(fname):
            if temp_abandoned(fname, listing[fname], stale_after):
                found.leftovers.append(fname)
            else:
                found.in_progress.append(fname)
        elif marker_of(fname) is not None:
            marker = Marker.parse(fname, read_marker(fname))
            if marker.abandoned(stale_after):
                markers.append((marker_of(fname)[1] is None, marker))  # type: ignore[index]
                found.leftovers.append(fname)
            else:
                found.in_progress.append(fname)
                found.in_progress.extend(p for p in (marker.physical,) if p and p in files)
        elif fname.endswith(MANIFEST_SUFFIX):
            name = fname[: -len(MANIFEST_SUFFIX)]
            if name not in files and not any(logical_name(f) == name for f in files) and not is_dir(name):
                found.orphaned.append(name)
                continue
            try:
                manifest = read_manifest(name)
            except CheckpointNotFoundError:
                continue  # deleted since the listing
            except (CorruptCheckpointError, IncompatibleCheckpointError) as exc:
                found.damaged.append((name, str(exc)))
                if getattr(exc, "key_seen", None) is not None:
                    found.unverifiable.append((name, exc.key_seen))  # type: ignore[attr-defined]
                if getattr(exc, "unknown_algorithm", None) is not None:
                    found.unknown_algorithms.append((name, exc.unknown_algorithm))  # type: ignore[attr-defined]
                continue
            if manifest.name != name:
                found.damaged.append((name, f"its manifest describes {manifest.name!r}"))
                continue
            held = manifest.payload if manifest.payload in files else name
            if (manifest.sharded and name in files) or (not manifest.sharded and held not in files and is_dir(name)):
                found.damaged.append((name, "its manifest describes a " + (
                    "directory of shards, but it is a file" if manifest.sharded else
                    "single file, but it is a directory")))
                continue
            if not manifest.sharded and held not in files:
                found.orphaned.append(name)
                continue
            found.committed.append(manifest)
    referenced = {m.payload if m.payload in files else m.name for m in found.committed}
    damaged = {n for n, _ in found.damaged}
    for plain, marker in markers:
        found.abandoned_writes.append(marker.name if plain else (marker.physical or marker.name))
        if plain:  # a NAME.pending marker (older versions, sharded saves): NAME itself was written
            if marker.name in files and manifest_name(marker.name) not in files:
                found.leftovers.append(marker.name)
            elif manifest_name(marker.name) not in files and is_dir(marker.name):
                found.leftovers.append(marker.name + "/")
            if marker.name in damaged:
                found.leftovers.append(manifest_name(marker.name))
            continue
        if marker.name in damaged and marker.op == "save":
            # a commit cut short on a filesystem without atomic writes: the marker proves the
            # half-written manifest is ours
            found.leftovers.append(manifest_name(marker.name))
            referenced.discard(marker.name)
        for path in (marker.physical, marker.old):
            if path and path in files and path not in referenced:
                found.leftovers.append(path)
    in_progress = set(found.in_progress)
    for fname in files:
        # a version of ours (by its reserved name) that no manifest and no live save holds:
        # superseded by a concurrent writer's commit
        if logical_name(fname) is not None and fname not in referenced and fname not in in_progress:
            found.leftovers.append(fname)
    found.leftovers = sorted(set(found.leftovers))
    claimed = {*found.leftovers, *in_progress, *found.orphaned, *(m.name for m in found.committed), *damaged}
    found.unmanaged = sorted(f for f in files if f.endswith(".ckpt") and f not in claimed)
    return found
