"""Directories shared with other writers (issue 14): stock ModelCheckpoint's files, a second
callback, another training history, another run; and a full disk on the only copy of the newest state.

A file we did not write is never overwritten or deleted, a save never replaces a checkpoint that
another callback or another history committed (it goes to ``-vN``, with a warning), and a
directory of unverified checkpoints is not "empty".
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from faulty_fs import Fault, FaultPlan, register
from helpers import TinyModel, data, fit, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt import CheckpointCallback, CheckpointManager, CheckpointNotFoundError, CheckpointWarning, ConfigurationError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning", "ignore::lightning_ckpt.CheckpointWarning")


def digest(path: Path) -> bytes:
    return path.read_bytes()


def test_a_failed_resave_of_last_keeps_the_previous_last(tmp_path: Path) -> None:
    register()
    plan = FaultPlan()
    url, options = f"faulty://f-{uuid.uuid4().hex[:8]}/ck", {"target_protocol": "memory", "plan": plan}
    kw = dict(dirpath=url, storage_options=options, save_top_k=1, save_last=True)
    cb = CheckpointCallback(**kw)
    fit(cb, max_epochs=3)
    assert cb.manager.load("last.ckpt", weights_only=False)["global_step"] == 24
    # the next run's re-save of last.ckpt (a copy of its newest checkpoint) fails: a full disk
    plan.add(Fault(op="copy", path="*last.ckpt*", times=None, exc=OSError(errno.ENOSPC, "No space")))
    plan.add(Fault(op="write", path="*last.ckpt~lckpt-*", times=None, exc=OSError(errno.ENOSPC, "No space")))
    with pytest.raises(Exception, match="No space"):
        fit(CheckpointCallback(**kw), max_epochs=4, ckpt_path="last")
    plan.clear()
    # the previous last.ckpt was never taken apart: still there, still step 24
    assert cb.manager.load("last.ckpt", weights_only=False)["global_step"] == 24
    cb3 = CheckpointCallback(**kw)
    t3, _ = fit(cb3, max_epochs=5, ckpt_path="last")
    assert t3.global_step == 40


def test_switching_from_model_checkpoint_never_touches_its_files(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    fit(ModelCheckpoint(dirpath=ck, save_last=True, save_top_k=1), max_epochs=3)
    theirs = {p.name: digest(p) for p in ck.iterdir()}
    assert "last.ckpt" in theirs and "epoch=2-step=24.ckpt" in theirs
    cb = CheckpointCallback(dirpath=str(ck), save_last=True, save_top_k=1)
    with pytest.warns(CheckpointWarning, match="no committed checkpoint.*last.ckpt.*not verified"):
        t, _ = fit(cb, max_epochs=5, ckpt_path="last")
    assert t.global_step == 40  # resumed from Lightning's last.ckpt (step 24), not from scratch
    for name, content in theirs.items():
        assert (ck / name).read_bytes() == content, f"{name} was overwritten or deleted"
    ours = [m.name for m in cb.manager.manifests()]
    assert "last-v1.ckpt" in ours and "last.ckpt" not in ours


def test_last_in_a_directory_of_only_unverified_checkpoints_does_not_start_fresh(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    fit(ModelCheckpoint(dirpath=ck, save_top_k=-1), max_epochs=2)  # no last.ckpt
    cb = CheckpointCallback(dirpath=str(ck))
    with pytest.raises(CheckpointNotFoundError, match="without a lightning-ckpt manifest"):
        fit(cb, max_epochs=3, ckpt_path="last")


def test_two_callbacks_in_one_directory_keep_their_own_files(tmp_path: Path) -> None:
    class TwoMetrics(TinyModel):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            super().validation_step(batch, batch_idx)
            self.log("val_acc", float(self.current_epoch % 2), on_epoch=True)

    ck = str(tmp_path / "ck")
    low = CheckpointCallback(dirpath=ck, monitor="val_loss", mode="min", save_top_k=1)
    high = CheckpointCallback(dirpath=ck, monitor="val_acc", mode="max", save_top_k=1)
    t = trainer([low, high], max_epochs=4)
    t.fit(TwoMetrics(), *data())
    mgr = CheckpointManager(ck)
    for cb in (low, high):
        mine = mgr.manifests(owner=cb.owner)
        assert len(mine) >= 1
        best = Path(cb.best_model_path).name
        assert best in {m.name for m in mine}
        mgr.verify(best)
    names = [m.name for m in mgr.manifests()]
    assert len(names) == len(set(names))


def test_resuming_from_best_never_replaces_the_original_runs_later_checkpoints(tmp_path: Path) -> None:
    ck = str(tmp_path / "ck")
    fit(CheckpointCallback(dirpath=ck, save_top_k=-1, save_last=True), max_epochs=3)
    mgr = CheckpointManager(ck)
    before = {m.name: m.digest for m in mgr.manifests()}
    assert {"epoch=1-step=16.ckpt", "epoch=2-step=24.ckpt", "last.ckpt"} <= set(before)
    cb = CheckpointCallback(dirpath=ck, save_top_k=-1, save_last=True)
    with pytest.warns(CheckpointWarning, match=r"holds a checkpoint of another run.*saving as"):
        fit(cb, max_epochs=3, ckpt_path=str(Path(ck) / "epoch=0-step=8.ckpt"), seed=1)
    after = {m.name: m.digest for m in mgr.manifests()}
    for name, sha in before.items():
        assert after[name] == sha, f"{name} of the original history was replaced"
    assert {"epoch=1-step=16-v1.ckpt", "epoch=2-step=24-v1.ckpt", "last-v1.ckpt"} <= set(after)


def test_a_fresh_run_into_a_used_directory_warns_and_keeps_the_other_runs_files(tmp_path: Path) -> None:
    ck = str(tmp_path / "ck")
    fit(CheckpointCallback(dirpath=ck, save_last=True), max_epochs=1)
    before = {m.name: m.digest for m in CheckpointManager(ck).manifests()}
    with pytest.warns(CheckpointWarning, match="is not empty"):
        fit(CheckpointCallback(dirpath=ck, save_last=True), max_epochs=1, seed=3)
    after = {m.name: m.digest for m in CheckpointManager(ck).manifests()}
    assert all(after[n] == s for n, s in before.items())
    assert "epoch=0-step=8-v1.ckpt" in after and "last-v1.ckpt" in after


def test_dirpath_that_is_a_file_fails_at_setup(tmp_path: Path) -> None:
    target = tmp_path / "not-a-dir"
    target.write_bytes(b"x")
    cb = CheckpointCallback(dirpath=str(target))
    with pytest.raises(ConfigurationError, match="is a file"):
        fit(cb, max_epochs=3)
    assert target.read_bytes() == b"x"


def test_resuming_from_last_replaces_last_in_place(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    fit(CheckpointCallback(dirpath=str(ck), save_last=True), max_epochs=1)
    cb = CheckpointCallback(dirpath=str(ck), save_last=True)
    fit(cb, max_epochs=2, ckpt_path="last")
    names = sorted(os.listdir(ck))
    assert "last-v1.ckpt" not in names
    assert torch.load(ck / "last.ckpt", weights_only=False)["global_step"] == 16
