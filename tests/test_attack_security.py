"""A hostile reviewer's attacks on what is read from storage (issue 15's second pass).

The attacker can write the checkpoint directory and re-hash any unsigned manifest. Every attack
must end in a typed error, never in code run, a file outside the checkpoint read, or a traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from lightning_ckpt import CheckpointManager
from lightning_ckpt.cli import main
from lightning_ckpt.errors import CorruptCheckpointError, UnsafeCheckpointError
from lightning_ckpt.integrity import Manifest, manifest_name
from lightning_ckpt.sharded import ShardedCheckpointer, consolidate
from lightning_ckpt.unpickle import load_dcp_metadata

NAME = "x.ckpt"


class _Armed:
    """Pickles as a call to ``os.system`` that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def armed_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A sharded checkpoint whose DCP index is legitimate but one non-tensor item runs code.

    Every DCP class in ``.metadata`` is on the allow-list: DCP itself stores any non-tensor value
    as a ``torch.save`` blob, which its planners read with ``torch.load(weights_only=False)``.
    """
    root = tmp_path_factory.mktemp("armed")
    marker = root / "PWNED"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ShardedCheckpointer(CheckpointManager(str(root / "run"))).save(
            {"state_dict": {"w": torch.ones(3)}, "evil": _Armed(marker)}, {"epoch": 0}, NAME, epoch=0, global_step=1)
    return root / "run", marker


@pytest.fixture
def armed(armed_template: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    run, marker = armed_template
    shutil.copytree(run, tmp_path / "run")
    marker.unlink(missing_ok=True)
    return tmp_path / "run", marker


def _rehash(run: Path) -> None:
    """What an attacker does after changing files: a fresh, self-consistent unsigned manifest."""
    old = json.loads((run / manifest_name(NAME)).read_text())
    table = {}
    for f in sorted((run / NAME).iterdir()):
        import hashlib

        table[f.name] = (f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest())
    manifest = Manifest.for_files(NAME, table, epoch=old["epoch"], global_step=old["global_step"])
    (run / manifest_name(NAME)).write_bytes(manifest.to_json())


def _edit_storage_paths(run: Path, path: str) -> None:
    meta_file = run / NAME / ".metadata"
    with open(meta_file, "rb") as f:
        metadata = load_dcp_metadata(f, "test")
    for info in metadata.storage_data.values():
        info.relative_path = path
    meta_file.write_bytes(pickle.dumps(metadata))
    _rehash(run)


def test_a_non_tensor_item_of_a_sharded_checkpoint_never_runs_code(armed: tuple[Path, Path]) -> None:
    run, marker = armed
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        consolidate(CheckpointManager(str(run)), NAME)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["inspect", "export", "diff"])
def test_the_cli_on_an_armed_sharded_checkpoint(armed: tuple[Path, Path], command: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run, marker = armed
    url = str(run / NAME)
    argv = {"inspect": [url], "export": [url, "--output", str(run.parent / "out.pt")], "diff": [url, url]}[command]
    code = main([command, *argv])
    out, err = capsys.readouterr()
    assert not marker.exists()
    assert not (run.parent / "out.pt").exists()
    assert "Traceback" not in out + err
    if command != "diff":  # diff of a checkpoint with itself compares manifests only
        assert code == 1, (out, err)
        assert "posix.system" in out + err


def test_a_sharded_load_into_a_model_never_runs_code(armed: tuple[Path, Path]) -> None:
    """The model's own key declared a blob in a forged index: DCP would torch.load it unrestricted."""
    run, marker = armed
    meta_file = run / NAME / ".metadata"
    with open(meta_file, "rb") as f:
        metadata = load_dcp_metadata(f, "test")
    sd = metadata.state_dict_metadata
    sd["state_dict.w"] = sd.pop("evil")
    storage = metadata.storage_data
    for index in list(storage):
        if index.fqn == "evil":
            storage[type(index)("state_dict.w", index.offset, index.index)] = storage.pop(index)
    meta_file.write_bytes(pickle.dumps(metadata))
    _rehash(run)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(UnsafeCheckpointError):
        ShardedCheckpointer(CheckpointManager(str(run))).load(NAME, module)
    assert not marker.exists()


@pytest.mark.parametrize("path", ["/etc/hostname", "../outside.distcp", "file:///etc/hostname", "unlisted.distcp"])
def test_a_dcp_index_pointing_outside_the_verified_files_is_corrupt(armed: tuple[Path, Path], path: str) -> None:
    run, _ = armed
    (run / "outside.distcp").write_bytes((run / NAME / "__0_0.distcp").read_bytes())
    shutil.copy(run / NAME / "__0_0.distcp", run / NAME / "unlisted.distcp")
    _edit_storage_paths(run, path)
    if path == "unlisted.distcp":  # copied in after the manifest was made: not verified
        os.unlink(run / NAME / "unlisted.distcp")
        _rehash(run)
        shutil.copy(run / NAME / "__0_0.distcp", run / NAME / "unlisted.distcp")
    with pytest.raises(CorruptCheckpointError, match="not a shard file"):
        consolidate(CheckpointManager(str(run)), NAME)


# -- encrypted payloads: chunks cut, reordered or spliced behind a re-hashed manifest -----------

def _encrypted_run(tmp_path: Path) -> tuple[CheckpointManager, Path, bytes]:
    from lightning_ckpt.security import Encryptor

    manager = CheckpointManager(str(tmp_path), encryptor=Encryptor(bytes(range(32)), chunk=1024))
    manager.save({"w": torch.arange(2000, dtype=torch.float32)}, "a.ckpt", epoch=0, global_step=1)
    manager.save({"w": torch.zeros(2000)}, "b.ckpt", epoch=0, global_step=2)
    return manager, tmp_path, (tmp_path / "b.ckpt").read_bytes()


def _replace_payload(run: Path, name: str, data: bytes) -> None:
    import hashlib

    (run / name).write_bytes(data)
    raw = json.loads((run / manifest_name(name)).read_text())
    raw["size"], raw["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (run / manifest_name(name)).write_text(json.dumps(raw))


@pytest.mark.parametrize("attack", ["drop-last", "drop-middle", "swap", "splice", "duplicate", "header-only"])
def test_a_tampered_encrypted_payload_never_loads(tmp_path: Path, attack: str) -> None:
    manager, run, other = _encrypted_run(tmp_path)
    data = (run / "a.ckpt").read_bytes()
    head, step = 9 + 8, 1024 + 16
    chunks = [data[i:i + step] for i in range(head, len(data), step)]
    assert len(chunks) > 4
    forged = {
        "drop-last": chunks[:-1],
        "drop-middle": chunks[:2] + chunks[3:],
        "swap": [chunks[1], chunks[0], *chunks[2:]],
        "splice": [chunks[0], other[head + step:head + 2 * step], *chunks[2:]],
        "duplicate": [chunks[0], *chunks],
        "header-only": [],
    }[attack]
    _replace_payload(run, "a.ckpt", data[:head] + b"".join(forged))
    with pytest.raises(CorruptCheckpointError):
        manager.load("a.ckpt")


@pytest.mark.parametrize("claim", ["huge", "uncovered"])
def test_a_dcp_index_claiming_a_tensor_bigger_than_its_files_is_corrupt(armed: tuple[Path, Path], claim: str,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A forged 64 GiB tensor would be allocated, and exported, whole."""
    run, _ = armed
    meta_file = run / NAME / ".metadata"
    with open(meta_file, "rb") as f:
        metadata = load_dcp_metadata(f, "test")
    md = metadata.state_dict_metadata["state_dict.w"]
    n = 1 << 34 if claim == "huge" else 4
    md.size = torch.Size([n])
    if claim == "huge":
        md.chunks[0].sizes = torch.Size([n])
    meta_file.write_bytes(pickle.dumps(metadata))
    _rehash(run)
    with pytest.raises(CorruptCheckpointError, match="bytes of its files" if claim == "huge" else "do not cover"):
        consolidate(CheckpointManager(str(run)), NAME)
    out = run.parent / "out.pt"
    assert main(["export", str(run / NAME), "--output", str(out)]) == 1
    assert "Traceback" not in "".join(capsys.readouterr()) and not out.exists()


@pytest.mark.parametrize("command", ["inspect", "export", "diff"])
def test_the_cli_on_a_sparse_tensor_says_one_line(tmp_path: Path, command: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """weights-only loading accepts sparse tensors; inspect/export/diff printed torch's dispatcher dump."""
    manager = CheckpointManager(str(tmp_path))
    manager.save({"state_dict": {"w": torch.ones(2).to_sparse()}}, "s.ckpt", epoch=0, global_step=1)
    manager.save({"state_dict": {"w": torch.ones(2)}}, "d.ckpt", epoch=0, global_step=1)
    url = str(tmp_path / "s.ckpt")
    argv = {"inspect": [url], "export": [url, "--output", str(tmp_path / "o.safetensors")],
            "diff": [url, str(tmp_path / "d.ckpt")]}[command]
    assert main([command, *argv]) == 1
    out, err = capsys.readouterr()
    assert "sparse" in out + err and "unexpected" not in out + err
    assert len(err.strip().splitlines()) <= 1


def test_a_signed_manifest_copied_to_another_name_does_not_validate_it(tmp_path: Path) -> None:
    """Name swap: the signature covers the name, so x's manifest and payload copied over y are refused."""
    from lightning_ckpt.security import Signer

    manager = CheckpointManager(str(tmp_path), signer=Signer(bytes(32)))
    manager.save({"w": torch.zeros(2)}, "old.ckpt", epoch=0, global_step=1)
    manager.save({"w": torch.ones(2)}, "new.ckpt", epoch=1, global_step=2)
    shutil.copy(tmp_path / "old.ckpt", tmp_path / "new.ckpt")
    shutil.copy(tmp_path / manifest_name("old.ckpt"), tmp_path / manifest_name("new.ckpt"))
    with pytest.raises(CorruptCheckpointError, match="describes 'old.ckpt'"):
        manager.load("new.ckpt")
    with pytest.warns(Warning, match="new.ckpt"):
        latest = manager.latest()
    assert latest is not None and latest.name == "old.ckpt"
