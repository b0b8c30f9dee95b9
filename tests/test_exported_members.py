"""__all__ is honest: everything exported exists, and every public name is exported.

The package imports its names lazily, so checks made inside the test process (where other tests
have imported half the package) can pass by luck: the checks of ``__all__`` run in fresh
interpreters too, with the package alone and with every module imported first (a submodule named
like one of the package's functions would replace that function on import).
"""

import json
import pkgutil
import subprocess
import sys

import pytest

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
    helpers = [name for name in errors.__all__ if not isinstance(getattr(errors, name), type)]
    assert helpers == ["adopt_lightning_base"]  # the one function beside the error tree
    for name in set(errors.__all__) - set(helpers):
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


@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_names_are_imported_on_first_use() -> None:
    assert "lightning" not in _imported_after("import lightning_ckpt; lightning_ckpt.CheckpointError")
    assert "lightning" in _imported_after("from lightning_ckpt import CheckpointCallback")


def _public_modules() -> list[str]:
    """Every module of the package a user may import (private ones and ``__main__`` left out)."""
    found = ["lightning_ckpt"]
    for info in pkgutil.walk_packages(lightning_ckpt.__path__, "lightning_ckpt."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            found.append(info.name)
    return sorted(found)


_FRESH = """
import importlib, json, sys, types
first, modules = sys.argv[1], sys.argv[2:]
import lightning_ckpt
if first == "modules":  # every module imported before any lazy name resolves
    for name in modules:
        importlib.import_module(name)
report = {}
for name in modules:
    module = importlib.import_module(name)
    listed = list(getattr(module, "__all__", None) or [])
    broken = [n for n in listed if not hasattr(module, n) or isinstance(getattr(module, n), types.ModuleType)]
    # a public class or function defined in the module itself is part of its interface
    unlisted = sorted(
        n for n, v in vars(module).items()
        if not n.startswith("_") and n not in listed and isinstance(v, type | types.FunctionType)
        and getattr(v, "__module__", None) == name
    )
    report[name] = {"has_all": hasattr(module, "__all__"), "broken": broken, "unlisted": unlisted}
print(json.dumps(report))
"""


@pytest.mark.parametrize("first", ["names", "modules"])
def test_every_module_all_is_honest_in_a_fresh_interpreter(first: str) -> None:
    modules = _public_modules()
    result = subprocess.run([sys.executable, "-c", _FRESH, first, *modules], capture_output=True, text=True,
                            timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == set(modules)
    assert [m for m, r in report.items() if not r["has_all"]] == []
    assert {m: r["broken"] for m, r in report.items() if r["broken"]} == {}
    assert {m: r["unlisted"] for m, r in report.items() if r["unlisted"]} == {}


def test_the_api_functions_are_functions_after_the_cli_imported_their_modules() -> None:
    # `lightning-ckpt export` imports lightning_ckpt.exporting; `from lightning_ckpt import export`
    # must still give the function, not a module
    code = ("import lightning_ckpt.cli, lightning_ckpt.summary, lightning_ckpt.exporting, types; "
            "from lightning_ckpt import contents, export; "
            "print(callable(contents) and callable(export) and not isinstance(export, types.ModuleType))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "True"
