"""trigger= and retention=: the policy objects under ModelCheckpoint's keywords (lightning_ckpt/configuration.py)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_ckpt import CheckpointCallback, CheckpointManager, policies
from lightning_ckpt.errors import ConfigurationError


def fit(callback: CheckpointCallback, tmp_path: Path, epochs: int = 3, batches: int = 4) -> None:
    class Model(BoringModel):
        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            out = super().validation_step(batch, batch_idx)
            self.log("val_loss", (1.0, 0.2, 0.5, 0.7)[self.current_epoch])
            return out

    Trainer(default_root_dir=tmp_path, max_epochs=epochs, limit_train_batches=batches, limit_val_batches=1,
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[callback]).fit(Model())


def names(path: Path) -> list[str]:
    return sorted(m.name for m in CheckpointManager(str(path)).manifests())


@pytest.mark.parametrize(("policy", "keywords"), [
    (policies.EveryNSteps(3), {"every_n_train_steps": 3}),
    (policies.EveryNEpochs(2), {"every_n_epochs": 2}),
    (policies.EveryInterval(60.0), {"train_time_interval": timedelta(seconds=60)}),
])
def test_a_trigger_object_is_the_keyword_it_stands_for(tmp_path: Path, policy, keywords) -> None:  # type: ignore[no-untyped-def]
    by_policy = CheckpointCallback(dirpath=tmp_path, trigger=policy)
    by_keyword = CheckpointCallback(dirpath=tmp_path, **keywords)
    assert by_policy.trigger == by_keyword.trigger
    assert by_policy.state_key == by_keyword.state_key  # so checkpoints of either restore the other


def test_a_trigger_saves_when_it_says(tmp_path: Path) -> None:
    fit(CheckpointCallback(dirpath=tmp_path, trigger=policies.EveryNSteps(5), save_top_k=-1), tmp_path)
    assert names(tmp_path) == ["epoch=1-step=5.ckpt", "epoch=2-step=10.ckpt"]


def test_any_of_triggers_saves_at_either(tmp_path: Path) -> None:
    fit(CheckpointCallback(dirpath=tmp_path, trigger=policies.AnyOf((policies.EveryNSteps(5), policies.EveryNEpochs(3))), save_top_k=-1),
        tmp_path)
    assert names(tmp_path) == ["epoch=1-step=5.ckpt", "epoch=2-step=10.ckpt", "epoch=2-step=12.ckpt"]


def test_an_overhead_budget_is_a_trigger_too(tmp_path: Path) -> None:
    budget = policies.OverheadBudget(0.05)
    callback = CheckpointCallback(dirpath=tmp_path, trigger=budget)
    assert callback.overhead_budget is budget and callback.trigger is budget


@pytest.mark.parametrize("keyword", [{"every_n_epochs": 1}, {"every_n_train_steps": 2},
                                     {"train_time_interval": timedelta(minutes=1)}, {"overhead_budget": 0.01}])
def test_a_trigger_and_a_trigger_keyword_is_a_clear_error(tmp_path: Path, keyword) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match="both say when to save"):
        CheckpointCallback(dirpath=tmp_path, trigger=policies.EveryNSteps(3), **keyword)


@pytest.mark.parametrize("trigger", [5, policies.EveryNSteps, policies.KeepAll()])
def test_something_that_is_no_trigger_is_refused(tmp_path: Path, trigger) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match="not a save trigger"):
        CheckpointCallback(dirpath=tmp_path, trigger=trigger)


def test_retention_top_k_is_save_top_k_monitor_and_mode(tmp_path: Path) -> None:
    callback = CheckpointCallback(dirpath=tmp_path, retention=policies.KeepTopK(2, "val_loss", "max"))
    assert (callback.save_top_k, callback.monitor, callback.mode) == (2, "val_loss", "max")
    keywords = CheckpointCallback(dirpath=tmp_path, save_top_k=2, monitor="val_loss", mode="max")
    assert callback.retention == keywords.retention and callback.state_key == keywords.state_key
    # repeating what the policy says is fine
    CheckpointCallback(dirpath=tmp_path, retention=policies.KeepTopK(2, "val_loss", "max"), save_top_k=2, monitor="val_loss")


@pytest.mark.parametrize("keyword", [{"save_top_k": 3}, {"monitor": "other"}, {"mode": "max"}])
def test_retention_and_a_contradicting_keyword_is_a_clear_error(tmp_path: Path, keyword) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match="disagree"):
        CheckpointCallback(dirpath=tmp_path, retention=policies.KeepTopK(2, "val_loss"), **keyword)


def test_keep_latest_n_keeps_the_newest_n_without_a_monitor(tmp_path: Path) -> None:
    fit(CheckpointCallback(dirpath=tmp_path, retention=policies.KeepLatest(2)), tmp_path, epochs=4)
    assert names(tmp_path) == ["epoch=2-step=12.ckpt", "epoch=3-step=16.ckpt"]


def test_keep_all_keeps_every_save(tmp_path: Path) -> None:
    fit(CheckpointCallback(dirpath=tmp_path, retention=policies.KeepAll()), tmp_path)
    assert len(names(tmp_path)) == 3


def test_a_union_of_policies_keeps_what_any_keeps(tmp_path: Path) -> None:
    policy = policies.KeepUnion((policies.KeepTopK(1, "val_loss"), policies.KeepLatest(1)))
    callback = CheckpointCallback(dirpath=tmp_path, monitor="val_loss", retention=policy)
    fit(callback, tmp_path, epochs=4)
    # val_loss by epoch: 1.0, 0.2, 0.5, 0.7: the best (epoch 1) and the newest (epoch 3) stay
    assert names(tmp_path) == ["epoch=1-step=8.ckpt", "epoch=3-step=16.ckpt"]
    assert os.path.basename(callback.best_model_path) == "epoch=1-step=8.ckpt"


@pytest.mark.parametrize("retention", ["top3", policies.KeepAll, policies.EveryNSteps(3)])
def test_something_that_is_no_retention_policy_is_refused(tmp_path: Path, retention) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match="not a retention policy"):
        CheckpointCallback(dirpath=tmp_path, retention=retention)


def test_a_trigger_no_keyword_stands_for_joins_the_state_key_stably(tmp_path: Path) -> None:
    class Mine:
        def due_on_step(self, step: int, now: float, last_save_time: float) -> bool:
            return step % 7 == 0

        def due_on_epoch(self, epoch: int) -> bool:
            return False

    any_of = policies.AnyOf((policies.EveryNSteps(5), policies.EveryNEpochs(2)))
    keys = {CheckpointCallback(dirpath=tmp_path, trigger=t).state_key for t in (any_of, Mine(), None)}
    assert len(keys) == 3  # two such callbacks in one Trainer do not collide
    # the same settings give the same key in another process: no object address in it
    assert CheckpointCallback(dirpath=tmp_path, trigger=Mine()).state_key == \
        CheckpointCallback(dirpath=tmp_path, trigger=Mine()).state_key
    assert "0x" not in CheckpointCallback(dirpath=tmp_path, trigger=Mine()).state_key


def test_a_users_trigger_inside_any_of_keeps_the_state_key_stable(tmp_path: Path) -> None:
    from dataclasses import dataclass

    class Plain:  # its repr holds an object address
        def due_on_step(self, step: int, now: float, last_save_time: float) -> bool:
            return False

        def due_on_epoch(self, epoch: int) -> bool:
            return False

    @dataclass(frozen=True)
    class Every(Plain):
        n: int

    def key(trigger) -> str:  # type: ignore[no-untyped-def]
        return CheckpointCallback(dirpath=tmp_path, trigger=trigger).state_key

    wrapped = policies.AnyOf((policies.EveryNSteps(5), Plain()))
    assert key(wrapped) == key(policies.AnyOf((policies.EveryNSteps(5), Plain())))  # found again on resume
    assert "0x" not in key(wrapped)
    assert key(Every(3)) != key(Every(7))  # two callbacks with differently set triggers do not collide
