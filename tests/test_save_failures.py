"""What training does when a save fails: warn and retry periodic saves, fail the final one.

Faults come from a real fault-injecting fsspec filesystem (tests/faulty_fs.py) wrapping
``memory://``; older checkpoints must stay intact and loadable whatever fails.
"""

from __future__ import annotations

import errno

import lightning.pytorch as pl
import pytest
from faulty_fs import Fault
from helpers import fit

from lightning_ckpt import CheckpointCallback, CheckpointWarning, StorageError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")


def test_a_failed_periodic_save_warns_and_the_next_one_succeeds(faulty) -> None:  # noqa: ANN001
    url, options, plan = faulty
    # the second checkpoint's payload hits a full disk
    plan.add(Fault(op="open_write", path="*epoch=1-step=16.ckpt", exc=OSError(errno.ENOSPC, "No space left")))
    cb = CheckpointCallback(dirpath=url, storage_options=options, save_top_k=-1)
    with pytest.warns(CheckpointWarning, match=r"epoch=1-step=16.ckpt FAILED .*No space left"):
        trainer, _ = fit(cb, max_epochs=3)
    assert trainer.global_step == 24 and cb.failed_saves == 1
    names = [m.name for m in cb.manager.manifests()]
    assert names == ["epoch=0-step=8.ckpt", "epoch=2-step=24.ckpt"]
    for name in names:
        cb.manager.verify(name)
    assert not [f.name for f in cb.manager.storage.list() if "epoch=1" in f.name]  # nothing half-written


def test_a_failed_save_never_deletes_the_older_checkpoint(faulty) -> None:  # noqa: ANN001
    url, options, plan = faulty
    # save_top_k=1 would delete the older checkpoint after a successful newer one; here the
    # newer one fails in its commit (the manifest write), so the older one must survive
    plan.add(Fault(op="open_write", path="*epoch=1-step=16.ckpt.manifest.json", exc=OSError(errno.EIO, "I/O")))
    cb = CheckpointCallback(dirpath=url, storage_options=options, save_top_k=1)
    seen: dict[int, list[str]] = {}

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # noqa: ANN001
            seen[trainer.current_epoch] = [m.name for m in cb.manager.manifests()]

    with pytest.warns(CheckpointWarning, match="FAILED"):
        fit(cb, max_epochs=3, extra_callbacks=[Probe()])
    assert seen[2] == ["epoch=0-step=8.ckpt"]  # after the failed save, the older one is still there
    assert [m.name for m in cb.manager.manifests()] == ["epoch=2-step=24.ckpt"]  # then retention as usual
    assert not [f.name for f in cb.manager.storage.list() if "epoch=1" in f.name]


def test_a_failed_final_save_fails_the_run(faulty) -> None:  # noqa: ANN001
    url, options, plan = faulty
    plan.add(Fault(op="write", path="*epoch=1-step=16.ckpt", exc=OSError(errno.EIO, "disk on fire")))
    cb = CheckpointCallback(dirpath=url, storage_options=options, save_top_k=-1)
    with pytest.raises(StorageError, match=r"epoch=1-step=16.ckpt.*disk on fire"):
        fit(cb, max_epochs=2)
    assert [m.name for m in cb.manager.manifests()] == ["epoch=0-step=8.ckpt"]


def test_fail_on_save_error_fails_on_the_first(faulty) -> None:  # noqa: ANN001
    url, options, plan = faulty
    plan.add(Fault(op="open_write", path="*epoch=0-step=8.ckpt", exc=PermissionError(errno.EACCES, "denied")))
    cb = CheckpointCallback(dirpath=url, storage_options=options, fail_on_save_error=True)
    with pytest.raises(PermissionError, match="denied"):
        fit(cb, max_epochs=3)
