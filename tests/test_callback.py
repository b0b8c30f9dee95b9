"""CheckpointCallback end to end on a tiny CPU model: save, resume, top-k, last/best, corruption."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from backends import backend  # noqa: F401
from faulty_fs import Fault, FaultPlan, register
from helpers import FakeClock, TinyModel, fit

from lightning_ckpt import (
    CheckpointCallback,
    CheckpointManager,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    MonitorNotFoundError,
    UnsupportedURLError,
)
from lightning_ckpt.policies import OverheadBudget

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")


def names(cb: CheckpointCallback) -> list[str]:
    return sorted(m.name for m in cb.manager.manifests())


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "avg"}, "mode"),
        ({"save_top_k": -2}, "save_top_k"),
        ({"save_top_k": 3}, "monitor=None"),
        ({"every_n_epochs": 1, "every_n_train_steps": 5}, "mutually exclusive"),
        ({"every_n_train_steps": 5, "train_time_interval": timedelta(minutes=1)}, "mutually exclusive"),
        ({"every_n_train_steps": -1}, "every_n_train_steps"),
        ({"train_time_interval": 60}, "timedelta"),
        ({"filename": "a/{epoch}"}, "must not contain"),
        ({"save_last": "symlink"}, "save_last"),
        ({"storage_options": "key=1"}, "storage_options"),
        ({"overhead_budget": 1}, "between 0 and 1"),
        ({"overhead_budget": 0.01, "train_time_interval": timedelta(minutes=1)}, "mutually exclusive"),
        ({"overhead_budget": 0.01, "every_n_train_steps": 5}, "mutually exclusive"),
        ({"overhead_budget": 0.01, "every_n_epochs": 2}, "mutually exclusive"),
    ],
)
def test_invalid_configuration_fails_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CheckpointCallback(dirpath="memory://x", **kwargs)


def test_unknown_protocol_fails_at_construction() -> None:
    with pytest.raises(UnsupportedURLError):
        CheckpointCallback(dirpath="nope://bucket/run")


# -- saving and resuming ------------------------------------------------------------------------


def test_resume_continues_exactly_where_it_stopped(backend) -> None:  # noqa: F811
    url, options = backend
    kw = dict(dirpath=url, storage_options=options, monitor="val_loss", save_top_k=2, save_last=True)
    cb1 = CheckpointCallback(**kw)
    t1, m1 = fit(cb1, max_epochs=2, ckpt_path="last")  # first run: nothing there, starts fresh
    assert cb1.resumed_from is None and t1.global_step == 16

    last = cb1.manager.load("last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 16)
    assert torch.equal(last["state_dict"]["net.0.weight"], m1.net[0].weight)
    opt_state = t1.optimizers[0].state_dict()["state"]
    assert torch.equal(last["optimizer_states"][0]["state"][0]["exp_avg"], opt_state[0]["exp_avg"])
    assert last["lr_schedulers"][0]["last_epoch"] == 2

    cb2 = CheckpointCallback(**kw)
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001
            seen["epoch"], seen["step"] = trainer.current_epoch, trainer.global_step
            seen["opt_step"] = trainer.optimizers[0].state_dict()["state"][0]["step"].item()
            seen["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
            seen["w"] = pl_module.net[0].weight.detach().clone()

    t2, _ = fit(cb2, max_epochs=3, ckpt_path="last", extra_callbacks=[Probe()])
    assert cb2.resumed_from == cb1.manager.url_of("last.ckpt")
    assert (seen["epoch"], seen["step"], seen["opt_step"]) == (2, 16, 16)
    assert seen["lr"] == pytest.approx(0.05)  # StepLR(step_size=3) has not decayed after 2 epochs
    assert torch.equal(seen["w"], m1.net[0].weight)
    assert t2.global_step == 24 and t2.current_epoch == 3
    assert cb2.best_model_score is not None and cb2.best_model_path


def test_top_k_last_and_best(backend) -> None:  # noqa: F811
    url, options = backend
    cb = CheckpointCallback(dirpath=url, storage_options=options, filename="{epoch}-{val_loss:.3f}",
                            monitor="val_loss", save_top_k=2, save_last=True)
    fit(cb, max_epochs=4)
    kept = [m for m in cb.manager.manifests(owner=cb.owner)]
    assert len(kept) == 2
    assert names(cb) == sorted([m.name for m in kept] + ["last.ckpt"])
    scores = sorted(m.score for m in kept)
    assert cb.best_model_score.item() == pytest.approx(scores[0])
    assert cb.best_model_path == cb.manager.url_of(min(kept, key=lambda m: m.score).name)
    assert cb.last_model_path == cb.manager.url_of("last.ckpt")
    assert all(n.startswith("epoch=") and "-val_loss=" in n for n in (m.name for m in kept))
    assert set(cb.best_k_models) == {cb.manager.url_of(m.name) for m in kept}
    # "best" is found in a new process too, from storage alone
    fresh = CheckpointCallback(dirpath=url, storage_options=options, filename="{epoch}-{val_loss:.3f}",
                               monitor="val_loss", save_top_k=2)
    assert fresh.best_model_path == cb.best_model_path


def test_monitor_none_keeps_only_the_latest(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path))
    fit(cb, max_epochs=3)
    assert names(cb) == ["epoch=2-step=24.ckpt"]
    assert cb.best_model_path.endswith("epoch=2-step=24.ckpt")


def test_save_top_k_all_and_every_n_epochs(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), save_top_k=-1, every_n_epochs=2)
    fit(cb, max_epochs=4)
    assert names(cb) == ["epoch=1-step=16.ckpt", "epoch=3-step=32.ckpt"]


def test_every_n_train_steps_and_monitor_step(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), every_n_train_steps=5, monitor="step", mode="max",
                            save_top_k=2, filename="{step}")
    fit(cb, max_epochs=2)
    assert names(cb) == ["step=10.ckpt", "step=15.ckpt"]


def test_train_time_interval(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), train_time_interval=timedelta(microseconds=1), save_top_k=-1)
    fit(cb, max_epochs=1)
    assert len(names(cb)) == 8  # due after every step


class OneSecondSteps(pl.Callback):
    """Every training step takes one second of the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args: object) -> None:
        self.clock.advance(1.0)


def test_overhead_budget_adapts_the_interval_to_the_measured_save_cost() -> None:
    """Saves cost 0.5 s, then 2 s (slower storage): within 10 % they come 5 s, then 20 s apart."""
    register()
    clock = FakeClock()
    plan = FaultPlan(  # the payload's commit is where the (fake) time goes
        Fault(op="close", kind="slow", path="*.ckpt", delay=0.5, times=2, sleep=clock.advance),
        Fault(op="close", kind="slow", path="*.ckpt", nth=3, delay=2.0, times=None, sleep=clock.advance),
    )
    budget = OverheadBudget(0.1, min_interval=0, warmup=3, clock=clock)
    cb = CheckpointCallback(dirpath="faulty://budget/ckpts", storage_options={"target_protocol": "memory",
                            "plan": plan}, overhead_budget=budget, save_top_k=-1, filename="{step}")
    fit(cb, max_epochs=4, extra_callbacks=[OneSecondSteps(clock)])  # 32 steps
    steps = [m.global_step for m in cb.manager.manifests()]
    # step 3: the warm-up (nothing measured yet); 0.5 s measured -> one every 5 s: steps 8 and 13
    # (8 waits for the epoch's validation); 2 s measured at 13 -> the next 20 s later, at step 31
    assert steps == [3, 8, 13, 31]
    assert budget.save_seconds == pytest.approx(2.0)
    assert "overhead_budget" in cb.state_key


def test_overhead_budget_first_save_is_at_the_first_epoch_end(tmp_path) -> None:
    """Within the default 10-minute warm-up a short epoch ends first; its save is measured."""
    budget = OverheadBudget(0.01, clock=FakeClock())  # time stands still: no interval ever passes
    cb = CheckpointCallback(dirpath=str(tmp_path), overhead_budget=budget, save_top_k=-1)
    fit(cb, max_epochs=2)
    assert names(cb) == ["epoch=0-step=8.ckpt"]
    assert budget.save_seconds == 0.0  # measured with the (frozen) clock


def test_overhead_budget_as_a_fraction_builds_the_policy() -> None:
    cb = CheckpointCallback(dirpath="memory://budget", overhead_budget=0.02)
    assert isinstance(cb.trigger, OverheadBudget) and cb.trigger is cb.overhead_budget
    assert (cb.trigger.budget, cb.trigger.min_interval, cb.trigger.warmup) == (0.02, 60.0, 600.0)


def test_save_weights_only(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), save_weights_only=True)
    fit(cb, max_epochs=1)
    ckpt = cb.manager.load(names(cb)[0])
    assert "state_dict" in ckpt and "optimizer_states" not in ckpt


def test_monitor_missing_raises_typed_error(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), monitor="val_acc")
    with pytest.raises(MonitorNotFoundError, match="val_acc"):
        fit(cb, max_epochs=1)


def test_name_clash_gets_a_version_suffix(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), filename="{epoch}", every_n_train_steps=4, save_top_k=-1,
                            monitor="step", mode="max")
    fit(cb, max_epochs=1)
    assert names(cb) == ["epoch=0-v1.ckpt", "epoch=0.ckpt"]
    # as Lightning, without a monitor the previous checkpoint's name is reused (it is replaced)
    cb = CheckpointCallback(dirpath=str(tmp_path / "b"), filename="{epoch}", every_n_train_steps=4, save_top_k=-1)
    fit(cb, max_epochs=1)
    assert names(cb) == ["epoch=0.ckpt"] and cb.manager.load("epoch=0.ckpt")["global_step"] == 8


# -- corruption, fallbacks and bookkeeping ---------------------------------------------------------


def test_last_skips_a_damaged_checkpoint_and_takes_the_previous(backend) -> None:  # noqa: F811
    url, options = backend
    kw = dict(dirpath=url, storage_options=options, save_top_k=-1)
    cb1 = CheckpointCallback(**kw)
    fit(cb1, max_epochs=3)
    newest = cb1.manager.manifests()[-1].name
    cb1.manager.storage.write_bytes(newest, b"damaged")
    cb2 = CheckpointCallback(**kw)
    with pytest.warns(CheckpointWarning, match="damaged"):
        fit(cb2, max_epochs=3, ckpt_path="last")
    assert cb2.resumed_from == cb1.manager.url_of("epoch=1-step=16.ckpt")
    # run 2 trained epoch 2 again: as Lightning, the name is taken, so it gets -v1 (the damaged
    # file is not ours to replace by another save)
    assert cb1.manager.verify("epoch=2-step=24-v1.ckpt")
    # an explicitly named damaged checkpoint is an error, and nothing is deleted
    cb3 = CheckpointCallback(**kw)
    with pytest.raises(CorruptCheckpointError, match=newest):
        fit(cb3, max_epochs=4, ckpt_path=cb1.manager.url_of(newest))
    assert cb1.manager.storage.exists(newest)


def test_explicit_missing_path_is_an_error(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        fit(cb, max_epochs=1, ckpt_path=str(tmp_path / "nope.ckpt"))


def test_bookkeeping_survives_restart(backend) -> None:  # noqa: F811
    url, options = backend
    kw = dict(dirpath=url, storage_options=options, monitor="val_loss", save_top_k=1, save_last=True)
    cb1 = CheckpointCallback(**kw)
    fit(cb1, max_epochs=3, seed=1)
    cb1.manager.storage.write_bytes("notes.txt", b"my notes")
    cb1.manager.storage.write_bytes("other-run.ckpt", b"not ours")
    best_before = cb1.best_model_path
    # resume from the best (not the newest) checkpoint: it must survive retention
    cb2 = CheckpointCallback(**kw)
    fit(cb2, max_epochs=6, ckpt_path=best_before, seed=1)
    assert cb2.resumed_from == best_before
    files = {f.name for f in cb2.manager.storage.list()}
    assert {"notes.txt", "other-run.ckpt"} <= files
    assert best_before.rsplit("/", 1)[-1] in files
    owned = cb2.manager.manifests(owner=cb2.owner)
    assert cb2.best_model_score.item() == pytest.approx(min(m.score for m in owned))
    assert cb2.last_model_path == cb2.manager.url_of("last.ckpt")
    assert cb2.manager.load("last.ckpt")["global_step"] == 48


def test_leftovers_of_an_interrupted_save_are_cleaned_at_setup(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    (tmp_path / "epoch=9-step=99.ckpt").write_bytes(b"half")
    (tmp_path / "epoch=9-step=99.ckpt.pending").write_bytes(b"{}")
    (tmp_path / ".x.ckpt.lckpt-tmp-0123456789ab").write_bytes(b"tmp")  # an older version's temporary file
    cb = CheckpointCallback(dirpath=str(tmp_path))
    fit(cb, max_epochs=1)
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=8.ckpt", "epoch=0-step=8.ckpt.manifest.json"]
    assert mgr.latest().name == "epoch=0-step=8.ckpt"


# -- compatibility --------------------------------------------------------------------------------


def test_stock_loaders_read_our_checkpoints(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), save_last=True)
    _, model = fit(cb, max_epochs=1)
    raw = torch.load(cb.last_model_path, weights_only=True)
    assert raw["global_step"] == 8 and "state_dict" in raw
    restored = TinyModel.load_from_checkpoint(cb.last_model_path)
    assert torch.equal(restored.net[0].weight, model.net[0].weight)
    # and a plain Lightning ModelCheckpoint file resumes through our loader (unverified, with a warning)
    t = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False)
    t.strategy.connect(model)
    plain = tmp_path / "plain" / "p.ckpt"
    plain.parent.mkdir()
    torch.save(raw, plain)
    cb2 = CheckpointCallback(dirpath=str(tmp_path / "new"))
    with pytest.warns(CheckpointWarning, match="dirpath has changed"), \
            pytest.warns(CheckpointWarning, match="unverified"):
        t2, _ = fit(cb2, max_epochs=2, ckpt_path=str(plain))
    assert t2.global_step == 16


def test_map_location_cpu(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path))
    fit(cb, max_epochs=1)
    ckpt = cb.manager.load(names(cb)[0], map_location=torch.device("cpu"))
    assert ckpt["state_dict"]["net.0.weight"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_checkpoint_loads_on_cpu_and_back(tmp_path) -> None:  # pragma: no cover - GPU only
    cb = CheckpointCallback(dirpath=str(tmp_path), save_last=True)
    fit(cb, max_epochs=1, accelerator="gpu", devices=1)
    on_cpu = cb.manager.load("last.ckpt", map_location="cpu")
    assert on_cpu["state_dict"]["net.0.weight"].device.type == "cpu"
    on_gpu = cb.manager.load("last.ckpt", map_location="cuda")
    assert on_gpu["state_dict"]["net.0.weight"].is_cuda


# -- messages and metrics ---------------------------------------------------------------------------


def test_verbose_prints_lightning_lines(tmp_path, caplog) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), monitor="val_loss", save_top_k=1, verbose=True)
    with caplog.at_level(logging.INFO):
        fit(cb, max_epochs=3)
    lines = [r.getMessage() for r in caplog.records if "global step" in r.getMessage()]
    first = f"Epoch 0, global step 8: 'val_loss' reached "
    assert lines[0].startswith(first) and f"saving model to '{tmp_path}" in lines[0] and lines[0].endswith("as top 1")
    best = [line for line in lines if "reached" in line][-1]
    assert f"(best {float(cb.best_model_score):0.5f})" in best


def test_every_save_logs_its_cost_to_the_loggers(tmp_path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    cb = CheckpointCallback(dirpath=str(tmp_path / "ckpts"), save_top_k=-1)
    logger = CSVLogger(str(tmp_path / "logs"), name="run")
    fit(cb, max_epochs=2, logger=logger)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("checkpoint/bytes")]
    assert len(rows) == 2
    sizes = {m.name: m.size for m in cb.manager.manifests()}
    assert {float(r["checkpoint/bytes"]) for r in rows} == {float(v) for v in sizes.values()}
    assert all(float(r["checkpoint/throughput_mb_s"]) > 0 for r in rows)


# -- the default dirpath: a new lightning_logs/version_N each run ---------------------------------


def _rerun_with_default_dirpath(root, max_epochs: int, name: str = "exp"):  # noqa: ANN001, ANN202
    from lightning.pytorch.loggers import CSVLogger

    callback = CheckpointCallback(monitor="val_loss", save_last=True)
    trainer, _ = fit(callback, max_epochs=max_epochs, ckpt_path="last", default_root_dir=str(root),
                     logger=CSVLogger(str(root), name=name))
    return trainer, callback


def test_default_dirpath_rerun_resumes_the_newest_earlier_version(tmp_path, caplog, recwarn) -> None:
    first, cb1 = _rerun_with_default_dirpath(tmp_path, 1)
    assert cb1.resumed_from is None
    assert cb1.dirpath == str(tmp_path / "exp" / "version_0" / "checkpoints")
    caplog.clear()

    second, cb2 = _rerun_with_default_dirpath(tmp_path, 2)
    err = caplog.text
    assert cb2.dirpath == str(tmp_path / "exp" / "version_1" / "checkpoints")  # Lightning's new version
    assert cb2.resumed_from == str(tmp_path / "exp" / "version_0" / "checkpoints" / "last.ckpt")
    assert second.global_step == 16  # continued: 8 steps of run 1 + 8 of its own
    # said so, naming where it came from and what to set
    assert f"resuming from {cb2.resumed_from}" in err
    assert "earlier run" in err and "dirpath=" in err

    third, cb3 = _rerun_with_default_dirpath(tmp_path, 3)
    assert cb3.resumed_from == str(tmp_path / "exp" / "version_1" / "checkpoints" / "last.ckpt")
    assert third.global_step == 24
    # resuming another directory's checkpoint on purpose is no surprise worth a warning
    assert not [w for w in recwarn if issubclass(w.category, CheckpointWarning)]


def test_default_dirpath_never_resumes_another_experiments_versions(tmp_path) -> None:
    _rerun_with_default_dirpath(tmp_path, 1, name="exp")
    trainer, callback = _rerun_with_default_dirpath(tmp_path, 1, name="other")  # another logger name
    assert callback.resumed_from is None and trainer.global_step == 8
    assert callback.dirpath == str(tmp_path / "other" / "version_0" / "checkpoints")


def test_default_dirpath_skips_earlier_versions_without_a_resumable_checkpoint(tmp_path) -> None:
    _rerun_with_default_dirpath(tmp_path, 1)  # version_0: a checkpoint
    (tmp_path / "exp" / "version_1").mkdir()  # a run that died before its first save
    (tmp_path / "exp" / "version_2" / "checkpoints").mkdir(parents=True)
    (tmp_path / "exp" / "version_2" / "checkpoints" / "stray.ckpt").write_bytes(b"not ours")  # never touched
    _, callback = _rerun_with_default_dirpath(tmp_path, 2)
    assert callback.dirpath == str(tmp_path / "exp" / "version_3" / "checkpoints")
    assert callback.resumed_from == str(tmp_path / "exp" / "version_0" / "checkpoints" / "last.ckpt")
    assert (tmp_path / "exp" / "version_2" / "checkpoints" / "stray.ckpt").read_bytes() == b"not ours"
