"""Bad inputs: damaged, foreign, hostile or misnamed checkpoints give specific errors and harm nothing.

Each case checks the specific error, that it is also the builtin a caller would naturally catch,
and that the directory is byte-for-byte the same afterwards (nothing deleted or overwritten).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TinyModel, fit
from torch import nn

from lightning_ckpt import (
    CheckpointCallback,
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
    StoragePermissionError,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
    UnsupportedURLError,
    load_checkpoint,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and directory under ``root`` with its bytes (None for directories)."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return out


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    m = CheckpointManager(str(tmp_path / "ck"))
    m.save({"w": torch.arange(1000.0)}, "a.ckpt", global_step=1)
    m.save({"w": torch.arange(2000.0)}, "b.ckpt", global_step=2)
    return tmp_path / "ck"


class Unchanged:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __enter__(self) -> None:
        self.before = snapshot(self.root)

    def __exit__(self, *exc: object) -> None:
        assert snapshot(self.root) == self.before


def refused(root: Path, name: str, error: type[BaseException], builtin: type[BaseException], match: str = "") -> Any:
    manager = CheckpointManager(str(root))
    with Unchanged(root), pytest.raises(error, match=match) as info:
        manager.load(name)
    assert isinstance(info.value, builtin) and isinstance(info.value, CheckpointError)
    assert name in str(info.value)
    return info.value


def test_a_truncated_payload(ckdir: Path) -> None:
    data = (ckdir / "b.ckpt").read_bytes()
    (ckdir / "b.ckpt").write_bytes(data[: len(data) // 2])
    refused(ckdir, "b.ckpt", CorruptCheckpointError, ValueError, "truncated")
    with Unchanged(ckdir), pytest.warns(CheckpointWarning, match="skipping damaged"):
        assert CheckpointManager(str(ckdir)).latest().name == "a.ckpt"


def test_a_flipped_byte(ckdir: Path) -> None:
    data = bytearray((ckdir / "b.ckpt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (ckdir / "b.ckpt").write_bytes(bytes(data))
    refused(ckdir, "b.ckpt", CorruptCheckpointError, ValueError, "xxh3-128 digest")


def test_an_empty_payload(ckdir: Path) -> None:
    (ckdir / "b.ckpt").write_bytes(b"")
    refused(ckdir, "b.ckpt", CorruptCheckpointError, ValueError, "0 bytes")


def test_an_empty_file_without_a_manifest(ckdir: Path) -> None:
    (ckdir / "plain.ckpt").write_bytes(b"")
    with pytest.warns(CheckpointWarning, match="unverified"):
        refused(ckdir, "plain.ckpt", CorruptCheckpointError, ValueError, "empty")


def test_a_text_file_without_a_manifest_is_named_for_what_it_is(ckdir: Path) -> None:
    # torch's unpickler answered this one with a bare IndexError ("pop from empty list")
    (ckdir / "notes.ckpt").write_text("this is not a checkpoint\n")
    with pytest.warns(CheckpointWarning, match="unverified"):
        refused(ckdir, "notes.ckpt", CorruptCheckpointError, ValueError, "not a torch checkpoint")


def test_a_damaged_manifest(ckdir: Path) -> None:
    (ckdir / "b.ckpt.manifest.json").write_bytes(b'{"format": "lightning-ckpt", "form')
    refused(ckdir, "b.ckpt", CorruptCheckpointError, ValueError, "not valid JSON")


def test_a_directory_where_a_checkpoint_should_be(ckdir: Path) -> None:
    (ckdir / "d.ckpt").mkdir()
    with pytest.warns(CheckpointWarning, match="unverified"):  # no manifest beside it
        err = refused(ckdir, "d.ckpt", StorageError, OSError, "directory")
    assert not isinstance(err, CheckpointNotFoundError)  # it is there, it is just not a file


def test_a_directory_where_the_payload_should_be(ckdir: Path) -> None:
    os.unlink(ckdir / "b.ckpt")
    (ckdir / "b.ckpt").mkdir()
    refused(ckdir, "b.ckpt", CorruptCheckpointError, ValueError, "directory")  # its manifest describes a file


def test_a_newer_format_version(ckdir: Path) -> None:
    path = ckdir / "b.ckpt.manifest.json"
    raw = json.loads(path.read_bytes())
    raw["format_version"] = 99
    path.write_text(json.dumps(raw))
    refused(ckdir, "b.ckpt", IncompatibleCheckpointError, ValueError, "format 99, newer")
    with Unchanged(ckdir), pytest.warns(CheckpointWarning, match="format 99"):
        assert [m.name for m in CheckpointManager(str(ckdir)).manifests()] == ["a.ckpt"]


class Armed:
    """Unpickling this runs ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    manager = CheckpointManager(str(tmp_path / "ck"))
    manager.save({"state_dict": {"w": torch.zeros(2)}, "payload": Armed(str(marker))}, "evil.ckpt")
    with Unchanged(tmp_path / "ck"):
        with pytest.raises(UnsafeCheckpointError, match="evil.ckpt.*weights-only") as info:
            manager.load("evil.ckpt")
        assert isinstance(info.value, ValueError)
        with pytest.raises(UnsafeCheckpointError):
            load_checkpoint(str(tmp_path / "ck" / "evil.ckpt"))
    assert not marker.exists()
    # the payload really is armed: trusting it explicitly runs the code
    manager.load("evil.ckpt", weights_only=False)
    assert marker.exists()


def test_an_unknown_url_protocol() -> None:
    with pytest.raises(UnsupportedURLError, match="nosuchproto://bucket/run") as info:
        CheckpointManager("nosuchproto://bucket/run")
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    with pytest.raises(UnsupportedURLError):
        CheckpointCallback(dirpath="nosuchproto://bucket/run")


def test_a_pending_leftover_named_explicitly(ckdir: Path) -> None:
    # what a save killed after its payload but before its commit leaves behind
    (ckdir / "c.ckpt").write_bytes((ckdir / "b.ckpt").read_bytes())
    (ckdir / "c.ckpt.pending").write_bytes(b'{"name": "c.ckpt"}')
    err = refused(ckdir, "c.ckpt", UncommittedCheckpointError, FileNotFoundError, "never committed")
    assert isinstance(err, CheckpointNotFoundError)
    manager = CheckpointManager(str(ckdir))
    with Unchanged(ckdir), pytest.raises(UncommittedCheckpointError):
        manager.verify("c.ckpt")
    with Unchanged(ckdir):
        assert [m.name for m in manager.manifests()] == ["a.ckpt", "b.ckpt"]


def test_a_missing_checkpoint(ckdir: Path) -> None:
    refused(ckdir, "nope.ckpt", CheckpointNotFoundError, FileNotFoundError, "no checkpoint")


class WiderModel(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1), nn.Linear(1, 1))


def test_a_checkpoint_of_a_different_model(tmp_path: Path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path / "ck"), save_top_k=-1)
    fit(cb, max_epochs=1)
    path = cb.manager.url_of("epoch=0-step=8.ckpt")
    from helpers import data, trainer

    other = CheckpointCallback(dirpath=str(tmp_path / "ck"), save_top_k=-1)
    with Unchanged(tmp_path / "ck"), pytest.raises(IncompatibleCheckpointError, match=r"net\.0\.weight") as info:
        trainer([other], max_epochs=2).fit(WiderModel(), *data(), ckpt_path=path)
    assert isinstance(info.value, ValueError)
    assert "net.3" in str(info.value)


# -- S3 with missing or wrong credentials -------------------------------------------------------


def test_s3_with_wrong_credentials(s3_server: Any, s3_bucket_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket_url
    good = CheckpointManager(f"{url}/run", options)
    good.save({"w": torch.ones(3)}, "a.ckpt", global_step=1)
    before = sorted(s3_server.filesystem().find(url))
    bad_options = s3_server.storage_options_for("lckpt-admin", "not-the-secret")
    bad = CheckpointManager(f"{url}/run", bad_options)
    with pytest.raises(StoragePermissionError, match=f"{url}/run") as info:
        bad.manifests()
    assert isinstance(info.value, PermissionError) and isinstance(info.value, StorageError)
    with pytest.raises(StoragePermissionError, match="a.ckpt"):
        bad.load("a.ckpt")
    with pytest.raises(StoragePermissionError):
        bad.save({"w": torch.zeros(3)}, "b.ckpt")
    assert sorted(s3_server.filesystem().find(url)) == before  # nothing written, nothing deleted
    assert torch.equal(good.load("a.ckpt")["w"], torch.ones(3))


def test_s3_with_an_unknown_key(s3_server: Any, s3_bucket_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket_url
    CheckpointManager(f"{url}/run", options).save({"w": torch.ones(3)}, "a.ckpt", global_step=1)
    bad = CheckpointManager(f"{url}/run", s3_server.storage_options_for("nobody", "nothing"))
    with pytest.raises(StorageError, match=f"{url}/run") as info:
        bad.latest()
    assert isinstance(info.value, OSError) and not isinstance(info.value, CheckpointNotFoundError)
    with pytest.raises(StorageError, match="a.ckpt"):
        load_checkpoint(f"{url}/run/a.ckpt", s3_server.storage_options_for("nobody", "nothing"))
