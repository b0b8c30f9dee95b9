"""End-to-end tests of the MNIST example on scikit-learn's bundled digits, offline.

They cover the data module (shapes, dtypes, the seeded split, the fallback from MNIST with its
one message, made hermetic by replacing the network probe), the model's output shape, the
shipped YAML configs, the train-interrupt-resume demo, and the ``LightningCLI`` entry point run
on the same config: a one-epoch ``fit`` that starts fresh, a second ``fit`` with more epochs that
resumes from the first run's last checkpoint through ``ckpt_path: last``, and the first command
again, which has nothing left to train.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from examples.mnist import data as mnist_data
from examples.mnist.data import MNISTDataModule, MNISTUnavailable
from examples.mnist.demo import main as demo_main
from examples.mnist.model import MNISTClassifier
from examples.mnist.train import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mnist.yaml"
S3_CONFIG = REPO / "configs" / "mnist_s3.yaml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where torchvision is installed, "auto" would probe the MNIST mirror; these tests must
    # never reach out of the machine, so the probe always reports no network.
    monkeypatch.setattr(mnist_data, "_probe", lambda url, timeout: "no network in tests")


def test_digits_give_mnist_shaped_batches() -> None:
    dm = MNISTDataModule(source="digits", batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.source_used == "digits"
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        images, labels = next(iter(loader))
        assert images.shape == (16, 1, 28, 28)
        assert images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert 0 <= int(labels.min()) and int(labels.max()) <= 9
    assert dm.train_set is not None and dm.val_set is not None
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert MNISTClassifier()(images).shape == (16, 10)


def test_digits_split_and_limit_are_seeded() -> None:
    first, second = (MNISTDataModule(source="digits", limit_samples=100, seed=3) for _ in range(2))
    for dm in (first, second):
        dm.setup("fit")
    assert first.train_set is not None and second.train_set is not None
    assert first.val_set is not None
    assert len(first.train_set) == 100 and len(first.val_set) == 100
    assert torch.equal(first.train_set.tensors[1], second.train_set.tensors[1])
    assert torch.equal(first.train_set.tensors[0], second.train_set.tensors[0])


def test_auto_falls_back_to_digits_with_one_message(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path / "no-mnist-here"), source="auto", batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("validate")  # a second setup must neither reload nor repeat the message

    assert dm.source_used == "digits"
    err = capfd.readouterr().err
    assert err.count("MNIST is not available") == 1
    assert "scikit-learn's bundled handwritten digits" in err
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 28, 28)


def test_explicit_mnist_source_does_not_fall_back(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path), source="mnist")
    with pytest.raises(MNISTUnavailable):
        dm.prepare_data()
        dm.setup("fit")


def test_s3_config_differs_from_the_local_one_only_in_dirpath() -> None:
    local, s3 = (yaml.safe_load(path.read_text()) for path in (CONFIG, S3_CONFIG))
    local_ckpt = local["trainer"]["callbacks"][0]["init_args"]
    s3_ckpt = s3["trainer"]["callbacks"][0]["init_args"]
    assert local_ckpt.pop("dirpath") == "checkpoints/mnist"
    assert s3_ckpt.pop("dirpath").startswith("s3://")
    assert local == s3


def _quick_config(tmp_path: Path) -> dict[str, Any]:
    """The shipped config, made offline, quiet, small and confined to ``tmp_path``."""
    config: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    config["trainer"].update(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        log_every_n_steps=1,
    )
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    config["data"].update(source="digits", data_dir=str(tmp_path / "data"), batch_size=32, limit_samples=96)
    assert config["ckpt_path"] == "last"
    return config


def test_cli_fit_then_rerun_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file = tmp_path / "mnist.yaml"
    config_file.write_text(yaml.safe_dump(_quick_config(tmp_path)))

    first = main(["fit", "--config", str(config_file)]).trainer
    out = capsys.readouterr().out
    assert "started fresh" in out
    assert first.current_epoch == 1
    steps_per_epoch = first.global_step
    assert steps_per_epoch == 3  # 96 samples in batches of 32
    last = first.checkpoint_callback.last_model_path  # type: ignore[union-attr]
    assert last and os.path.exists(last)
    assert f"last checkpoint:     {last}" in out
    assert len(list((tmp_path / "ckpt").glob("epoch=0*"))) >= 1

    second = main(["fit", "--config", str(config_file), "--trainer.max_epochs=3"]).trainer
    out = capsys.readouterr().out
    assert second.ckpt_path is not None
    assert f"resumed from {last}: continuing with epoch 1 at global step {steps_per_epoch}" in out
    assert os.path.samefile(str(second.ckpt_path), last)
    assert second.current_epoch == 3
    assert second.global_step == 3 * steps_per_epoch
    assert "stopped after epoch 2 (3 epochs done)" in out

    # the same command once more, with the config's max_epochs (1) behind the checkpoint (3):
    # Lightning refuses with a MisconfigurationException; the example says there is nothing to do
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config_file)])
    captured = capsys.readouterr()
    assert done.value.code == 0
    assert "nothing to train" in captured.err and "--trainer.max_epochs" in captured.err
    assert "Traceback" not in captured.err


def test_demo_interrupts_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirpath = tmp_path / "demo"
    demo_main(["--dirpath", str(dirpath), "--epochs", "2", "--limit-samples", "64"])
    out = capsys.readouterr().out
    assert "started fresh" in out
    assert "data: scikit-learn's bundled handwritten digits" in out  # says what it trains on
    assert "simulating an interruption after epoch 0" in out
    assert "stopped after epoch 0 (1 epoch done), global step 1" in out
    # 64 samples in batches of 64: one step an epoch, so run 2 continues with epoch 1 at step 1;
    # every line counts epochs from 0, as Lightning's file names do
    assert f"resumed from {dirpath / 'last.ckpt'}: continuing with epoch 1 at global step 1" in out
    assert "stopped after epoch 1 (2 epochs done), global step 2" in out
    assert (dirpath / "last.ckpt").exists()

    with pytest.raises(SystemExit):  # a second demo into the same directory needs --clean
        demo_main(["--dirpath", str(dirpath), "--epochs", "2", "--limit-samples", "64"])
