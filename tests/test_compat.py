"""CheckpointCallback as a drop-in for Lightning's ModelCheckpoint.

Each scenario runs twice, once with the installed Lightning's ``ModelCheckpoint`` (the spec) and
once with ours, and compares what a user sees: the ``.ckpt`` files and the step each one holds,
``best_model_path``/``best_model_score``, ``best_k_models``, ``kth_best_model_path``/``kth_value``,
``last_model_path`` and ``current_score``. Our ``.manifest.json`` sidecars are not compared (they
are a documented difference). Then: the signature, the exception class, the state key, and
migration from a stock run and back.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import shutil
import warnings
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModel, data, fit, trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt import CheckpointCallback, CheckpointManager, ConfigurationError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def seen(cb: ModelCheckpoint, dirpath: str) -> dict[str, Any]:
    """What a user of either callback observes after a run."""
    files = sorted(f for f in os.listdir(dirpath) if f.endswith(".ckpt")) if os.path.isdir(dirpath) else []
    base = os.path.basename

    def num(v: Any) -> float | None:
        return None if v is None else round(float(v), 5)

    return {
        "files": {f: torch.load(os.path.join(dirpath, f), weights_only=False)["global_step"] for f in files},
        "best_model_path": base(cb.best_model_path),
        "best_model_score": num(cb.best_model_score),
        "best_k_models": [(base(k), num(v)) for k, v in cb.best_k_models.items()],
        "kth_best_model_path": base(cb.kth_best_model_path),
        "kth_value": num(cb.kth_value),
        "last_model_path": base(cb.last_model_path),
        "current_score": num(cb.current_score),
    }


def both(tmp_path, kwargs: dict[str, Any], ours: dict[str, Any] | None = None, model: type = TinyModel,
         **fit_kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    out = []
    for cls, extra in ((ModelCheckpoint, {}), (CheckpointCallback, ours or {})):
        d = str(tmp_path / cls.__name__)
        cb = cls(dirpath=d, **kwargs, **extra)
        pl.seed_everything(0, verbose=False)
        t = trainer([cb], **{"max_epochs": 2, **fit_kwargs})
        t.fit(model(), *data())
        out.append(seen(cb, d))
    return out[0], out[1]


SCENARIOS = [
    pytest.param({}, {"max_epochs": 3}, id="defaults"),
    pytest.param({"save_last": True}, {"max_epochs": 3}, id="save_last"),
    pytest.param({"monitor": "val_loss", "save_top_k": 2, "save_last": True}, {"max_epochs": 4}, id="top2-last"),
    pytest.param({"monitor": "val_loss", "mode": "max", "save_top_k": -1}, {"max_epochs": 3}, id="all-max"),
    pytest.param({"save_last": True, "every_n_epochs": 2, "save_top_k": -1}, {"max_epochs": 4}, id="every-2-epochs"),
    pytest.param({"monitor": "val_loss", "save_top_k": 1, "save_last": True, "every_n_epochs": 2}, {"max_epochs": 5},
                 id="every-2-epochs-monitor"),
    pytest.param({"monitor": "val_loss", "save_top_k": 3, "every_n_epochs": 2},
                 {"max_epochs": 6, "check_val_every_n_epoch": 3}, id="every_n_epochs-check_val_every_n_epoch"),
    pytest.param({"monitor": "val_loss", "save_top_k": 2, "save_last": True, "every_n_train_steps": 3},
                 {"max_epochs": 2}, id="steps-ties"),
    pytest.param({"monitor": "val_loss", "save_top_k": 1, "save_last": True, "filename": "{epoch}"},
                 {"val_check_interval": 0.5}, id="val_check_interval-half"),
    pytest.param({"monitor": "train_loss", "save_top_k": 2, "save_on_train_epoch_end": True, "save_last": "link"},
                 {"max_epochs": 3}, id="save_on_train_epoch_end-link"),
    pytest.param({"save_last": "link", "save_top_k": 0}, {}, id="link-top0"),
    pytest.param({"monitor": "val_loss", "save_top_k": 2, "filename": "{epoch}-{val_loss:.2f}",
                  "auto_insert_metric_name": False}, {"max_epochs": 3}, id="auto_insert_metric_name"),
    pytest.param({"filename": "x", "save_top_k": -1}, {"max_epochs": 3}, id="version-counter"),
    pytest.param({"filename": "x", "save_top_k": -1, "enable_version_counter": False}, {}, id="no-version-counter"),
    pytest.param({"save_last": True, "train_time_interval": timedelta(0)}, {"max_epochs": 1}, id="time-zero"),
    pytest.param({"save_last": True, "monitor": "val_loss"}, {"max_steps": 5}, id="max_steps-before-epoch-end"),
    pytest.param({"monitor": "val_loss", "save_top_k": 2, "every_n_train_steps": 4}, {"limit_val_batches": 0},
                 id="no-validation"),
]


@pytest.mark.parametrize(("kwargs", "fit_kwargs"), SCENARIOS)
def test_same_as_model_checkpoint(tmp_path, kwargs: dict[str, Any], fit_kwargs: dict[str, Any]) -> None:
    stock, ours = both(tmp_path, kwargs, **fit_kwargs)
    assert ours == stock


def test_step_saves_before_a_validation_wait_for_it_only_with_exact_resume(tmp_path) -> None:
    """The one trigger difference: with exact_resume a step save due just before a validation is
    taken right after it (same weights, fresh metrics); without, exactly Lightning's."""
    kwargs = {"monitor": "val_loss", "save_top_k": 2, "every_n_train_steps": 5}
    stock, ours = both(tmp_path / "a", kwargs, {"exact_resume": False}, val_check_interval=0.25)
    assert ours == stock
    stock, ours = both(tmp_path / "b", kwargs, val_check_interval=0.25)
    assert ours["files"] == stock["files"] and ours["best_model_path"] == stock["best_model_path"]


class NaNModel(TinyModel):
    """Logs NaN as val_loss in epochs 0 and 2."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        value = math.nan if self.current_epoch in (0, 2) else 1.0 / (self.current_epoch + 1)
        self.log("val_loss", torch.tensor(value), on_epoch=True)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("k", [1, 2, -1])
def test_nan_and_current_score_as_lightning(tmp_path, mode: str, k: int) -> None:
    stock, ours = both(tmp_path, {"monitor": "val_loss", "mode": mode, "save_top_k": k}, model=NaNModel, max_epochs=4)
    assert ours == stock


class FailsAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("boom")


def test_save_on_exception_as_lightning(tmp_path) -> None:
    out = []
    for cls in (ModelCheckpoint, CheckpointCallback):
        d = str(tmp_path / cls.__name__)
        cb = cls(dirpath=d, save_on_exception=True, save_last=True)
        with pytest.raises(RuntimeError, match="boom"):
            fit(cb, max_epochs=3, extra_callbacks=[FailsAt(11)])
        out.append(seen(cb, d))
    assert out[1] == out[0]
    assert out[1]["files"] == {"epoch=0-step=8.ckpt": 8, "epoch=1-step=11.ckpt": 11, "last.ckpt": 11}


def test_a_second_fit_on_the_same_trainer(tmp_path) -> None:
    out = []
    for cls in (ModelCheckpoint, CheckpointCallback):
        d = str(tmp_path / cls.__name__)
        cb = cls(dirpath=d, monitor="val_loss", save_top_k=2, save_last=True)
        pl.seed_everything(0, verbose=False)
        t, model = trainer([cb], max_epochs=2), TinyModel()
        t.fit(model, *data())
        t.fit_loop.max_epochs = 4
        t.fit(model, *data())
        out.append(seen(cb, d))
    assert out[1] == out[0]


@pytest.mark.parametrize("kwargs", [
    {"save_top_k": -1, "monitor": "epoch", "mode": "max", "filename": "{epoch}", "save_last": True},
    {"save_top_k": 0, "save_last": True},
    {"save_top_k": -1, "filename": "{epoch}", "enable_version_counter": False, "save_last": True},
])
def test_a_rerun_in_the_same_directory_as_lightning(tmp_path, kwargs: dict[str, Any]) -> None:
    """A new Trainer and callback, not resuming: names already there get -vN (last.ckpt too)."""
    out = []
    for cls in (ModelCheckpoint, CheckpointCallback):
        d = str(tmp_path / cls.__name__)
        for _ in range(2):
            cb = cls(dirpath=d, **kwargs)
            fit(cb, max_epochs=2)
        out.append(seen(cb, d))
    assert out[1] == out[0]


def test_a_second_fit_on_the_same_trainer_versions_from_starting_version(tmp_path) -> None:
    out = []
    for cls in (ModelCheckpoint, CheckpointCallback):
        d = str(tmp_path / cls.__name__)
        cb = cls(dirpath=d, save_top_k=-1, monitor="epoch", filename="test")
        cb.STARTING_VERSION = 9
        pl.seed_everything(0, verbose=False)
        t, model = trainer([cb], max_epochs=2), TinyModel()
        t.fit(model, *data())
        t.fit_loop.max_epochs = 4
        t.fit(model, *data())
        out.append(seen(cb, d))
    assert out[1] == out[0]
    assert set(out[1]["files"]) == {"test.ckpt", "test-v9.ckpt", "test-v10.ckpt", "test-v11.ckpt"}


def test_a_state_from_another_directory_restores_only_best_model_path(tmp_path) -> None:
    written = ModelCheckpoint(dirpath=str(tmp_path / "a"), save_last=True)
    written.best_model_path, written.last_model_path = "x/epoch=1.ckpt", "x/last.ckpt"
    for cls in (ModelCheckpoint, CheckpointCallback):
        cb = cls(dirpath=str(tmp_path / "b"), save_last=True)
        with pytest.warns(UserWarning, match="The dirpath has changed from"):
            cb.load_state_dict(written.state_dict())
        assert cb.best_model_path == "x/epoch=1.ckpt" and cb.last_model_path == ""


def test_customised_name_characters_as_lightning(tmp_path) -> None:
    out = []
    for cls in (ModelCheckpoint, CheckpointCallback):
        d = str(tmp_path / cls.__name__)
        cb = cls(dirpath=d, save_top_k=-1, monitor="epoch", mode="max", save_last=True)
        cb.CHECKPOINT_JOIN_CHAR, cb.CHECKPOINT_EQUALS_CHAR, cb.CHECKPOINT_NAME_LAST = "@", ":", "{epoch}-last"
        fit(cb, max_epochs=2)
        out.append(seen(cb, d))
    assert out[1] == out[0]
    assert "epoch:1@step:16.ckpt" in out[1]["files"]


# -- the constructor -------------------------------------------------------------------------


def test_every_model_checkpoint_argument_with_its_default_and_position() -> None:
    """A keyword a new Lightning adds fails here, not in a user's config."""
    theirs = list(inspect.signature(ModelCheckpoint.__init__).parameters.values())[1:]
    ours = dict(list(inspect.signature(CheckpointCallback.__init__).parameters.items())[1:])
    assert list(ours)[: len(theirs)] == [p.name for p in theirs]  # positional calls mean the same
    for p in theirs:
        assert ours[p.name].default == p.default, p.name
        assert ours[p.name].kind == p.kind, p.name
    extras = [p for name, p in ours.items() if name not in {q.name for q in theirs}]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)


@pytest.mark.parametrize("kwargs", [{"mode": "avg"}, {"save_top_k": -2}, {"save_top_k": 3},
                                    {"every_n_epochs": 1, "every_n_train_steps": 5}, {"every_n_epochs": -1}])
def test_invalid_values_raise_what_model_checkpoint_raises(kwargs: dict[str, Any]) -> None:
    with pytest.raises(MisconfigurationException):
        ModelCheckpoint(**kwargs)
    with pytest.raises(MisconfigurationException) as caught:
        CheckpointCallback(dirpath="memory://x", **kwargs)
    assert isinstance(caught.value, ConfigurationError) and isinstance(caught.value, ValueError)


def test_a_monitor_never_logged_raises_what_model_checkpoint_raises(tmp_path) -> None:
    for cls in (ModelCheckpoint, CheckpointCallback):
        with pytest.raises(MisconfigurationException, match="val_acc"):
            fit(cls(dirpath=str(tmp_path / cls.__name__), monitor="val_acc"), max_epochs=1)


def test_the_state_key_is_lightnings() -> None:
    for kwargs in ({}, {"monitor": "val_loss", "mode": "max"}, {"every_n_train_steps": 5},
                   {"train_time_interval": timedelta(minutes=1)}, {"every_n_epochs": 0, "every_n_train_steps": 0}):
        assert CheckpointCallback(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key


def test_model_checkpoint_attributes_and_methods_work(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), filename="{epoch}-{val_loss:.2f}")
    assert os.path.basename(cb.format_checkpoint_name({"epoch": 2, "val_loss": 0.123})) == "epoch=2-val_loss=0.12.ckpt"
    assert cb.every_n_epochs == 1 and cb.save_on_exception is False and cb.auto_insert_metric_name is True
    cb = CheckpointCallback(dirpath=str(tmp_path), monitor="val_loss", save_top_k=2)
    fit(cb, max_epochs=2)
    cb.to_yaml()
    assert os.path.exists(os.path.join(str(tmp_path), "best_k_models.yaml"))


# -- save_last="copy" and "link" -------------------------------------------------------------------


def test_save_last_copy_is_an_independent_file_and_link_a_link(tmp_path) -> None:
    for mode, linked in (("copy", False), ("link", True), (True, True)):
        d = tmp_path / str(mode)
        cb = CheckpointCallback(dirpath=str(d), monitor="val_loss", save_last=mode)
        fit(cb, max_epochs=1)
        twin, last = os.stat(cb.best_model_path), os.stat(d / "last.ckpt")
        assert (twin.st_ino == last.st_ino) is linked, mode
        assert cb.manager.verify("last.ckpt")


def test_save_last_link_on_an_object_store_is_a_server_side_copy() -> None:
    cb = CheckpointCallback(dirpath="memory://compat-link", monitor="val_loss", save_last="link")
    fit(cb, max_epochs=2)
    best = cb.manager.load(os.path.basename(cb.best_model_path))
    assert torch.equal(cb.manager.load("last.ckpt")["state_dict"]["net.0.weight"], best["state_dict"]["net.0.weight"])


# -- migration both ways ----------------------------------------------------------------------------


def test_a_model_checkpoint_run_continues_under_ours(tmp_path) -> None:
    """The same directory, continued once by stock ModelCheckpoint and once by ours."""
    d, backup = tmp_path / "run", tmp_path / "backup"
    kw = {"dirpath": str(d), "monitor": "val_loss", "save_top_k": 2, "save_last": True}
    fit(ModelCheckpoint(**kw), max_epochs=2)
    shutil.copytree(d, backup)
    stock = ModelCheckpoint(**kw)
    fit(stock, max_epochs=5, ckpt_path="last")
    expected = seen(stock, str(d))
    shutil.rmtree(d)
    shutil.copytree(backup, d)
    ours = CheckpointCallback(**kw)
    with pytest.warns(UserWarning, match="not verified"):  # nothing committed: stock's last.ckpt
        t, _ = fit(ours, max_epochs=5, ckpt_path="last")
    assert t.global_step == 40 and ours.resumed_from == str(d / "last.ckpt")
    # a file we did not write is never overwritten (issue 14): ours is last-v1.ckpt, stock's stays
    assert (d / "last.ckpt").read_bytes() == (backup / "last.ckpt").read_bytes()
    os.replace(d / "last-v1.ckpt", d / "last.ckpt")
    ours.last_model_path = str(d / "last.ckpt")
    got = seen(ours, str(d))
    # stock deletes its files that leave the top k; ours leaves them (unverified, not written by us)
    left_in_place = set(got["files"]) - set(expected["files"])
    assert left_in_place <= set(os.listdir(backup))
    assert {f: got["files"][f] for f in expected["files"]} == expected["files"]
    assert {**got, "files": None} == {**expected, "files": None}


def test_our_checkpoint_continues_under_model_checkpoint(tmp_path) -> None:
    d = str(tmp_path)
    kw = {"dirpath": d, "monitor": "val_loss", "save_top_k": 2, "save_last": True}
    ours = CheckpointCallback(**kw)
    fit(ours, max_epochs=2)
    stock = ModelCheckpoint(**kw)
    t, _ = fit(stock, max_epochs=2, ckpt_path=os.path.join(d, "last.ckpt"))
    assert t.global_step == 16
    assert stock.best_model_path == ours.best_model_path
    assert float(stock.best_model_score) == pytest.approx(float(ours.best_model_score))
    assert set(stock.best_k_models) == set(ours.best_k_models)
    assert stock.last_model_path == ours.last_model_path


def test_our_state_is_under_lightnings_key(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), monitor="val_loss")
    fit(cb, max_epochs=1)
    state = cb.manager.load("epoch=0-step=8.ckpt")["callbacks"][ModelCheckpoint(monitor="val_loss").state_key]
    assert state["best_model_path"] == cb.best_model_path and float(state["current_score"]) == float(cb.current_score)


# -- messages ----------------------------------------------------------------------------------------


def test_no_save_last_hint_on_a_fresh_start(tmp_path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(CheckpointCallback(dirpath=str(tmp_path), save_last=True), max_epochs=1, ckpt_path="last")
    assert not [w for w in caught if "save_last=True" in str(w.message)]
    assert not [f for f in warnings.filters if f[1] is not None and "no last checkpoint" in f[1].pattern]


def test_resuming_from_best_says_so(tmp_path, caplog) -> None:
    kw = {"dirpath": str(tmp_path), "monitor": "val_loss"}
    cb = CheckpointCallback(**kw)
    fit(cb, max_epochs=2)
    with caplog.at_level(logging.INFO):
        fit(CheckpointCallback(**kw), max_epochs=3, ckpt_path="best")
    assert f"lightning-ckpt: resuming from {cb.best_model_path}" in caplog.text


def test_the_resume_line_names_the_checkpoints_epoch_and_where_training_continues(tmp_path, caplog) -> None:
    # the epoch-end checkpoint of epoch 1 (`ls` and its name say epoch 1); training goes on in epoch 2
    cb = CheckpointCallback(dirpath=str(tmp_path), save_last=True)
    first, _ = fit(cb, max_epochs=2)
    with caplog.at_level(logging.INFO):
        fit(CheckpointCallback(dirpath=str(tmp_path), save_last=True), max_epochs=3, ckpt_path="last")
    assert (f"lightning-ckpt: resuming from {cb.last_model_path} (epoch 1, step {first.global_step}); "
            "training continues in epoch 2") in caplog.text


def test_best_prefers_the_named_twin_over_last(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), monitor="val_loss", save_last=True)
    fit(cb, max_epochs=1)
    manager = CheckpointManager(str(tmp_path))
    assert manager.best("val_loss").name == "epoch=0-step=8.ckpt"


# -- hostile inputs ----------------------------------------------------------------------------------


def test_a_foreign_file_with_our_name_is_never_replaced(tmp_path) -> None:
    for counter in (True, False):
        d = tmp_path / str(counter)
        d.mkdir()
        (d / "model.ckpt").write_bytes(b"someone else's")
        cb = CheckpointCallback(dirpath=str(d), filename="model", enable_version_counter=counter)
        fit(cb, max_epochs=2)
        assert (d / "model.ckpt").read_bytes() == b"someone else's"
        assert cb.best_model_path == str(d / "model-v1.ckpt") and cb.manager.verify("model-v1.ckpt")


def test_without_the_version_counter_our_own_file_is_replaced(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), filename="model", save_top_k=-1, enable_version_counter=False)
    fit(cb, max_epochs=2)
    assert sorted(m.name for m in cb.manager.manifests()) == ["model.ckpt"]
    assert cb.manager.load("model.ckpt")["global_step"] == 16


def test_two_callbacks_in_one_directory_keep_two_last_files(tmp_path) -> None:
    """As Lightning: the second callback's last.ckpt takes -v1 instead of replacing the first's."""
    a = CheckpointCallback(dirpath=str(tmp_path), monitor="val_loss", save_last=True)
    b = CheckpointCallback(dirpath=str(tmp_path), monitor="train_loss", save_last=True, filename="{epoch}-train")
    fit(a, max_epochs=2, extra_callbacks=[b])
    assert os.path.basename(a.last_model_path) == "last.ckpt"
    assert os.path.basename(b.last_model_path) == "last-v1.ckpt"


@pytest.mark.parametrize("fail_on_save_error", [False, True])
def test_a_failing_save_on_exception_never_masks_the_error(fail_on_save_error: bool) -> None:
    from faulty_fs import Fault, FaultPlan, register

    register()
    plan = FaultPlan(Fault(op="open_write", path="*step=11*", times=None))
    cb = CheckpointCallback(dirpath=f"faulty://compat-exc/{fail_on_save_error}", storage_options={"target_protocol": "memory", "plan": plan},
                            save_on_exception=True, fail_on_save_error=fail_on_save_error)
    with pytest.warns(UserWarning, match="could not save on RuntimeError|FAILED"):
        with pytest.raises(RuntimeError, match="boom"):
            fit(cb, max_epochs=3, extra_callbacks=[FailsAt(11)])
    assert [m.name for m in cb.manager.manifests()] == ["epoch=0-step=8.ckpt"]


def test_the_checkpoint_resumed_from_is_never_replaced_by_name(tmp_path) -> None:
    """Lightning would reuse the name of the k-th it pushes out, even the file it resumed from."""
    kw = {"dirpath": str(tmp_path), "monitor": "step", "mode": "max", "filename": "{epoch}"}
    fit(CheckpointCallback(**kw), max_steps=4, val_check_interval=0.5)
    resumed = CheckpointManager(str(tmp_path)).read_manifest("epoch=0.ckpt")
    assert resumed.global_step == 4
    cb = CheckpointCallback(**kw)
    fit(cb, max_epochs=1, val_check_interval=0.5, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert cb.manager.read_manifest("epoch=0.ckpt").digest == resumed.digest
    assert cb.best_model_path == str(tmp_path / "epoch=0-v1.ckpt")


def test_a_hostile_migrated_state_is_ignored(tmp_path) -> None:
    d = str(tmp_path)
    kw = {"dirpath": d, "monitor": "val_loss", "save_top_k": 2}
    fit(ModelCheckpoint(**kw, save_last=True), max_epochs=2)
    ckpt = torch.load(os.path.join(d, "last.ckpt"), weights_only=False)
    state = ckpt["callbacks"][ModelCheckpoint(**kw).state_key]
    state["best_k_models"] = {"/etc/passwd": torch.tensor(0.0), os.path.join(d, "../x.ckpt"): torch.tensor(0.0),
                              os.path.join(d, "last.ckpt"): "not a score"}
    torch.save(ckpt, os.path.join(d, "last.ckpt"))
    cb = CheckpointCallback(**kw)
    fit(cb, max_epochs=3, ckpt_path="last")
    assert all(os.path.dirname(p) == d for p in cb.best_k_models)
    assert "last.ckpt" not in {os.path.basename(p) for p in cb.best_k_models}

