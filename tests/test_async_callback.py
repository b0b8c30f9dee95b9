"""CheckpointCallback(async_save=True): same checkpoints, bit for bit, persisted in the background."""

from __future__ import annotations

import errno

import lightning.pytorch as pl
import pytest
import torch
from faulty_fs import Fault
from helpers import TinyModel, data, fit, trainer

from lightning_ckpt import CheckpointCallback, CheckpointWarning, ConfigurationError, StorageError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning", "ignore:.*set_vital.*")


def tensors_equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(tensors_equal, a, b))
    return a == b


def test_async_checkpoints_equal_synchronous_ones_bit_for_bit(tmp_path) -> None:
    kw = dict(monitor="val_loss", save_top_k=2, save_last=True, every_n_train_steps=4)
    sync = CheckpointCallback(dirpath=str(tmp_path / "sync"), **kw)
    fit(sync, max_epochs=3)
    background = CheckpointCallback(dirpath=str(tmp_path / "async"), async_save=True, **kw)
    fit(background, max_epochs=3)
    names = [m.name for m in sync.manager.manifests()]
    assert names == [m.name for m in background.manager.manifests()] and len(names) == 3
    for name in names:
        a, b = sync.manager.load(name), background.manager.load(name)
        for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "epoch", "global_step"):
            assert tensors_equal(a[key], b[key]), (name, key)
    assert background.best_model_path.endswith(sync.best_model_path.rsplit("/", 1)[-1])
    assert background.manager.load("last.ckpt")["global_step"] == 24


def test_async_resume_continues_identically(tmp_path) -> None:
    full = CheckpointCallback(dirpath=str(tmp_path / "full"), async_save=True, save_top_k=-1)
    _, uninterrupted = fit(full, max_epochs=4)
    cut = CheckpointCallback(dirpath=str(tmp_path / "cut"), async_save=True, save_top_k=-1)
    fit(cut, max_epochs=2)
    resumed_cb = CheckpointCallback(dirpath=str(tmp_path / "cut"), async_save=True, save_top_k=-1)
    _, resumed = fit(resumed_cb, max_epochs=4, ckpt_path="last")
    assert resumed_cb.resumed_from.endswith("epoch=1-step=16.ckpt")
    assert tensors_equal(uninterrupted.state_dict(), resumed.state_dict())


def test_a_failed_background_save_warns_and_keeps_the_older_one(faulty) -> None:  # noqa: ANN001
    url, options, plan = faulty
    plan.add(Fault(op="write", path="*epoch=1-step=16.ckpt", exc=OSError(errno.ENOSPC, "No space left")))
    cb = CheckpointCallback(dirpath=url, storage_options=options, save_top_k=1, async_save=True)
    with pytest.warns(CheckpointWarning, match=r"epoch=1-step=16.ckpt FAILED in the background .*No space"):
        trainer, _ = fit(cb, max_epochs=3)
    assert trainer.global_step == 24 and cb.failed_saves == 1
    assert [m.name for m in cb.manager.manifests()] == ["epoch=2-step=24.ckpt"]
    assert not [f.name for f in cb.manager.storage.list() if "epoch=1" in f.name]


def test_a_failed_final_background_save_fails_the_run(faulty) -> None:  # noqa: ANN001
    url, options, plan = faulty
    plan.add(Fault(op="write", path="*epoch=1-step=16.ckpt", exc=OSError(errno.EIO, "disk on fire")))
    cb = CheckpointCallback(dirpath=url, storage_options=options, save_top_k=1, async_save=True)
    with pytest.raises(StorageError, match="disk on fire"):
        fit(cb, max_epochs=2)
    assert [m.name for m in cb.manager.manifests()] == ["epoch=0-step=8.ckpt"]


def test_skip_policy_never_queues(faulty) -> None:  # noqa: ANN001
    url, options, plan = faulty
    gate = plan.add(Fault(op="close", kind="hang", path="*step=1.ckpt", timeout=60))
    class Release(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            if trainer.global_step == 5:  # saves at steps 2..4 found step 1's save still persisting
                gate.release.set()

    cb = CheckpointCallback(dirpath=url, storage_options=options, every_n_train_steps=1, save_top_k=-1,
                            filename="{step}", async_save=True, when_busy="skip")
    with pytest.warns(CheckpointWarning, match="still persisting"):
        fit(cb, max_epochs=1, extra_callbacks=[Release()])
    names = {m.name for m in cb.manager.manifests()}
    assert {"step=1.ckpt", "step=8.ckpt"} <= names  # the run's last save waits instead of skipping
    assert not names & {"step=2.ckpt", "step=3.ckpt", "step=4.ckpt"}  # skipped, not queued


def test_an_exception_abandons_the_save_in_flight(faulty) -> None:  # noqa: ANN001
    url, options, plan = faulty
    gate = plan.add(Fault(op="close", kind="hang", path="*epoch=0-step=8.ckpt", timeout=60))

    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            if trainer.global_step == 10:
                raise RuntimeError("training blew up")

    cb = CheckpointCallback(dirpath=url, storage_options=options, async_save=True)
    with pytest.raises(RuntimeError, match="blew up"):
        fit(cb, max_epochs=3, extra_callbacks=[Boom()])
    gate.release.set()
    assert cb.manager.manifests() == [] or [m.name for m in cb.manager.manifests()] == ["epoch=0-step=8.ckpt"]
    cb.manager.cleanup()
    assert all(f.name.startswith("epoch=0-step=8.ckpt") for f in cb.manager.storage.list())


def test_bad_busy_policy() -> None:
    with pytest.raises(ConfigurationError, match="when_busy"):
        CheckpointCallback(dirpath="memory://x", async_save=True, when_busy="queue")


class Scored(TinyModel):
    """Logs ``score`` = ``scores[epoch]`` at every validation."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        super().validation_step(batch, batch_idx)
        self.log("score", float(self.scores[self.current_epoch]))


def fit_scored(cb: CheckpointCallback, scores: list[float], extra: list | None = None) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    t = trainer([cb, *(extra or [])], max_epochs=len(scores))
    t.fit(Scored(scores), *data())
    return t


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_save_never_counts_as_the_best(faulty, async_save: bool) -> None:  # noqa: ANN001
    url, options, plan = faulty
    plan.add(Fault(op="write", path="*epoch=1-step=16.ckpt", exc=OSError(errno.EIO, "disk on fire")))
    cb = CheckpointCallback(dirpath=url, storage_options=options, monitor="score", mode="min", save_top_k=1,
                            async_save=async_save)
    with pytest.warns(CheckpointWarning, match="epoch=1-step=16.ckpt FAILED"):
        t = fit_scored(cb, [3, 1, 2])  # epoch 1 (the best) fails: epoch 2 beats what committed
    assert t.global_step == 24 and cb.failed_saves == 1
    assert [m.name for m in cb.manager.manifests()] == ["epoch=2-step=24.ckpt"]
    assert cb.best_model_path == cb.manager.url_of("epoch=2-step=24.ckpt") and float(cb.best_model_score) == 2
    assert list(cb.best_k_models) == [cb.best_model_path]


def test_best_and_last_never_name_a_save_still_persisting(faulty) -> None:  # noqa: ANN001
    url, options, plan = faulty
    gate = plan.add(Fault(op="close", kind="hang", path="*epoch=1-step=16.ckpt", timeout=60))
    seen = []

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            if trainer.global_step == 18:  # epoch 1's save (the best so far) still persists
                committed = {cb.manager.url_of(m.name) for m in cb.manager.manifests()}
                seen.append((cb.best_model_path, set(cb.best_k_models), cb.last_model_path, committed))
                gate.release.set()

    cb = CheckpointCallback(dirpath=url, storage_options=options, monitor="score", mode="min", save_top_k=2,
                            save_last=True, async_save=True)
    fit_scored(cb, [3, 1, 2], extra=[Look()])
    ((best, top, last, committed),) = seen
    assert best == cb.manager.url_of("epoch=0-step=8.ckpt") and top == {best}
    assert last == cb.manager.url_of("last.ckpt") and last in committed
    # once it committed, it counts
    assert cb.best_model_path == cb.manager.url_of("epoch=1-step=16.ckpt")
    assert set(cb.best_k_models) == {cb.manager.url_of(n) for n in ("epoch=1-step=16.ckpt", "epoch=2-step=24.ckpt")}
    assert cb.manager.load("last.ckpt")["global_step"] == 24
