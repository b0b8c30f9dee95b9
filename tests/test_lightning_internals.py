"""Every Lightning internal lightning_ckpt uses (lightning_ckpt/_lightning.py), one test each.

Each internal is checked twice: it works on the installed Lightning (a real Trainer runs every
accessor at the point the callback uses it), and where it has moved -- a stand-in object without
the attribute -- the accessor fails with a CheckpointError naming the Lightning version instead of
quietly answering a default that would disable exact resume or route saves around our IO.
"""

from __future__ import annotations

import signal
from types import SimpleNamespace
from typing import Any

import lightning
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, Strategy

from lightning_ckpt import _lightning
from lightning_ckpt.errors import CheckpointError

VERSION = lightning.__version__


def _fit_loop(**attrs: Any) -> SimpleNamespace:
    epoch_loop = SimpleNamespace(val_loop=SimpleNamespace(), **attrs.pop("epoch_loop", {}))
    return SimpleNamespace(epoch_loop=epoch_loop, restarted_mid_epoch=True, **attrs)


def _trainer(**attrs: Any) -> SimpleNamespace:
    return SimpleNamespace(fit_loop=_fit_loop(**attrs.pop("fit_loop", {})), **attrs)


class _Sharded(ModelParallelStrategy):
    def __init__(self) -> None:  # no process group needed to judge the attribute
        pass


class _Fsdp(FSDPStrategy):
    def __init__(self) -> None:
        pass


#: every internal: (what moved, a call that must fail loudly against a Lightning without it)
MOVED = {
    "Strategy._checkpoint_io": lambda: _lightning.checkpoint_io(SimpleNamespace()),
    "Trainer._checkpoint_connector": lambda: _lightning.dump_checkpoint(SimpleNamespace(), False),
    "_CheckpointConnector.dump_checkpoint": lambda: _lightning.dump_checkpoint(
        SimpleNamespace(_checkpoint_connector=SimpleNamespace()), False),
    "ModelParallelStrategy._save_distributed_checkpoint": lambda: _lightning.is_sharded(_Sharded()),
    "FSDPStrategy._state_dict_type": lambda: _lightning.is_sharded(_Fsdp()),
    "_FitLoop._combined_loader": lambda: _lightning.train_loader(_trainer()),
    "_FitLoop._data_fetcher": lambda: _lightning.validation_follows(_trainer()),
    "_TrainingEpochLoop._should_check_val_fx": lambda: _lightning.validation_follows(
        _trainer(fit_loop={"_data_fetcher": object()})),
    "_TrainingEpochLoop._num_ready_batches_reached": lambda: _lightning.epoch_ends(_trainer()),
    "_TrainingEpochLoop._should_accumulate": lambda: _lightning.accumulating(_trainer()),
    "_EvaluationLoop._has_run": lambda: _lightning.validation_has_run(_trainer()),
    "_FitLoop._resuming_from_checkpoint": lambda: _lightning.recreate_iterator_at_epoch_start(_trainer()),
    "CombinedLoader._load_state_dicts": lambda: _lightning.restart_iterator_at_its_epoch(
        _trainer(fit_loop={"_combined_loader": SimpleNamespace(flattened=[SimpleNamespace(
            sampler=SimpleNamespace(set_epoch=lambda e: None))]), "_data_fetcher": [],
            "epoch_progress": SimpleNamespace(current=SimpleNamespace(processed=0))}), [{}]),
    "_FitLoop._data_source": lambda: _lightning.wrap_train_loader(_trainer(), lambda dl: dl),
    "_DataLoaderSource.dataloader": lambda: _lightning.wrap_train_loader(
        _trainer(fit_loop={"_data_source": SimpleNamespace()}), lambda dl: dl),
    "Trainer._signal_connector": lambda: _lightning.silence_sigterm_notifier(_trainer()),
    "_SignalConnector._sigterm_notifier_fn": lambda: _lightning.silence_sigterm_notifier(
        _trainer(_signal_connector=SimpleNamespace())),
    "_SignalConnector._original_handlers": lambda: _lightning.signal_handlers_to_restore(
        _trainer(_signal_connector=SimpleNamespace())),
}


@pytest.mark.parametrize("internal", sorted(MOVED))
def test_a_moved_internal_fails_loudly_naming_the_lightning_version(internal: str) -> None:
    with pytest.raises(CheckpointError, match=rf"{internal}.*Lightning {VERSION}"):
        MOVED[internal]()


def test_lightning_still_asks_model_checkpoint_for_last(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    _lightning.require_last_checkpoint_hook()
    monkeypatch.delattr(ModelCheckpoint, "_find_last_checkpoints")
    with pytest.raises(CheckpointError, match=rf"ModelCheckpoint._find_last_checkpoints.*Lightning {VERSION}"):
        _lightning.require_last_checkpoint_hook()


def test_the_fabric_helpers_for_full_checkpoints_into_sharded_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.fabric.strategies import model_parallel

    assert callable(model_parallel._load_raw_module_state)
    assert callable(model_parallel._rekey_optimizer_state_if_needed)
    monkeypatch.delattr(model_parallel, "_rekey_optimizer_state_if_needed")
    with pytest.raises(CheckpointError, match=rf"_rekey_optimizer_state_if_needed.*Lightning {VERSION}"):
        _lightning.load_full_into_sharded({"state_dict": {}, "optimizer_states": []}, torch.nn.Linear(1, 1), [], True)


def test_the_sampler_epoch_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.fabric.utilities import data

    assert callable(data._set_sampler_epoch)
    monkeypatch.delattr(data, "_set_sampler_epoch")
    trainer = _trainer(fit_loop={"_combined_loader": SimpleNamespace(flattened=[SimpleNamespace(
        sampler=SimpleNamespace(set_epoch=lambda e: None))]), "_data_fetcher": []})
    with pytest.raises(CheckpointError, match=rf"_set_sampler_epoch.*Lightning {VERSION}"):
        _lightning.restart_iterator_at_its_epoch(trainer, [{}])


def test_which_strategies_save_through_their_checkpoint_io() -> None:
    assert _lightning.saves_through_checkpoint_io(SingleDeviceStrategy(device=torch.device("cpu")))
    assert not _lightning.saves_through_checkpoint_io(_Fsdp())
    assert not _lightning.saves_through_checkpoint_io(_Sharded())
    assert Strategy.save_checkpoint.__qualname__ == "Strategy.save_checkpoint"


class _Probe(Callback):
    """Calls every accessor where the callback does, on a real Trainer of the installed Lightning."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self.seen["io"] = _lightning.checkpoint_io(trainer.strategy)
        self.seen["sharded"] = _lightning.is_sharded(trainer.strategy)
        self.seen["bypasses"] = _lightning.bypasses_checkpoint_io(trainer.strategy)
        _lightning.wrap_train_loader(trainer, lambda dl: dl)
        _lightning.wrap_train_loader(trainer, lambda dl: dl)  # idempotent

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        _lightning.silence_sigterm_notifier(trainer)
        self.seen["handlers"] = dict(_lightning.signal_handlers_to_restore(trainer))
        _lightning.unsilence_sigterm_notifier(trainer)
        _lightning.restart_iterator_at_its_epoch(trainer, [])
        _lightning.recreate_iterator_at_epoch_start(trainer)
        self.seen["time_interval"] = _lightning.val_check_time_interval(trainer)

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.seen.setdefault("follows", []).append(_lightning.validation_follows(trainer))
        self.seen.setdefault("ends", []).append(_lightning.epoch_ends(trainer))
        self.seen.setdefault("accumulating", []).append(_lightning.accumulating(trainer))
        self.seen["loader"] = _lightning.train_loader(trainer)
        self.seen["has_run"] = _lightning.validation_has_run(trainer)
        self.seen["checkpoint"] = _lightning.dump_checkpoint(trainer, weights_only=True)


def test_every_accessor_works_on_the_installed_lightning(tmp_path: Any) -> None:
    probe = _Probe()
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=1,
                      val_check_interval=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(BoringModel())
    assert probe.seen["io"] is None or hasattr(probe.seen["io"], "save_checkpoint")
    assert probe.seen["sharded"] is False and probe.seen["bypasses"] is False
    assert signal.SIGTERM in probe.seen["handlers"] or probe.seen["handlers"] == {}
    assert probe.seen["follows"] == [False, True, False, True]
    assert probe.seen["ends"] == [False, False, False, True]
    assert probe.seen["accumulating"] == [True, False, True, False]
    assert probe.seen["loader"] is not None and probe.seen["has_run"] is True
    assert "state_dict" in probe.seen["checkpoint"] and "optimizer_states" not in probe.seen["checkpoint"]
    assert probe.seen["time_interval"] is None
