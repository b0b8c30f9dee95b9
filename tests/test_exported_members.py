"""__all__ is honest: everything exported exists, and every public name is exported."""

import subprocess
import sys

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


def test_lazy_names_are_listed_and_resolve_to_their_modules() -> None:
    assert set(lightning_ckpt.__all__) <= set(dir(lightning_ckpt))
    for name, module in lightning_ckpt._LAZY.items():
        assert name in lightning_ckpt.__all__
        assert getattr(lightning_ckpt, name) is getattr(sys.modules[module], name)


def _imported_after(statement: str) -> set[str]:
    """Top-level packages in sys.modules after ``statement`` runs in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(result.stdout.split())


def test_the_cli_imports_neither_lightning_nor_torch() -> None:
    loaded = _imported_after("import lightning_ckpt.cli")
    assert "lightning_ckpt" in loaded
    assert "lightning" not in loaded and "pytorch_lightning" not in loaded
    assert "torch" not in loaded


def test_names_are_imported_on_first_use() -> None:
    assert "lightning" not in _imported_after("import lightning_ckpt; lightning_ckpt.CheckpointError")
    assert "lightning" in _imported_after("from lightning_ckpt import CheckpointCallback")
