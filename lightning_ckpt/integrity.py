"""Integrity: the manifest that commits a checkpoint, and the hashing that verifies it.

A checkpoint ``NAME`` is *committed* when ``NAME.manifest.json`` exists beside it. The manifest is
written last, after the payload is durable, and records the payload's size and sha256 together
with what a reader needs without opening the payload: epoch, global step, logged metrics, the
monitored key, which callback wrote it, and library versions. :func:`verify` checks a payload
against its manifest while streaming it, so a damaged file is named before ``torch.load`` sees it.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from lightning_ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_SUFFIX",
    "PENDING_SUFFIX",
    "SHARDED_FORMAT_VERSION",
    "HashingWriter",
    "Manifest",
    "manifest_name",
    "versions",
]

FORMAT = "lightning-ckpt"
#: The newest layout this version reads. Bumped when a reader of an older version could misread a
#: checkpoint: single-file checkpoints are still written as 1, sharded (directory) ones as 2.
FORMAT_VERSION = 2
#: The layout of a sharded checkpoint: a directory whose every file is listed in ``Manifest.files``.
SHARDED_FORMAT_VERSION = 2
MANIFEST_SUFFIX = ".manifest.json"
#: a marker beside NAME while a save (or delete) of NAME is in progress; see :mod:`lightning_ckpt.manager`
PENDING_SUFFIX = ".pending"
#: Largest single write handed to the storage, so that uploads fill their parts block by block.
WRITE_BLOCK = 8 * 2**20


def manifest_name(name: str) -> str:
    """The manifest file that commits checkpoint ``name``."""
    return name + MANIFEST_SUFFIX


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
    sha256: str
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
        return cls(name=name, size=total, sha256=digest, files=table, format_version=SHARDED_FORMAT_VERSION, **fields)

    def to_json(self) -> bytes:
        """Serialize (stable key order, so identical states give identical manifests)."""
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse a manifest; a damaged one is a :class:`CorruptCheckpointError` naming ``where``."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"manifest of {where} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CorruptCheckpointError(f"{where} has no lightning-ckpt manifest (format field missing)")
        version = raw.get("format_version")
        if not isinstance(version, int):
            raise CorruptCheckpointError(f"manifest of {where} has no integer format_version")
        if version > FORMAT_VERSION:
            raise IncompatibleCheckpointError(
                f"{where} was written in checkpoint format {version}, newer than this lightning-ckpt "
                f"understands ({FORMAT_VERSION}); upgrade lightning-ckpt to read it"
            )
        known = {f for f in cls.__dataclass_fields__}
        try:
            manifest = cls(**{k: v for k, v in raw.items() if k in known})
            manifest.size = int(manifest.size)
            if not isinstance(manifest.sha256, str) or len(manifest.sha256) != 64:
                raise ValueError("sha256 must be 64 hex digits")
            manifest.metrics = {str(k): float(v) for k, v in dict(manifest.metrics).items()}
            manifest.files = {
                str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in dict(manifest.files).items()
            }
        except (TypeError, ValueError, KeyError) as exc:
            raise CorruptCheckpointError(f"manifest of {where} is malformed: {exc!r}") from exc
        return manifest


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


class HashingWriter:
    """A write-only stream that forwards to ``sink`` while computing size and sha256.

    ``hashlib`` releases the GIL on large updates, so hashing does not stall a training thread
    when this runs in the background.
    """

    def __init__(self, sink: IO[bytes]) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        # torch.save hands over each tensor in one call; feeding the sink in blocks lets object
        # stores upload part by part instead of buffering a whole tensor as one part
        for start in range(0, view.nbytes, WRITE_BLOCK):
            block = view[start : start + WRITE_BLOCK]
            self._sink.write(block)
            self._hash.update(block)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._sink.flush()

    def writable(self) -> bool:
        return True

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()
