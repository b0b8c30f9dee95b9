"""Resuming after the worst-timed crashes (findings of the incremental-checkpoint attack, issue #21)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
from faulty_fs import Fault, FaultPlan, register
from helpers import fit

from lightning_ckpt import CheckpointCallback, CheckpointManager, CorruptCheckpointError, Incremental, pieces

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")


@pytest.mark.parametrize("incremental", [False, True])
def test_last_resumes_a_committed_replacement_whose_plain_name_cleanup_removed(tmp_path, incremental) -> None:
    """Kill-campaign finding: a save of last.ckpt killed after its commit, before the new payload got
    its plain name; the next start's cleanup removes the replaced payload (the plain name), and is
    killed before it saves last.ckpt again. The committed last.ckpt lives under its fresh name only.
    Lightning stats the path "last" resolves to on the plain local filesystem: it must still resume
    from it, never start afresh."""
    register()
    url = str(tmp_path)
    kw = {"save_top_k": -1, "save_last": True, "incremental": incremental}
    fit(CheckpointCallback(dirpath=url, **kw), max_epochs=2)
    # the third save's retire fails where the kill would land: after the commit, before the rename
    plan = FaultPlan(Fault(op="copy", path="*/last.ckpt", times=None))
    fit(CheckpointCallback(dirpath=f"faulty://{url}", storage_options={"target_protocol": "file", "plan": plan},
                           **kw), max_epochs=3, ckpt_path="last")
    manager = CheckpointManager(url)
    assert manager.read_manifest("last.ckpt").global_step == 24
    manager.cleanup()  # the next run's start: the replaced payload at the plain name is a leftover
    assert not (tmp_path / "last.ckpt").exists() and manager.verify("last.ckpt").global_step == 24

    steps = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            steps["start"] = trainer.global_step

    cb = CheckpointCallback(dirpath=url, **kw)
    fit(cb, max_epochs=4, ckpt_path="last", extra_callbacks=[Probe()])
    assert steps["start"] == 24
    assert cb.resumed_from == manager.url_of("last.ckpt")


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_last_refuses_to_start_afresh_when_the_shared_pack_is_damaged(tmp_path, damage) -> None:
    """Every incremental checkpoint references the first save's pack (the frozen weights): a pack
    deleted, truncated or flipped by hand fails every checkpoint's verification at once. "last" must
    fail loudly, naming the damage, not take the directory for empty and start afresh (which would
    then save beside the run)."""
    url = str(tmp_path)
    kw = {"save_top_k": -1, "save_last": True, "incremental": Incremental(min_bytes=64)}  # TinyModel is small
    fit(CheckpointCallback(dirpath=url, **kw), max_epochs=2)
    manager = CheckpointManager(url)
    for pack in [f.name for f in manager.storage.list() if pieces.is_pack(f.name)]:
        path = tmp_path / pack
        if damage == "delete":
            path.unlink()
        elif damage == "truncate":
            os.truncate(path, path.stat().st_size // 2)
        else:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
    before = sorted(f.name for f in manager.storage.list())
    cb = CheckpointCallback(dirpath=url, **kw)
    with pytest.warns(Warning), pytest.raises(CorruptCheckpointError, match="refusing to start afresh"):
        fit(cb, max_epochs=3, ckpt_path="last")
    assert sorted(f.name for f in manager.storage.list()) == before  # nothing saved, nothing deleted

