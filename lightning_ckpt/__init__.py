"""lightning_ckpt: crash-safe, verified PyTorch Lightning checkpoints on any fsspec storage.

Add :class:`CheckpointCallback` to a ``Trainer`` and resume with ``trainer.fit(ckpt_path="last")``.
:class:`CheckpointManager` and :func:`load_checkpoint` work without Lightning. Every error is a
:class:`CheckpointError`.
"""

from lightning_ckpt._version import __version__
from lightning_ckpt.callback import CheckpointCallback
from lightning_ckpt.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    KeyMissingError,
    MonitorNotFoundError,
    StorageError,
    StoragePermissionError,
    TamperedCheckpointError,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
    UnsupportedURLError,
)
from lightning_ckpt.integrity import Manifest
from lightning_ckpt.io import ManagedCheckpointIO
from lightning_ckpt.manager import CheckpointManager, SaveResult, load_checkpoint
from lightning_ckpt.policies import EveryInterval, EveryNEpochs, EveryNSteps, KeepAll, KeepLatest, KeepTopK
from lightning_ckpt.storage import RetryPolicy, Storage

__all__ = [
    "BucketNotFoundError",
    "CheckpointCallback",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "ConfigurationError",
    "CorruptCheckpointError",
    "EveryInterval",
    "EveryNEpochs",
    "EveryNSteps",
    "IncompatibleCheckpointError",
    "KeepAll",
    "KeepLatest",
    "KeepTopK",
    "KeyMissingError",
    "ManagedCheckpointIO",
    "Manifest",
    "MonitorNotFoundError",
    "RetryPolicy",
    "SaveResult",
    "Storage",
    "StorageError",
    "StoragePermissionError",
    "TamperedCheckpointError",
    "UncommittedCheckpointError",
    "UnsafeCheckpointError",
    "UnsupportedURLError",
    "__version__",
    "load_checkpoint",
]
