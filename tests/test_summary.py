"""``lightning_ckpt.contents``: what ``lightning-ckpt inspect`` reports, as a function of the API.

``saved`` (tests/conftest.py) is a run directory with one committed ``a.ckpt`` of ``small_payload()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import flip_byte, leave_pending, small_payload

from lightning_ckpt import (
    CheckpointManager,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KeyMissingError,
    UncommittedCheckpointError,
    contents,
)
from lightning_ckpt.cli import main
from lightning_ckpt.security import Encryptor

KEY = "0" * 64


def test_contents_is_what_inspect_json_prints(saved: CheckpointManager, capsys: pytest.CaptureFixture[str]) -> None:
    report = contents(saved.url_of("a.ckpt"))
    assert main(["inspect", saved.url_of("a.ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report, default=str))
    assert report["verified"] is True and report["error"] is None
    assert report["manifest"]["global_step"] == 8 and report["manifest"]["metrics"] == {"val_loss": 0.5}
    body = report["payload"]
    assert body["lightning"] == {"epoch": 1, "global_step": 8, "pytorch-lightning_version": "2.6.6"}
    assert body["state_dict"]["count"] == 2 and body["state_dict"]["bytes"] == (12 + 3) * 4
    assert body["optimizer_states"][0]["state_keys"] == ["exp_avg", "step"]
    assert body["optimizer_states"][0]["step"] == 8.0
    assert body["lr_schedulers"] == [{"step_size": 3, "last_epoch": 1, "last_lr": [0.1]}]
    assert body["hyper_parameters"] == {"hidden": 4}


def test_contents_through_an_open_manager_and_on_memory(saved: CheckpointManager, memory_dir: str) -> None:
    assert contents("a.ckpt", manager=saved) == contents(saved.url_of("a.ckpt"))
    url = f"{memory_dir}/run"
    CheckpointManager(url).save(small_payload(16), "b.ckpt", global_step=16)
    assert contents(f"{url}/b.ckpt")["payload"]["lightning"]["global_step"] == 16


def test_contents_refuses_what_does_not_verify(saved: CheckpointManager, tmp_path: Path) -> None:
    flip_byte(saved.url, "a.ckpt")
    with pytest.raises(CorruptCheckpointError):
        contents(saved.url_of("a.ckpt"))
    with pytest.raises(CheckpointNotFoundError):
        contents(saved.url_of("nope.ckpt"))
    leave_pending(saved.url, "c.ckpt")
    with pytest.raises(UncommittedCheckpointError):
        contents(saved.url_of("c.ckpt"))


def test_contents_of_an_encrypted_checkpoint_needs_its_key(tmp_path: Path) -> None:
    enc = Encryptor(KEY)
    manager = CheckpointManager(str(tmp_path / "run"), encryptor=enc)
    manager.save(small_payload(), "e.ckpt", global_step=8)
    with pytest.raises(KeyMissingError):
        contents(manager.url_of("e.ckpt"))
    assert contents(manager.url_of("e.ckpt"), encryptor=enc)["payload"]["state_dict"]["count"] == 2


def test_contents_of_a_plain_file_says_it_is_unverified(tmp_path: Path) -> None:
    torch.save(small_payload(), tmp_path / "plain.ckpt")
    with pytest.warns(UserWarning):
        report = contents(str(tmp_path / "plain.ckpt"))
    assert report["manifest"] is None and report["verified"] is False
    assert report["payload"]["state_dict"]["count"] == 2
