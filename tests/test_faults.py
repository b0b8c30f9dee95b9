"""Storage faults injected with the faulty:// filesystem, through the manager and the callback.

Every fault must give a typed error naming the URL and the cause (or, where the fault is
transient, a retry that succeeds), and leave the older checkpoints intact and loadable. A save
that *silently* loses data (a short write reporting success) commits a manifest computed from
what the writer was handed, so the damage must be caught on load. The S3 server dying in the
middle of an upload is tests/test_s3.py::test_server_dies_during_an_upload.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
import torch
from faulty_fs import Fault, FaultPlan
from helpers import fit

from lightning_ckpt import (
    CheckpointCallback,
    CheckpointManager,
    CheckpointWarning,
    CorruptCheckpointError,
    RetryPolicy,
    StorageError,
    StoragePermissionError,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")

FAST = RetryPolicy(attempts=3, initial_delay=0.0)


@pytest.fixture
def manager(faulty: tuple[str, dict[str, Any], FaultPlan]) -> CheckpointManager:
    url, options, _ = faulty
    m = CheckpointManager(url, options, retry=FAST)
    m.save(state(1), "a.ckpt", global_step=1)
    return m


def state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=g), "step": seed}


def assert_intact(manager: CheckpointManager, *names: str) -> None:
    """Exactly ``names`` are committed, each verifies and loads; no leftovers of failed saves."""
    assert [m.name for m in manager.manifests()] == list(names)
    for name in names:
        manager.verify(name)
        assert torch.equal(manager.load(name)["w"], state(1)["w"]) or name != "a.ckpt"
    files = {f.name for f in manager.storage.list()}
    assert not [f for f in files if f.endswith(".pending")], files


def test_the_nth_write_fails(manager: CheckpointManager, faulty) -> None:
    plan = faulty[2]
    plan.add(Fault(op="write", path="*b.ckpt", nth=2, exc=OSError(errno.EIO, "bad sector")))
    with pytest.raises(StorageError, match=r"b\.ckpt.*bad sector") as info:
        manager.save(state(2), "b.ckpt", global_step=2)
    assert info.value.errno == errno.EIO
    assert_intact(manager, "a.ckpt")
    assert not manager.storage.exists("b.ckpt")


def test_a_silent_short_write_is_caught_by_the_save_itself(manager: CheckpointManager, faulty) -> None:
    plan = faulty[2]
    plan.add(Fault(op="write", kind="short", path="*b.ckpt", nth=1))  # claims success, keeps half
    # the save checks what the storage holds after its commit: a lost write is never a success
    with pytest.raises(StorageError, match=r"b\.ckpt is \d+ bytes after its commit"):
        manager.save(state(2), "b.ckpt", global_step=2)
    assert_intact(manager, "a.ckpt")
    assert torch.equal(manager.load("a.ckpt")["w"], state(1)["w"])


def test_a_silently_truncated_commit_is_caught_by_the_save_itself(manager: CheckpointManager, faulty) -> None:
    faulty[2].add(Fault(op="close", kind="short", path="*b.ckpt", keep=100))
    with pytest.raises(StorageError, match="100 bytes after its commit"):
        manager.save(state(2), "b.ckpt", global_step=2)
    assert_intact(manager, "a.ckpt")


def test_damage_after_the_commit_is_refused_on_load(manager: CheckpointManager, faulty) -> None:
    manager.save(state(2), "b.ckpt", global_step=2)
    fs = manager.storage.fs
    path = manager.storage.path("b.ckpt")
    fs.pipe_file(path, fs.cat_file(path)[:100])  # truncated behind our back, after the commit
    with pytest.raises(CorruptCheckpointError, match="100 bytes"):
        manager.load("b.ckpt")
    with pytest.warns(CheckpointWarning, match="skipping damaged checkpoint"):
        assert manager.latest().name == "a.ckpt"  # "last" falls back to the older, valid one


def test_a_full_disk_is_reported_not_retried(manager: CheckpointManager, faulty) -> None:
    plan = faulty[2]
    plan.add(Fault(op="write", path="*b.ckpt", exc=OSError(errno.ENOSPC, "No space left on device"), times=None))
    with pytest.raises(StorageError, match=r"b\.ckpt.*No space left") as info:
        manager.save(state(2), "b.ckpt", global_step=2)
    assert info.value.errno == errno.ENOSPC
    assert plan.count("open_write", "*b.ckpt") == 1
    assert_intact(manager, "a.ckpt")


def test_a_permission_error_is_typed_and_not_retried(manager: CheckpointManager, faulty) -> None:
    plan = faulty[2]
    plan.add(Fault(op="open_write", path="*b.ckpt", exc=PermissionError(errno.EACCES, "access denied"), times=None))
    with pytest.raises(StoragePermissionError, match=r"b\.ckpt.*access denied") as info:
        manager.save(state(2), "b.ckpt", global_step=2)
    assert isinstance(info.value, PermissionError)
    assert plan.count("open_write", "*b.ckpt") == 1
    # reads too: a refused manifest read is a permission error, tried once
    plan.add(Fault(op="read", path="*a.ckpt.manifest.json", exc=PermissionError(errno.EACCES, "denied")))
    before = plan.count("read", "*a.ckpt.manifest.json")
    with pytest.raises(StoragePermissionError, match=r"a\.ckpt"):
        manager.read_manifest("a.ckpt")
    assert plan.count("read", "*a.ckpt.manifest.json") == before + 1
    assert_intact(manager, "a.ckpt")


def test_a_hanging_write_times_out_with_a_storage_error(manager: CheckpointManager, faulty) -> None:
    hang = faulty[2].add(Fault(op="write", kind="hang", path="*b.ckpt", timeout=0.3))
    with pytest.raises(StorageError, match=r"b\.ckpt.*TimeoutError"):
        manager.save(state(2), "b.ckpt", global_step=2)
    assert hang.entered.is_set()
    assert_intact(manager, "a.ckpt")


def test_a_hanging_read_times_out_and_is_retried(manager: CheckpointManager, faulty) -> None:
    plan = faulty[2]
    plan.add(Fault(op="read", kind="hang", path="*a.ckpt.manifest.json", timeout=0.2))
    before = plan.count("read", "*a.ckpt.manifest.json")
    assert manager.read_manifest("a.ckpt").global_step == 1
    assert plan.count("read", "*a.ckpt.manifest.json") == before + 2


def test_slow_writes_still_commit(manager: CheckpointManager, faulty) -> None:
    faulty[2].add(Fault(op="write", kind="slow", delay=0.01, path="*b.ckpt", times=None))
    manager.save(state(2), "b.ckpt", global_step=2)
    assert torch.equal(manager.load("b.ckpt")["w"], state(2)["w"])
    assert [m.name for m in manager.manifests()] == ["a.ckpt", "b.ckpt"]


def test_a_failing_listing_is_an_error_not_an_empty_directory(manager: CheckpointManager, faulty) -> None:
    plan = faulty[2]
    plan.add(Fault(op="ls", exc=OSError(errno.EIO, "listing exploded"), times=None))
    with pytest.raises(StorageError, match="listing exploded") as info:
        manager.latest()
    assert manager.url in str(info.value)
    with pytest.raises(StorageError):
        manager.cleanup()


def test_a_transient_failure_is_retried_then_succeeds(manager: CheckpointManager, faulty) -> None:
    plan = faulty[2]
    plan.add(Fault(op="ls", exc=TimeoutError("read timed out"), times=1))
    plan.add(Fault(op="read", path="*a.ckpt.manifest.json", exc=ConnectionResetError(errno.ECONNRESET, "reset"),
                   times=2))
    reads, lists = plan.count("read", "*a.ckpt.manifest.json"), plan.count("ls")
    assert [m.name for m in manager.manifests()] == ["a.ckpt"]
    assert plan.count("ls") == lists + 2  # failed once, retried
    assert plan.count("read", "*a.ckpt.manifest.json") == reads + 3  # failed twice, third try read it
    manager.save(state(2), "b.ckpt", global_step=2)
    assert [m.name for m in manager.manifests()] == ["a.ckpt", "b.ckpt"]


def test_a_transient_failure_of_the_commit_write_is_retried(manager: CheckpointManager, faulty) -> None:
    plan = faulty[2]
    plan.add(Fault(op="close", path="*b.ckpt.manifest.json", exc=ConnectionResetError(errno.ECONNRESET, "reset"),
                   times=2))
    manager.save(state(2), "b.ckpt", global_step=2)
    assert plan.count("close", "*b.ckpt.manifest.json") == 3


def test_a_transient_failure_that_persists_gives_up_after_the_policy(manager: CheckpointManager, faulty) -> None:
    plan = faulty[2]
    plan.add(Fault(op="ls", exc=ConnectionResetError(errno.ECONNRESET, "reset by peer"), times=None))
    lists = plan.count("ls")
    with pytest.raises(StorageError, match="reset by peer"):
        manager.manifests()
    assert plan.count("ls") == lists + FAST.attempts


# -- through the callback -----------------------------------------------------------------------


def test_resume_from_last_raises_when_the_listing_fails(faulty) -> None:
    url, options, plan = faulty
    fit(CheckpointCallback(dirpath=url, storage_options=options, save_top_k=-1), max_epochs=1)
    plan.add(Fault(op="ls", exc=OSError(errno.EIO, "bucket unreachable"), times=None))
    cb = CheckpointCallback(dirpath=url, storage_options=options, save_top_k=-1, retry=FAST)
    with pytest.raises(StorageError, match="bucket unreachable"):  # never a silent fresh start
        fit(cb, max_epochs=2, ckpt_path="last")
    plan.clear()
    assert [m.name for m in cb.manager.manifests()] == ["epoch=0-step=8.ckpt"]


def test_a_silent_short_write_during_training_fails_that_save_only(faulty) -> None:
    url, options, plan = faulty
    plan.add(Fault(op="write", kind="short", path="*epoch=1-step=16.ckpt", nth=1))
    with pytest.warns(CheckpointWarning, match=r"epoch=1-step=16.ckpt FAILED.*bytes after its commit"):
        fit(CheckpointCallback(dirpath=url, storage_options=options, save_top_k=-1), max_epochs=3)
    cb = CheckpointCallback(dirpath=url, storage_options=options, save_top_k=-1)
    assert [m.name for m in cb.manager.manifests()] == ["epoch=0-step=8.ckpt", "epoch=2-step=24.ckpt"]
    trainer, _ = fit(cb, max_epochs=4, ckpt_path="last")
    assert cb.resumed_from is not None and cb.resumed_from.endswith("epoch=2-step=24.ckpt")
    assert trainer.global_step == 32


def test_failing_deletes_during_retention_warn_and_training_continues(faulty) -> None:
    url, options, plan = faulty
    plan.add(Fault(op="rm", path="*epoch=0-step=8.ckpt.manifest.json", times=None,
                   exc=OSError(errno.EIO, "delete refused")))
    cb = CheckpointCallback(dirpath=url, storage_options=options, save_top_k=1, retry=FAST)
    with pytest.warns(CheckpointWarning, match=r"could not delete .*epoch=0-step=8.ckpt"):
        trainer, _ = fit(cb, max_epochs=3)
    assert trainer.global_step == 24
    names = [m.name for m in cb.manager.manifests()]
    assert names[-1] == "epoch=2-step=24.ckpt" and "epoch=0-step=8.ckpt" in names  # kept, still committed
    for name in names:
        cb.manager.verify(name)
    plan.clear()
    assert cb.manager.load("epoch=2-step=24.ckpt")["global_step"] == 24
    removed = cb.manager.cleanup()  # the delete's marker only; the checkpoint stays
    assert len(removed) == 1 and removed[0].startswith("epoch=0-step=8.ckpt~lckpt-") and removed[0].endswith(".pending")
    cb.manager.verify("epoch=0-step=8.ckpt")
