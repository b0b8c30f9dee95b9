"""The exception tree: one root, and each subclass catchable as its natural builtin."""

import pytest

from lightning_ckpt import errors


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.ConfigurationError, ValueError),
        (errors.CheckpointNotFoundError, FileNotFoundError),
        (errors.UncommittedCheckpointError, FileNotFoundError),
        (errors.CorruptCheckpointError, ValueError),
        (errors.IncompatibleCheckpointError, ValueError),
        (errors.UnsafeCheckpointError, ValueError),
        (errors.MonitorNotFoundError, KeyError),
        (errors.StorageError, OSError),
        (errors.StoragePermissionError, PermissionError),
        (errors.UnsupportedURLError, ValueError),
    ],
)
def test_subclasses_root_and_builtin(cls: type, builtin: type) -> None:
    assert issubclass(cls, errors.CheckpointError)
    assert issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("x")


def test_monitor_not_found_message_is_not_quoted() -> None:
    assert str(errors.MonitorNotFoundError("no val_loss")) == "no val_loss"
