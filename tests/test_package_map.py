"""The issue #16 'Done when' rules for every module of lightning_ckpt, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lightning_ckpt

PACKAGE = Path(lightning_ckpt.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_is_small_and_its_docstring_says_what_it_owns_and_must_not_do(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= 600, f"{path} is over 600 lines: split it by responsibility"
    if len(text.splitlines()) <= 10:  # _version.py, cli/__main__.py: one line each
        return
    doc = " ".join((ast.get_docstring(ast.parse(text)) or "").split()).lower()
    assert "own" in doc and "must not" in doc, f"{path}: say what it owns and what it must not do"
