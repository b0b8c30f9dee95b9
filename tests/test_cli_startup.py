"""What ``lightning-ckpt`` imports to answer: the commands that only read manifests stay light.

``docs/cli.md`` promises that only the commands reading checkpoint payloads import torch, and that
none imports Lightning. Each command runs in a fresh interpreter, which then reports the modules
it imported; the test counts modules, never seconds (a shared CI machine makes timings noise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ckpt import CheckpointManager

#: top-level packages the light commands must not import (each costs from 0.3 s to 2 s)
HEAVY = {"torch", "lightning", "pytorch_lightning", "numpy", "s3fs", "botocore", "aiobotocore", "gcsfs",
         "adlfs", "cryptography", "safetensors"}  # fmt: skip
#: about 300 today (rich, fsspec, asyncio and the standard library); torch alone brings 1,200 more
MODULE_BUDGET = 450

_PROBE = """
import json, sys
from lightning_ckpt.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help, --version
    code = exc.code
print(json.dumps({"exit": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def imported_by(*argv: str, cwd: Path) -> tuple[int, set[str], int]:
    """(exit code, top-level packages, number of modules) after ``lightning-ckpt argv`` in a new process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    modules = report["modules"]
    return report["exit"], {m.split(".")[0] for m in modules}, len(modules)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("startup")
    manager = CheckpointManager(str(root / "run"))
    for epoch in range(3):
        manager.save({"w": torch.full((4,), float(epoch))}, f"epoch={epoch}.ckpt", epoch=epoch,
                     global_step=8 * (epoch + 1), metrics={"val_loss": 1.0 / (epoch + 1)}, monitor="val_loss",
                     mode="min")
    return root


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["ls", "run"],
        ["ls", "run", "--verify"],
        ["verify", "run"],
        ["verify", "run/epoch=1.ckpt"],
        ["prune", "run", "--keep-last", "1", "--dry-run"],
        ["plan", "--save-seconds", "20", "--every", "30m", "--train-hours", "168"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_commands_that_read_no_payload_import_neither_torch_nor_storage_backends(
    argv: list[str], run_dir: Path
) -> None:
    code, packages, count = imported_by(*argv, cwd=run_dir)
    assert code == 0
    assert not packages & HEAVY, f"`lightning-ckpt {' '.join(argv)}` imported {sorted(packages & HEAVY)}"
    assert count < MODULE_BUDGET


def test_a_command_that_reads_a_payload_imports_torch_but_not_lightning(run_dir: Path) -> None:
    # the other side of the promise, and proof that the probe sees what a command imports
    code, packages, count = imported_by("inspect", "run/epoch=2.ckpt", cwd=run_dir)
    assert code == 0
    assert "torch" in packages
    assert not packages & {"lightning", "pytorch_lightning", "s3fs"}
    assert count > MODULE_BUDGET
