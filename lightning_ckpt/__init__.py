"""lightning_ckpt: crash-safe, verified PyTorch Lightning checkpoints on any fsspec storage.

Add :class:`CheckpointCallback` to a ``Trainer`` and resume with ``trainer.fit(ckpt_path="last")``.
:class:`CheckpointManager` and :func:`load_checkpoint` work without Lightning. Every error is a
:class:`CheckpointError`.

Names are imported on first use (PEP 562), so ``import lightning_ckpt`` — and the
``lightning-ckpt`` command line, which starts with it — costs neither Lightning nor torch until
something that needs them is touched. ``from lightning_ckpt import CheckpointCallback``,
``dir(lightning_ckpt)`` and ``__all__`` behave as with eager imports.

Owns: the public API (``__all__``) and where each name lives. Must not: define behaviour of its
own or import torch, Lightning or fsspec at import time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_ckpt._version import __version__
from lightning_ckpt.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    IncompatibleCheckpointError,
    KeyMissingError,
    MonitorNotFoundError,
    NameTakenError,
    RanksDisagreeError,
    ShardedCheckpointError,
    StorageError,
    StoragePermissionError,
    TamperedCheckpointError,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
    UnsupportedURLError,
)

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from lightning_ckpt.callback import CheckpointCallback
    from lightning_ckpt.exporting import export
    from lightning_ckpt.incremental import Incremental
    from lightning_ckpt.integrity import Manifest
    from lightning_ckpt.io import ManagedCheckpointIO
    from lightning_ckpt.manager import CheckpointManager, SaveResult, load_checkpoint
    from lightning_ckpt.policies import (
        EveryInterval,
        EveryNEpochs,
        EveryNSteps,
        KeepAll,
        KeepLatest,
        KeepTopK,
        OverheadBudget,
    )
    from lightning_ckpt.sharded import ShardedCheckpointer, consolidate
    from lightning_ckpt.storage import RetryPolicy, Storage
    from lightning_ckpt.summary import contents

#: public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "CheckpointCallback": "lightning_ckpt.callback",
    "CheckpointManager": "lightning_ckpt.manager",
    "EveryInterval": "lightning_ckpt.policies",
    "EveryNEpochs": "lightning_ckpt.policies",
    "EveryNSteps": "lightning_ckpt.policies",
    "Incremental": "lightning_ckpt.incremental",
    "KeepAll": "lightning_ckpt.policies",
    "KeepLatest": "lightning_ckpt.policies",
    "KeepTopK": "lightning_ckpt.policies",
    "ManagedCheckpointIO": "lightning_ckpt.io",
    "Manifest": "lightning_ckpt.integrity",
    "OverheadBudget": "lightning_ckpt.policies",
    "RetryPolicy": "lightning_ckpt.storage",
    "SaveResult": "lightning_ckpt.manager",
    "ShardedCheckpointer": "lightning_ckpt.sharded",
    "Storage": "lightning_ckpt.storage",
    "consolidate": "lightning_ckpt.sharded",
    "contents": "lightning_ckpt.summary",
    "export": "lightning_ckpt.exporting",
    "load_checkpoint": "lightning_ckpt.manager",
}

__all__ = [
    "BucketNotFoundError",
    "CheckpointCallback",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "ConfigurationError",
    "CorruptCheckpointError",
    "DeviceUnavailableError",
    "EveryInterval",
    "EveryNEpochs",
    "EveryNSteps",
    "IncompatibleCheckpointError",
    "Incremental",
    "KeepAll",
    "KeepLatest",
    "KeepTopK",
    "KeyMissingError",
    "ManagedCheckpointIO",
    "Manifest",
    "MonitorNotFoundError",
    "NameTakenError",
    "RanksDisagreeError",
    "OverheadBudget",
    "RetryPolicy",
    "SaveResult",
    "ShardedCheckpointError",
    "ShardedCheckpointer",
    "Storage",
    "StorageError",
    "StoragePermissionError",
    "TamperedCheckpointError",
    "UncommittedCheckpointError",
    "UnsafeCheckpointError",
    "UnsupportedURLError",
    "__version__",
    "consolidate",
    "contents",
    "export",
    "load_checkpoint",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
