"""Integrity: the manifest that commits a checkpoint, and the hashing that verifies it.

A checkpoint ``NAME`` is *committed* when ``NAME.manifest.json`` exists beside it. The manifest is
written last, after the payload is durable, and records the payload's size and digest (with the
digest's algorithm, see :mod:`lightning_ckpt.digest`) together with what a reader needs without
opening the payload: epoch, global step, logged metrics, the monitored key, which callback wrote
it, and library versions. The manager checks a payload against its manifest while streaming it,
so a damaged file is named before ``torch.load`` returns anything.

Formats: 1 (single file, ``sha256``), 2 (sharded: a table of files with their sha256), 3
(incremental: a piece table), 4 (single file or incremental, ``digest`` + ``digest_algorithm``,
one of :data:`lightning_ckpt.digest.ALGORITHMS`). A format-4 manifest naming an algorithm outside
that set is malformed (a :class:`CorruptCheckpointError`): format 4 fixes the set, a new
algorithm comes with a new format.
A signed manifest must rest on a collision-resistant digest (:func:`parse_manifest`).

This module owns the manifest's schema and :func:`parse_manifest`, the one parser of its bytes
(limits, every field checked, signature and encryption checks); everything that reads a manifest
goes through it. The file names of the commit protocol live in :mod:`lightning_ckpt.layout` (the
ones here are re-exported). It must not do I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_ckpt.digest import ALGORITHMS, COLLISION_RESISTANT, SHA256, HashingWriter
from lightning_ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError, TamperedCheckpointError
from lightning_ckpt.layout import (  # the names live in layout (these three re-exported)
    MANIFEST_SUFFIX,
    PENDING_SUFFIX,
    logical_name,
    manifest_name,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_SUFFIX",
    "PENDING_SUFFIX",
    "INCREMENTAL_FORMAT_VERSION",
    "SHARDED_FORMAT_VERSION",
    "DIGEST_FORMAT_VERSION",
    "HashingWriter",
    "Manifest",
    "is_safe_name",
    "manifest_name",
    "metrics_to_floats",
    "parse_json",
    "parse_manifest",
    "versions",
]

FORMAT = "lightning-ckpt"
#: The newest layout this version reads. Bumped when a reader of an older version could misread a
#: checkpoint: single-file checkpoints are still written as 1, sharded (directory) ones as 2.
FORMAT_VERSION = 4
#: The layout of a sharded checkpoint: a directory whose every file is listed in ``Manifest.files``.
SHARDED_FORMAT_VERSION = 2
#: An incremental checkpoint (``Manifest.pieces``): its payload holds placeholders that only a
#: reader which knows the piece table can fill, so older readers must refuse it.
INCREMENTAL_FORMAT_VERSION = 3
#: single-file checkpoints (incremental ones too) whose manifest names its digest's algorithm
#: (``digest`` + ``digest_algorithm``) instead of a ``sha256``
DIGEST_FORMAT_VERSION = 4


def versions() -> dict[str, str]:
    """Versions of the software that wrote a checkpoint (recorded for diagnosis)."""
    import torch

    from lightning_ckpt._version import __version__

    out = {"lightning_ckpt": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import lightning

        out["lightning"] = lightning.__version__
    except ImportError:  # the manager works without Lightning (CLI, plain PyTorch)
        pass
    return out


@dataclass
class Manifest:
    """What is known about one committed checkpoint without reading its payload."""

    name: str
    size: int
    #: hex digest of the payload (of the file table, for a sharded checkpoint)
    digest: str
    epoch: int | None = None
    global_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    monitor: str | None = None
    mode: str | None = None
    owner: str | None = None
    weights_only: bool = False
    created: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: for a sharded checkpoint (a directory): relative path -> {"size": ..., "sha256": ...}
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the file holding the payload when it is not ``name`` itself: a re-save is written under a
    #: fresh name (``NAME~lckpt-<token>``) so the previous version stays whole until this commits
    payload: str | None = None
    #: the save that wrote this manifest (so a writer can check that the commit it reads is its own)
    token: str | None = None
    #: the training run that wrote it, and the checkpoints its state descends from as
    #: ``[run, global_step]`` pairs: a save never replaces a checkpoint of another history
    run: str | None = None
    lineage: list[list[Any]] = field(default_factory=list)
    #: an incremental checkpoint's piece table (see :mod:`lightning_ckpt.pieces`); empty otherwise
    pieces: dict[str, Any] = field(default_factory=dict)
    #: the algorithm of ``digest`` (:data:`lightning_ckpt.digest.ALGORITHMS`); sha256 before format 3
    digest_algorithm: str = SHA256
    format: str = FORMAT
    format_version: int = 1

    @property
    def sharded(self) -> bool:
        """Whether this checkpoint is a directory of files (``files``) rather than one file."""
        return bool(self.files)

    @property
    def score(self) -> float | None:
        """The value of the monitored metric, if one was monitored and logged."""
        if self.monitor is None:
            return None
        value = self.metrics.get(self.monitor)
        return None if value is None or math.isnan(value) else float(value)

    @classmethod
    def for_files(cls, name: str, files: Mapping[str, tuple[int, str]], **fields: Any) -> Manifest:
        """The manifest of a sharded checkpoint ``name`` made of ``files`` (path -> (size, sha256)).

        ``size`` is the total and ``sha256`` a digest of the sorted file table, so a listing
        shows one figure for the whole checkpoint and any change to any file changes it.
        """
        table: dict[str, dict[str, Any]] = {
            path: {"size": int(size), "sha256": sha} for path, (size, sha) in sorted(files.items())
        }
        digest = hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()
        total = sum(int(size) for size, _ in files.values())
        return cls(name=name, size=total, digest=digest, files=table, format_version=SHARDED_FORMAT_VERSION, **fields)

    def to_fields(self) -> dict[str, Any]:
        """The JSON fields of this manifest as its format writes them (formats 1 and 2: ``sha256``)."""
        out = asdict(self)
        if self.format_version < DIGEST_FORMAT_VERSION:
            if self.digest_algorithm != SHA256:
                raise ValueError(f"format {self.format_version} records sha256 only, not {self.digest_algorithm}")
            out["sha256"] = out.pop("digest")
            del out["digest_algorithm"]
        return out

    def to_json(self) -> bytes:
        """Serialize (stable key order, so identical states give identical manifests)."""
        return json.dumps(self.to_fields(), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse a manifest; a damaged one is a :class:`CorruptCheckpointError` naming ``where``."""
        return parse_manifest(data, where)

    @classmethod
    def from_fields(cls, raw: Any, where: str) -> Manifest:
        """A manifest from its parsed JSON ``raw``, every field checked (see :func:`parse_json`).

        The one place a manifest's fields are read: types, ranges, names that cannot leave the
        checkpoint's directory, and the consistency of a sharded checkpoint's file table. Unknown
        fields are ignored (a newer writer's additions), a newer ``format_version`` is
        :class:`IncompatibleCheckpointError`, anything else wrong :class:`CorruptCheckpointError`.
        """
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CorruptCheckpointError(f"{where} has no lightning-ckpt manifest (format field missing)")
        version = raw.get("format_version")
        if not _is_int(version) or version < 1:
            raise CorruptCheckpointError(f"manifest of {where} has no valid format_version")
        if version > FORMAT_VERSION:
            raise IncompatibleCheckpointError(
                f"{where} was written in checkpoint format {version}, newer than this lightning-ckpt "
                f"understands ({FORMAT_VERSION}); upgrade lightning-ckpt to read it"
            )
        try:
            return cls._checked(raw, version)
        except _Invalid as exc:
            error = CorruptCheckpointError(f"manifest of {where} is malformed: {exc}")
            #: a digest algorithm we do not know: never a reason to start afresh (see the manager)
            error.unknown_algorithm = getattr(exc, "algorithm", None)  # type: ignore[attr-defined]
            raise error from None

    @classmethod
    def _checked(cls, raw: dict[str, Any], version: int) -> Manifest:
        name = raw.get("name")
        if not isinstance(name, str) or not is_safe_name(name):
            raise _Invalid(f"name {_short(name)} is not a plain file name")
        files = _file_table(raw.get("files", {}))
        if files and version < SHARDED_FORMAT_VERSION:
            raise _Invalid(f"a file table in format {version}")
        size = _size(raw.get("size"), "size")
        if version >= DIGEST_FORMAT_VERSION:
            algorithm = raw.get("digest_algorithm")
            if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
                invalid = _Invalid(
                    f"digest_algorithm {_short(algorithm)} is not one this lightning-ckpt knows ({', '.join(sorted(ALGORITHMS))})"
                )
                invalid.algorithm = _short(algorithm)  # type: ignore[attr-defined]
                raise invalid
            digest = _hex(raw.get("digest"), "digest", ALGORITHMS[algorithm])
        else:
            algorithm, digest = SHA256, _sha256(raw.get("sha256"), "sha256")
        if files:
            table_digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
            if size != sum(f["size"] for f in files.values()) or algorithm != SHA256 or digest != table_digest:
                raise _Invalid("size or sha256 do not match its file table")
        created = raw.get("created", 0.0)
        if not _is_number(created) or not 0 <= created <= MAX_CREATED:
            raise _Invalid(f"created {_short(created)} is not a time between 1970 and 9999")
        metrics = raw.get("metrics", {})
        if not isinstance(metrics, dict) or not all(
            _text(k, "a metric name") is not None and _is_number(v) for k, v in metrics.items()
        ):
            raise _Invalid("metrics must map names to numbers")
        versions_ = raw.get("versions", {})
        if not isinstance(versions_, dict) or not all(_text(v, "a version") is not None for v in versions_.values()):
            raise _Invalid("versions must map names to strings")
        extra = raw.get("extra", {})
        if not isinstance(extra, dict):
            raise _Invalid(f"extra must be an object, not {type(extra).__name__}")
        if "encryption" in extra:
            _encryption(extra["encryption"])
        mode = raw.get("mode")
        if mode not in (None, "min", "max"):
            raise _Invalid(f"mode {_short(mode)} is neither min nor max")
        weights_only = raw.get("weights_only", False)
        if not isinstance(weights_only, bool):
            raise _Invalid("weights_only must be true or false")
        pieces = raw.get("pieces") or {}
        if pieces:
            from lightning_ckpt.pieces import parse_table

            if version < INCREMENTAL_FORMAT_VERSION or files:
                raise _Invalid(f"a piece table in format {version}" + (" beside a file table" if files else ""))
            try:
                parse_table(pieces)
            except ValueError as exc:
                raise _Invalid(str(exc)) from None
        signature = raw.get("signature")
        if signature is not None and not (
            isinstance(signature, dict) and all(isinstance(v, str) for v in signature.values())
        ):
            raise _Invalid("signature must be an object of strings")
        return cls(
            name=name,
            size=size,
            digest=digest,
            epoch=_count(raw.get("epoch"), "epoch"),
            global_step=_count(raw.get("global_step"), "global_step"),
            metrics={k: float(v) for k, v in metrics.items()},
            monitor=_text(raw.get("monitor"), "monitor"),
            mode=mode,
            owner=_text(raw.get("owner"), "owner"),
            weights_only=weights_only,
            created=float(created),
            versions=dict(versions_),
            extra=extra,
            files=files,
            payload=_payload(raw.get("payload"), name),
            token=_text(raw.get("token"), "token"),
            run=_text(raw.get("run"), "run"),
            lineage=_lineage(raw.get("lineage", [])),
            pieces=pieces,
            digest_algorithm=algorithm,
            format=FORMAT,
            format_version=version,
        )


#: the largest manifest read (a sharded checkpoint's file table grows ~120 bytes a file)
MAX_MANIFEST_BYTES = 32 * 2**20
#: the deepest nesting of JSON arrays and objects a manifest may hold
MAX_JSON_DEPTH = 32
#: the largest checkpoint (or file of one) a manifest may claim: 1 PiB
MAX_SIZE = 2**50
#: the most files a sharded checkpoint may list
MAX_FILES = 1_000_000
#: the end of year 9999: a ``created`` time any date formatting can show
MAX_CREATED = 253402300799.0
_MAX_TEXT = 4096
_HEX = frozenset("0123456789abcdef")


class _Invalid(ValueError):
    """A manifest field that does not fit the schema (becomes a CorruptCheckpointError)."""


def parse_manifest(data: bytes, where: str, *, signer: Any = None, encryptor: Any = None) -> Manifest:
    """The one parser of a manifest's bytes: JSON within limits (:func:`parse_json`), every field
    checked (:meth:`Manifest.from_fields`), then, with a :class:`~lightning_ckpt.security.Signer`,
    its signature, and with an :class:`~lightning_ckpt.security.Encryptor`, the refusal of an
    unencrypted checkpoint (unless the encryptor allows plaintext).

    The format is checked first, so a damaged manifest reads as damaged whatever keys are set.
    """
    raw = parse_json(data, where)
    manifest = Manifest.from_fields(raw, where)
    if signer is not None:
        signer.check(raw, f"the manifest of {where}")
        if manifest.digest_algorithm not in COLLISION_RESISTANT:
            # a signature over a checksum anyone can match proves nothing about the payload
            raise TamperedCheckpointError(
                f"the manifest of {where} is signed over a {manifest.digest_algorithm} checksum, not a "
                "collision-resistant digest; a signed checkpoint must use BLAKE3 or sha256 (refusing it)"
            )
    if encryptor is not None:
        encryptor.check_encrypted(manifest.extra.get("encryption"), where)
    return manifest


def parse_json(data: bytes, where: str) -> Any:
    """The JSON document of a manifest, within :data:`MAX_MANIFEST_BYTES` and :data:`MAX_JSON_DEPTH`.

    Nesting is measured before parsing, so a hostile 200,000-deep array costs one pass over the
    bytes, not a ``RecursionError`` somewhere later.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(
            f"manifest of {where} is larger than {MAX_MANIFEST_BYTES // 2**20} MiB (not a manifest we wrote)"
        )
    if _depth(data) > MAX_JSON_DEPTH:
        raise CorruptCheckpointError(f"manifest of {where} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, a 5000-digit number
        raise CorruptCheckpointError(f"manifest of {where} is not valid JSON: {exc}") from None


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def _depth(data: bytes) -> int:
    """The deepest bracket nesting of a JSON document (strings stripped first; junk is bounded too)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRINGS.sub(b"", data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    return deepest
        else:
            depth -= 1
    return deepest


def is_safe_name(name: str) -> bool:
    """Whether ``name`` is one plain file name: it cannot name anything outside its directory."""
    return (
        0 < len(name) <= 1024
        and _encodable(name)
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0")
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value < 2**63:
        raise _Invalid(f"{what} {_short(value)} is not a non-negative integer")
    return int(value)


def _size(value: Any, what: str) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_SIZE:
        raise _Invalid(f"{what} {_short(value)} is not a byte count between 0 and 1 PiB")
    return int(value)


def _sha256(value: Any, what: str) -> str:
    return _hex(value, what, 64)


def _hex(value: Any, what: str, length: int) -> str:
    if not isinstance(value, str) or len(value) != length or not _HEX.issuperset(value):
        raise _Invalid(f"{what} {_short(value)} is not {length} lowercase hex digits")
    return value


def _text(value: Any, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > _MAX_TEXT or not _encodable(value)):
        raise _Invalid(f"{what} {_short(value)} is not a string")
    return value


def _encodable(text: str) -> bool:
    """No lone surrogates (JSON allows ``"\\ud800"``; no terminal or file name does)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _file_table(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise _Invalid("files must be an object")
    if len(value) > MAX_FILES:
        raise _Invalid(f"files lists more than {MAX_FILES} files")
    table: dict[str, dict[str, Any]] = {}
    for path, entry in value.items():
        if not is_safe_name(path):
            raise _Invalid(f"files entry {_short(path)} is not a plain file name inside the checkpoint")
        if not isinstance(entry, dict):
            raise _Invalid(f"files entry {_short(path)} is not an object")
        table[path] = {"size": _size(entry.get("size"), f"the size of {path}"),
                       "sha256": _sha256(entry.get("sha256"), f"the sha256 of {path}")}
    return table


def _encryption(info: Any) -> None:
    if not (isinstance(info, dict) and isinstance(info.get("alg"), str) and isinstance(info.get("key_id"), str)
            and _is_int(info.get("chunk")) and 1 <= info["chunk"] <= 2**30):
        raise _Invalid("extra.encryption must be {alg, key_id, chunk}")


def _payload(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not _payload_of(value, name):
        raise _Invalid(f"payload {_short(value)} is not a version of {_short(name)} in its directory")
    return str(value)


def _lineage(value: Any) -> list[list[Any]]:
    if not isinstance(value, list) or len(value) > 10_000:
        raise _Invalid("lineage must be a list of [run, step] pairs")
    out: list[list[Any]] = []
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 2 and (entry[0] is None or isinstance(entry[0], str))
                and _is_int(entry[1]) and entry[1] >= 0):
            raise _Invalid(f"lineage entry {_short(entry)} is not a [run, step] pair")
        out.append([entry[0], int(entry[1])])
    return out


def _payload_of(payload: Any, name: str) -> bool:
    """Whether ``payload`` names a physical version of ``name`` in the same directory."""
    return (
        isinstance(payload, str)
        and "/" not in payload
        and "\\" not in payload
        and (payload == name or logical_name(payload) == name)
    )


def metrics_to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics as plain floats (tensors and numpy scalars included); others dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            if hasattr(value, "numel") and value.numel() != 1:
                continue
            out[str(key)] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            continue
    return out
