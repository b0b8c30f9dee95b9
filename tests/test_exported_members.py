"""__all__ is honest: everything exported exists, and every public name is exported."""

import lightning_ckpt
from lightning_ckpt import errors


def test_all_names_exist() -> None:
    for name in lightning_ckpt.__all__:
        assert hasattr(lightning_ckpt, name), name


def test_every_public_member_is_exported() -> None:
    public = {
        name
        for name, value in vars(lightning_ckpt).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("lightning_ckpt")
    }
    assert public <= set(lightning_ckpt.__all__)


def test_every_error_is_exported_and_rooted() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert name in lightning_ckpt.__all__
        if name != "CheckpointWarning":
            assert issubclass(cls, lightning_ckpt.CheckpointError)
