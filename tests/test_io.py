"""ManagedCheckpointIO's save hand-over: one typed request down, one typed outcome back (lightning_ckpt/io.py)."""

from __future__ import annotations

import os
import uuid
import warnings

import pytest
import torch

from lightning_ckpt.async_saver import PendingSave
from lightning_ckpt.errors import CheckpointError, ConfigurationError
from lightning_ckpt.io import ManagedCheckpointIO, SaveRequest
from lightning_ckpt.manager import CheckpointManager, SaveResult


@pytest.fixture
def directory() -> str:
    return f"memory://io-{uuid.uuid4().hex[:8]}"


def state(value: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((4,), value)}, "epoch": 0, "global_step": 3}


def test_a_request_handed_over_through_lightnings_call_comes_back_as_its_result(directory: str) -> None:
    io = ManagedCheckpointIO()
    done: list[SaveResult] = []
    request = SaveRequest(directory, "a.ckpt", epoch=0, global_step=3, metrics={"loss": 0.5}, monitor="loss",
                          mode="min", owner="me", then=done.append)
    with io.handing_over(request) as ticket:
        io.save_checkpoint(state(), ticket.url)  # what the strategy does inside trainer.save_checkpoint
    assert ticket.handled and ticket.error is None and isinstance(ticket.outcome, SaveResult)
    assert done == [ticket.outcome]
    manifest = CheckpointManager(directory).read_manifest("a.ckpt")
    assert (manifest.owner, manifest.metrics, manifest.global_step) == ("me", {"loss": 0.5}, 3)


def test_another_file_written_during_the_hand_over_is_a_plain_save_not_the_request(directory: str) -> None:
    io = ManagedCheckpointIO()
    with io.handing_over(SaveRequest(directory, "a.ckpt", owner="me")) as ticket:
        io.save_checkpoint(state(2.0), f"{directory}/other.ckpt")
    assert not ticket.handled and ticket.outcome is None
    manager = CheckpointManager(directory)
    assert manager.read_manifest("other.ckpt").owner != "me"
    assert not manager.storage.exists("a.ckpt")


def test_a_failed_save_lands_on_the_ticket_instead_of_raising_inside_lightnings_barrier(directory: str) -> None:
    io = ManagedCheckpointIO()
    reserved = "a.ckpt.manifest.json"  # a name the commit protocol refuses
    with io.handing_over(SaveRequest(directory, reserved)) as ticket:
        io.save_checkpoint(state(), ticket.url)
    assert ticket.handled and isinstance(ticket.error, CheckpointError) and ticket.outcome is None
    # outside a hand-over the same failure raises, as any CheckpointIO would
    with pytest.raises(CheckpointError):
        io.save_checkpoint(state(), f"{directory}/{reserved}")


def test_no_request_is_left_behind_after_the_hand_over(directory: str) -> None:
    io = ManagedCheckpointIO()
    with pytest.raises(RuntimeError), io.handing_over(SaveRequest(directory, "a.ckpt", owner="me")):
        raise RuntimeError("the strategy failed")
    io.save_checkpoint(state(), f"{directory}/a.ckpt")
    assert CheckpointManager(directory).read_manifest("a.ckpt").owner != "me"


def test_hand_overs_do_not_nest(directory: str) -> None:
    io = ManagedCheckpointIO()
    with io.handing_over(SaveRequest(directory, "a.ckpt")), pytest.raises(CheckpointError, match="handed over"):
        with io.handing_over(SaveRequest(directory, "b.ckpt")):
            pass


def test_a_background_request_returns_a_pending_handle(directory: str) -> None:
    io = ManagedCheckpointIO()
    try:
        pending = io.save(SaveRequest(directory, "a.ckpt", background=True), state())
        assert isinstance(pending, PendingSave)
        assert isinstance(pending.wait(), SaveResult)
    finally:
        io.teardown()
    assert CheckpointManager(directory).load("a.ckpt")["global_step"] == 3


def test_a_request_is_frozen_and_checked() -> None:
    request = SaveRequest("memory://x", "a.ckpt")
    with pytest.raises(AttributeError):
        request.name = "b.ckpt"  # type: ignore[misc]
    with pytest.raises(ConfigurationError, match="when_busy"):
        SaveRequest("memory://x", "a.ckpt", when_busy="later")  # type: ignore[arg-type]


def test_a_strategy_that_writes_around_our_io_is_reported_not_passed_off_as_verified(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lightning_ckpt import CheckpointCallback
    from lightning_ckpt.errors import CheckpointWarning

    class WritesItself(SingleDeviceStrategy):
        def save_checkpoint(self, checkpoint, filepath, storage_options=None):  # type: ignore[no-untyped-def]
            os.makedirs(os.path.dirname(filepath), exist_ok=True)
            torch.save(checkpoint, filepath)  # never asks its CheckpointIO

    trainer = Trainer(default_root_dir=tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      strategy=WritesItself(device=torch.device("cpu")),
                      callbacks=[CheckpointCallback(dirpath=tmp_path / "ckpt")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(BoringModel())
    bypassed = [w for w in caught if issubclass(w.category, CheckpointWarning)
                and "WritesItself.save_checkpoint wrote" in str(w.message)]
    assert len(bypassed) == 1  # once per run
    # and retention never deletes the file it did not commit (it says so instead)
    assert any("could not delete" in str(w.message) for w in caught)
    assert (tmp_path / "ckpt" / "epoch=0-step=2.ckpt").exists()
    assert CheckpointManager(str(tmp_path / "ckpt")).manifests() == []
