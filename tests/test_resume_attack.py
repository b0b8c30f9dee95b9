"""Resuming after the worst-timed crashes (findings of the incremental-checkpoint attack, issue #21)."""

from __future__ import annotations

import pytest
from faulty_fs import Fault, FaultPlan, register
from helpers import fit

from lightning_ckpt import CheckpointCallback, CheckpointManager

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
    kw = dict(save_top_k=-1, save_last=True, incremental=incremental)
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

    class Probe(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001
            steps["start"] = trainer.global_step

    cb = CheckpointCallback(dirpath=url, **kw)
    fit(cb, max_epochs=4, ckpt_path="last", extra_callbacks=[Probe()])
    assert steps["start"] == 24
    assert cb.resumed_from == manager.url_of("last.ckpt")
