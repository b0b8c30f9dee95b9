"""``lightning_ckpt.export``: one standalone file from a verified checkpoint, never over a committed one."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch
from checkpoints import flip_byte, leave_pending, small_payload
from safetensors.torch import load_file

from lightning_ckpt import (
    CheckpointManager,
    ConfigurationError,
    CorruptCheckpointError,
    Storage,
    export,
)
from lightning_ckpt.cli import main
from lightning_ckpt.exporting import ExportResult


def test_export_safetensors_with_a_cast(saved: CheckpointManager, tmp_path: Path) -> None:
    result = export(saved.url_of("a.ckpt"), str(tmp_path / "w.safetensors"), dtype="bfloat16")
    assert result == ExportResult(str(tmp_path / "w.safetensors"), "safetensors", 2, (12 + 3) * 2, "bfloat16")
    weights = load_file(str(tmp_path / "w.safetensors"))
    expected = small_payload()["state_dict"]
    assert set(weights) == set(expected)
    for name, t in weights.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, expected[name].to(torch.bfloat16))


def test_export_ckpt_is_the_whole_checkpoint_as_one_plain_file(saved: CheckpointManager, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "standalone.ckpt"
    result = export("a.ckpt", str(out), format="ckpt", manager=saved)
    assert result.format == "ckpt" and result.tensors == 2
    back = torch.load(out, weights_only=True)
    original = small_payload()
    assert set(back) == set(original)
    assert torch.equal(back["state_dict"]["net.weight"], original["state_dict"]["net.weight"])
    assert torch.equal(back["optimizer_states"][0]["state"][0]["exp_avg"], torch.ones(3, 4))
    assert back["lr_schedulers"] == original["lr_schedulers"] and back["global_step"] == 8
    assert sorted(p.name for p in out.parent.iterdir()) == ["standalone.ckpt"]  # no manifest: a plain file


def test_export_torch_weights_to_a_url(saved: CheckpointManager, memory_dir: str) -> None:
    target = f"{memory_dir}/out/w.pt"
    result = export(saved.url_of("a.ckpt"), target, format="torch", storage_options={})
    assert result.url.endswith(target.removeprefix("memory://")) and result.format == "torch"
    with fsspec.open(target, "rb") as f:
        weights = torch.load(f, weights_only=True)
    assert torch.equal(weights["net.weight"], small_payload()["state_dict"]["net.weight"])


@pytest.mark.parametrize("out_name", ["a.ckpt", "a.ckpt.manifest.json", "a.ckpt.pending"])
def test_export_never_writes_over_a_committed_checkpoint_or_our_files(saved: CheckpointManager,
                                                                     out_name: str) -> None:
    before = {name: Storage(saved.url).read_bytes(name) for name in ("a.ckpt", "a.ckpt.manifest.json")}
    for fmt in ("safetensors", "torch", "ckpt"):
        with pytest.raises(ConfigurationError, match="refusing to write"):
            export(saved.url_of("a.ckpt"), saved.url_of(out_name), format=fmt)
    assert {name: Storage(saved.url).read_bytes(name) for name in before} == before
    saved.verify("a.ckpt")


def test_export_never_writes_over_a_save_in_progress(saved: CheckpointManager) -> None:
    # a save of c.ckpt that began (its marker is there) and has not committed: the payload it is
    # writing must not be replaced, or its manifest would commit our bytes under its digest
    leave_pending(saved.url, "c.ckpt")
    half = Storage(saved.url).read_bytes("c.ckpt")
    for fmt in ("safetensors", "ckpt"):
        with pytest.raises(ConfigurationError, match="in progress or was interrupted"):
            export(saved.url_of("a.ckpt"), saved.url_of("c.ckpt"), format=fmt)
    assert Storage(saved.url).read_bytes("c.ckpt") == half


def test_export_rejects_bad_arguments_before_reading(saved: CheckpointManager, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "x.ckpt")
    with pytest.raises(ConfigurationError, match="format"):
        export(missing, str(tmp_path / "o"), format="onnx")
    with pytest.raises(ConfigurationError, match="dtype"):
        export(missing, str(tmp_path / "o"), dtype="int8")
    with pytest.raises(ConfigurationError, match="dtype"):
        export(missing, str(tmp_path / "o"), format="ckpt", dtype="float16")


@pytest.mark.parametrize("output", ["", "out/", "memory://", "memory://bucket/"])
def test_export_output_must_name_a_file(saved: CheckpointManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        output: str) -> None:
    # "out/" once wrote a file named "out", and "memory://" a local file named "memory:"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="must name a file"):
        export(saved.url_of("a.ckpt"), output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_of_a_damaged_checkpoint_writes_nothing(saved: CheckpointManager, tmp_path: Path) -> None:
    flip_byte(saved.url, "a.ckpt")
    with pytest.raises(CorruptCheckpointError):
        export(saved.url_of("a.ckpt"), str(tmp_path / "w.safetensors"))
    assert not (tmp_path / "w.safetensors").exists()


def test_cli_export_ckpt(saved: CheckpointManager, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "full.ckpt"
    assert main(["export", saved.url_of("a.ckpt"), "--format", "ckpt", "-o", str(out)]) == 0
    assert f"wrote {out}: 2 tensors" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["hyper_parameters"] == {"hidden": 4}
    assert main(["export", saved.url_of("a.ckpt"), "--format", "ckpt", "--dtype", "float16", "-o", str(out)]) == 2
    assert "error: dtype must be" in capsys.readouterr().err


def test_an_exported_ckpt_resumes_training_with_stock_lightning(tmp_path: Path) -> None:
    from helpers import fit
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_ckpt import CheckpointCallback

    cb = CheckpointCallback(dirpath=str(tmp_path / "run"), save_last=True)
    trainer, _ = fit(cb, max_epochs=2)
    standalone = tmp_path / "handed-over" / "run.ckpt"
    export(str(tmp_path / "run" / "last.ckpt"), str(standalone), format="ckpt")
    # a Trainer without lightning-ckpt's callback or IO: the file is an ordinary Lightning checkpoint
    resumed, _ = fit(ModelCheckpoint(dirpath=str(tmp_path / "stock")), max_epochs=3, ckpt_path=str(standalone))
    assert resumed.global_step == 24 and resumed.current_epoch == 3
    saved = torch.load(standalone, weights_only=True)
    assert saved["global_step"] == trainer.global_step == 16 and saved["optimizer_states"]
