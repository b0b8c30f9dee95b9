"""The one exception tree of lightning_ckpt.

Every error this package raises on purpose derives from :class:`CheckpointError`, and each
subclass also derives from the builtin a caller would naturally catch, so
``except FileNotFoundError`` keeps working::

    CheckpointError
    ├── ConfigurationError          (ValueError)        bad arguments, rejected at construction
    ├── CheckpointNotFoundError     (FileNotFoundError) nothing committed at that URL
    │   └── UncommittedCheckpointError                  a save that never finished (no manifest)
    ├── CorruptCheckpointError      (ValueError)        size / sha256 / format does not verify
    │   └── TamperedCheckpointError                     unsigned or badly signed (a signer is set)
    ├── IncompatibleCheckpointError (ValueError)        newer format, or a different model/optimizer
    │   ├── UnsafeCheckpointError                       holds objects weights-only loading refuses
    │   ├── KeyMissingError                             encrypted or signed with a key that is not configured
    │   └── DeviceUnavailableError                      its tensors (or map_location) name a device this machine lacks
    ├── MonitorNotFoundError        (KeyError)          the monitored metric was never logged
    ├── NameTakenError              (FileExistsError)   the name holds a file we may not replace
    ├── RanksDisagreeError          (RuntimeError)      processes disagree on a save decision
    └── StorageError                (OSError)           the storage failed (after retries)
        ├── StoragePermissionError  (PermissionError)   credentials / permissions
        ├── BucketNotFoundError                         the URL's bucket/container does not exist
        └── UnsupportedURLError     (ValueError)        no fsspec implementation for the URL

Warnings (a damaged checkpoint skipped by ``"last"``, a failed periodic save that the next save
retries) are :class:`CheckpointWarning`.

:class:`ConfigurationError` and :class:`MonitorNotFoundError` are also Lightning's
``MisconfigurationException`` (so an
``except MisconfigurationException`` written for ``ModelCheckpoint`` keeps working) once Lightning
is imported: by ``import lightning`` before this module, or by importing anything of ours that uses
Lightning (``CheckpointCallback``, ``ManagedCheckpointIO``). This module never imports Lightning
itself, so the CLI and plain-PyTorch users do not pay for it.

Only a real "not found" means "absent"; every other I/O failure is a :class:`StorageError`
carrying the URL and the cause, so an outage is never mistaken for "no checkpoint yet". A missing
bucket is not "no checkpoint yet" either (a typo in the URL must not start a run afresh), so
:class:`BucketNotFoundError` is deliberately *not* a ``FileNotFoundError``.

Owns: the exception and warning classes. Must not: raise anything itself or import any other
module of lightning_ckpt.
"""

from __future__ import annotations

import sys

__all__ = [
    "BucketNotFoundError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "ConfigurationError",
    "CorruptCheckpointError",
    "DeviceUnavailableError",
    "IncompatibleCheckpointError",
    "KeyMissingError",
    "MonitorNotFoundError",
    "NameTakenError",
    "RanksDisagreeError",
    "ShardedCheckpointError",
    "StorageError",
    "StoragePermissionError",
    "TamperedCheckpointError",
    "UncommittedCheckpointError",
    "UnsafeCheckpointError",
    "UnsupportedURLError",
    "adopt_lightning_base",
]


class CheckpointError(Exception):
    """Root of every error raised by lightning_ckpt."""


class ConfigurationError(CheckpointError, ValueError):
    """Invalid arguments or an invalid combination of them."""


def adopt_lightning_base() -> None:
    """Make :class:`ConfigurationError` and :class:`MonitorNotFoundError` subclasses of Lightning's
    ``MisconfigurationException`` (what ``ModelCheckpoint`` raises for both).

    Called by the modules that import Lightning anyway; idempotent.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    for cls in (ConfigurationError, MonitorNotFoundError):
        if not issubclass(cls, MisconfigurationException):
            cls.__bases__ = (*cls.__bases__, MisconfigurationException)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists at the given URL."""


class UncommittedCheckpointError(CheckpointNotFoundError):
    """The payload exists but its save never committed (interrupted or failed)."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """The checkpoint does not verify: wrong size, wrong sha256, unreadable manifest or payload."""


class TamperedCheckpointError(CorruptCheckpointError):
    """A signer is configured and the manifest's signature is missing, unknown or wrong."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """The checkpoint is valid but cannot be used here (newer format, different structure)."""


class UnsafeCheckpointError(IncompatibleCheckpointError):
    """The payload holds objects that weights-only loading refuses to unpickle (code could run)."""


class KeyMissingError(IncompatibleCheckpointError):
    """The payload is encrypted and none of the configured keys is the one it was encrypted with;
    or, resolving ``"last"``/``"best"``, every checkpoint there was saved under a key (or without
    one) that the configured signer or encryptor does not accept."""


class DeviceUnavailableError(IncompatibleCheckpointError):
    """Loading would put tensors on a device this machine lacks: a CUDA checkpoint with
    ``map_location=None``, or ``map_location="cuda"`` without a GPU. Pass ``map_location="cpu"``."""


class ShardedCheckpointError(IncompatibleCheckpointError):
    """A sharded checkpoint (a directory of shards) was asked for as one file: resume it under a
    sharded strategy, or consolidate it (``lightning_ckpt.sharded.consolidate``, ``lightning-ckpt export``)."""


class MonitorNotFoundError(CheckpointError, KeyError):
    """The monitored quantity is not among the logged metrics."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class RanksDisagreeError(CheckpointError, RuntimeError):
    """The processes of a multi-process run disagree on a save decision: a monitored value that
    differs between ranks (logged without ``sync_dist=True``), or a rank that never reached it."""


class NameTakenError(CheckpointError, FileExistsError):
    """The name holds a file this save may not replace: one we did not write, or a checkpoint
    committed by another callback or by another training history (save under ``-vN`` instead)."""


class StorageError(CheckpointError, OSError):
    """A storage operation failed; the message names the URL and the cause."""


class StoragePermissionError(StorageError, PermissionError):
    """The storage refused the operation (credentials, permissions)."""


class BucketNotFoundError(StorageError):
    """The bucket (or container) named in an object-store URL does not exist.

    Not a ``FileNotFoundError`` on purpose: callers that treat "not found" as "no checkpoint yet"
    must not start a run from scratch because the bucket name is wrong.
    """


class UnsupportedURLError(StorageError, ValueError):
    """No fsspec implementation is available for the URL's protocol."""


class CheckpointWarning(UserWarning):
    """Something was skipped or retried; training goes on, but a human should know."""


if "lightning.fabric.utilities.exceptions" in sys.modules:  # Lightning is loaded already: no cost
    adopt_lightning_base()
