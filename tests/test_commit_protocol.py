"""Never lose a committed checkpoint (issue 14): the replace path, foreign files, concurrent writers,
our own temporary names, and checkpoints written by earlier versions.

Each test reproduces one way a save that had returned success used to become unloadable.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from backends import backend  # noqa: F401
from faulty_fs import Fault, FaultPlan, register

from lightning_ckpt import (
    CheckpointManager,
    ConfigurationError,
    NameTakenError,
    RetryPolicy,
    StorageError,
)
from lightning_ckpt import layout
from lightning_ckpt.layout import History
from lightning_ckpt.storage import Storage

FAST = RetryPolicy(attempts=1, initial_delay=0.0)
DATA = Path(__file__).parent / "golden" / "format_main_2026_11"  # written by main at cb42674


def state(v: float) -> dict[str, Any]:
    return {"w": torch.full((32,), float(v)), "step": int(v)}


def loads_as(mgr: CheckpointManager, name: str) -> int:
    return int(mgr.load(name)["step"])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- 1. replacing a name keeps the old version until the new one is committed --------------------


def test_a_failed_resave_keeps_the_previous_version(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options, retry=FAST)
    mgr.save(state(8), "last.ckpt", global_step=8)

    def explode(stream: Any) -> None:
        stream.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        mgr.save(state(16), "last.ckpt", global_step=16, write=explode)
    assert loads_as(mgr, "last.ckpt") == 8
    assert [m.name for m in mgr.manifests()] == ["last.ckpt"]
    mgr.save(state(24), "last.ckpt", global_step=24)
    assert loads_as(mgr, "last.ckpt") == 24
    assert mgr.cleanup() == []
    assert {f.name for f in mgr.storage.list()} == {"last.ckpt", "last.ckpt.manifest.json"} or not mgr.storage.is_local


@pytest.mark.parametrize("op", ["open_write", "write", "close", "mv", "rm", "info"])
def test_a_fault_at_any_step_of_a_resave_leaves_old_or_new(faulty, op: str) -> None:
    url, options, plan = faulty
    mgr = CheckpointManager(url, options, retry=FAST)
    mgr.save(state(8), "last.ckpt", global_step=8)
    nth = 0
    while True:  # a fault at the 1st, 2nd, ... matching call, until a save runs past them all
        nth += 1
        plan.clear()
        before = loads_as(mgr, "last.ckpt")
        fault = plan.add(Fault(op=op, nth=nth, exc=OSError(errno.EIO, "injected")))
        try:
            mgr.save(state(100 + nth), "last.ckpt", global_step=100 + nth)
            saved = True
        except Exception:  # noqa: BLE001 - any failure is fine, losing the checkpoint is not
            saved = False
        plan.clear()
        got = loads_as(mgr, "last.ckpt")
        assert got == (100 + nth if saved else before) or (not saved and got == 100 + nth), (op, nth, saved, got)
        mgr.cleanup()
        assert loads_as(mgr, "last.ckpt") == got
        if not fault.fired:
            break
        assert nth < 200
    assert saved


def test_a_resave_on_a_local_disk_keeps_the_plain_file_name(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(state(8), "last.ckpt", global_step=8)
    mgr.save(state(16), "last.ckpt", global_step=16)
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "last.ckpt.manifest.json"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["step"] == 16  # stock tools still read it


def test_a_resave_on_s3_keeps_the_plain_name_and_no_fresh_copy(s3_bucket_url) -> None:
    url, options = s3_bucket_url
    mgr = CheckpointManager(f"{url}/run", options)
    mgr.save(state(8), "last.ckpt", global_step=8)
    mgr.save(state(16), "last.ckpt", global_step=16)
    assert {f.name for f in mgr.storage.list()} == {"last.ckpt", "last.ckpt.manifest.json"}
    assert mgr.read_manifest("last.ckpt").payload is None
    assert loads_as(mgr, "last.ckpt") == 16
    mgr.delete("last.ckpt")
    assert not [f.name for f in mgr.storage.list() if f.name.startswith("last.ckpt")]


# -- 5. concurrent writers: a live writer's files are never cleaned up ----------------------------


def test_cleanup_never_removes_a_live_writers_save(backend) -> None:  # noqa: F811
    url, options = backend
    a, b = CheckpointManager(url, options), CheckpointManager(url, options)
    removed: list[list[str]] = []

    def write(stream: Any) -> None:
        torch.save(state(8), stream)
        removed.append(b.cleanup())  # a requeued job starting up while A is between payload and manifest

    a.save(state(8), "epoch=0-step=8.ckpt", global_step=8, write=write)
    assert removed == [[]]
    assert loads_as(a, "epoch=0-step=8.ckpt") == 8


def test_cleanup_removes_a_dead_writers_leftovers(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    mgr.save(state(8), "last.ckpt", global_step=8)
    token = layout.new_token()
    physical = layout.physical_name("last.ckpt", token)
    dead = layout.Marker("last.ckpt", token, "save", physical, "last.ckpt", layout.writer_tag().split("-")[0],
                         dead_pid(), 0.0)
    mgr.storage.write_bytes(layout.marker_name("last.ckpt", token), dead.to_json())
    mgr.storage.write_bytes(physical, b"half a payload")
    assert sorted(mgr.scan().leftovers) == sorted([physical, layout.marker_name("last.ckpt", token)])
    assert sorted(mgr.cleanup()) == sorted([physical, layout.marker_name("last.ckpt", token)])
    assert loads_as(mgr, "last.ckpt") == 8


def test_another_hosts_marker_is_abandoned_only_when_stale(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options, stale_after=3600)
    token = layout.new_token()
    physical = layout.physical_name("x.ckpt", token)
    import time

    fresh = layout.Marker("x.ckpt", token, "save", physical, None, "0badc0de", 12345, time.time())
    mgr.storage.write_bytes(layout.marker_name("x.ckpt", token), fresh.to_json())
    mgr.storage.write_bytes(physical, b"uploading")
    assert mgr.cleanup() == []
    assert sorted(CheckpointManager(url, options, stale_after=0).cleanup()) == sorted(
        [physical, layout.marker_name("x.ckpt", token)])
    assert not {physical, layout.marker_name("x.ckpt", token)} & {f.name for f in mgr.storage.list()}


def test_a_save_whose_payload_vanished_before_the_commit_is_not_a_success(faulty) -> None:
    url, options, plan = faulty
    mgr = CheckpointManager(url, options, retry=FAST)
    mgr.save(state(8), "last.ckpt", global_step=8)
    other = CheckpointManager(url, options)

    def remove_the_payload(_: float) -> None:  # another process, right before our manifest is written
        for f in other.storage.list():
            if f.name.startswith("last.ckpt~lckpt-") and not f.name.endswith(".pending"):
                other.storage.delete(f.name)

    plan.add(Fault(op="open_write", kind="slow", path="*last.ckpt.manifest.json", delay=1.0, sleep=remove_the_payload))
    with pytest.raises(StorageError, match="missing after its commit"):
        mgr.save(state(16), "last.ckpt", global_step=16)
    plan.clear()
    assert loads_as(mgr, "last.ckpt") == 8  # the previous commit is put back
    mgr.cleanup()
    assert loads_as(mgr, "last.ckpt") == 8


# -- 7. names that look like ours -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["run~lckpt-0.ckpt", "x.ckpt.pending", "a.ckpt.manifest.json"])
def test_names_reserved_for_our_files_are_refused(tmp_path: Path, name: str) -> None:
    mgr = CheckpointManager(str(tmp_path))
    with pytest.raises(ConfigurationError, match="reserved"):
        mgr.save(state(1), name)


def test_a_users_file_that_looks_like_a_temporary_file_is_never_removed(tmp_path: Path) -> None:
    mine = ["notes.lckpt-tmp-keep.txt", "run.lckpt-tmp-3.ckpt", ".x~lckpt-tmp-notreally", "y~lckpt-short"]
    for name in mine:
        (tmp_path / name).write_bytes(b"user data")
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(state(1), "a.ckpt", global_step=1)
    assert mgr.cleanup() == []
    assert all((tmp_path / n).exists() for n in mine)


# -- 8. the quieter ones --------------------------------------------------------------------------


def test_a_full_disk_leaves_no_temporary_file(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    with pytest.raises(StorageError, match="No space"), storage.open_write("m.pending") as f:
        f.write(b"x")  # buffered: the flush in close() is what hits the full disk

        def full(*_: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        f.flush = full  # type: ignore[method-assign]
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_closing_leaves_no_temporary_file(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))

    class Full(Exception):
        pass

    with pytest.raises(Full), storage.open_write("m.pending") as f:
        real_close = f.close

        def close() -> None:
            real_close()
            raise OSError(errno.ENOSPC, "No space left on device")

        f.close = close  # type: ignore[method-assign]
        raise Full
    assert os.listdir(tmp_path) == []


# -- never replace what another owner or history committed ---------------------------------------


def test_a_file_we_did_not_write_is_never_overwritten(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    mgr.storage.write_bytes("last.ckpt", b"Lightning's own checkpoint")
    with pytest.raises(NameTakenError, match="did not write"):
        mgr.save(state(1), "last.ckpt", global_step=1)
    assert mgr.free_name("last.ckpt") == "last-v1.ckpt"
    mgr.save(state(1), "last-v1.ckpt", global_step=1)
    assert mgr.storage.read_bytes("last.ckpt") == b"Lightning's own checkpoint"
    assert mgr.cleanup() == [] and mgr.storage.read_bytes("last.ckpt") == b"Lightning's own checkpoint"


def test_another_owners_or_historys_checkpoint_is_never_replaced(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    first = History.new()
    mgr.save(state(24), "epoch=2-step=24.ckpt", global_step=24, owner="a", history=first)
    with pytest.raises(NameTakenError, match="another callback"):
        mgr.save(state(1), "epoch=2-step=24.ckpt", global_step=24, owner="b")
    assert mgr.free_name("epoch=2-step=24.ckpt", owner="b") == "epoch=2-step=24-v1.ckpt"
    # a second run resumed from step 8 of the first replays step 24: another history
    replay = History.new().resumed_from(type("M", (), {"run": first.run, "global_step": 8, "lineage": []})())
    with pytest.raises(NameTakenError, match="another training history"):
        mgr.save(state(2), "epoch=2-step=24.ckpt", global_step=24, owner="a", history=replay)
    # the same run, or one that continues from step 24 or later, may replace it
    later = History.new().resumed_from(type("M", (), {"run": first.run, "global_step": 24, "lineage": []})())
    assert mgr.free_name("epoch=2-step=24.ckpt", owner="a", history=later) == "epoch=2-step=24.ckpt"
    mgr.save(state(3), "epoch=2-step=24.ckpt", global_step=24, owner="a", history=first)
    assert loads_as(mgr, "epoch=2-step=24.ckpt") == 3


# -- checkpoints written by earlier versions keep loading ----------------------------------------


def test_checkpoints_written_by_main_before_issue_14_load_and_are_replaced_safely(tmp_path: Path) -> None:
    shutil.copytree(DATA, tmp_path / "ck")
    mgr = CheckpointManager(str(tmp_path / "ck"))
    assert [m.name for m in mgr.manifests()] == ["epoch=0-step=8.ckpt", "last.ckpt"]
    assert mgr.load("last.ckpt")["global_step"] == 16
    assert torch.equal(mgr.load("epoch=0-step=8.ckpt")["w"], torch.arange(6.0))
    owner = mgr.read_manifest("last.ckpt").owner
    # an old run's last.ckpt, resumed from: replaced like before (the run continues that history)
    resumed = History.new().resumed_from(mgr.read_manifest("last.ckpt"))
    mgr.save({"global_step": 24}, "last.ckpt", global_step=24, owner=owner, history=resumed)
    assert mgr.load("last.ckpt")["global_step"] == 24
    # an old marker and temporary file (no writer recorded) are leftovers, as they were
    (tmp_path / "ck" / "half.ckpt").write_bytes(b"x")
    (tmp_path / "ck" / "half.ckpt.pending").write_bytes(b'{"name": "half.ckpt", "started": 0}')
    (tmp_path / "ck" / ".half.ckpt.lckpt-tmp-0123456789ab").write_bytes(b"x")
    assert sorted(mgr.cleanup()) == [".half.ckpt.lckpt-tmp-0123456789ab", "half.ckpt", "half.ckpt.pending"]


# -- 6. `lightning-ckpt export -o` onto committed files -------------------------------------------


@pytest.mark.parametrize("target", ["last.ckpt", "last.ckpt.manifest.json", "x.ckpt.pending", "y~lckpt-0"])
def test_export_refuses_to_overwrite_a_committed_file(tmp_path: Path, target: str, capsys) -> None:  # noqa: ANN001
    from lightning_ckpt.cli import main

    mgr = CheckpointManager(str(tmp_path))
    mgr.save({"state_dict": {"w": torch.ones(3)}}, "last.ckpt", global_step=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code = main(["export", str(tmp_path / "last.ckpt"), "--output", str(tmp_path / target)])
    assert code == 2 and "refusing to write" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    mgr.verify("last.ckpt")
    assert main(["export", str(tmp_path / "last.ckpt"), "--output", str(tmp_path / "w.safetensors")]) == 0


def test_a_resave_through_a_generic_filesystem_never_writes_into_a_hard_linked_file(tmp_path: Path) -> None:
    """last.ckpt hard-linked to epoch=...ckpt (save_last=True on a local disk), then re-saved through
    a filesystem that copies into existing files in place: the other name must keep its bytes."""
    register()
    local = CheckpointManager(str(tmp_path))
    local.save(state(6), "step=6.ckpt", global_step=6)
    local.copy("step=6.ckpt", "last.ckpt", link=True)
    assert os.stat(tmp_path / "step=6.ckpt").st_ino == os.stat(tmp_path / "last.ckpt").st_ino
    generic = CheckpointManager(f"faulty://{tmp_path}", {"target_protocol": "file", "plan": FaultPlan()})
    generic.save(state(7), "last.ckpt", global_step=7)
    assert loads_as(local, "last.ckpt") == 7
    assert loads_as(local, "step=6.ckpt") == 6


@pytest.mark.parametrize("template", ["run~lckpt-{epoch}", "x~lckpt-tmp-{step}"])
def test_a_filename_template_that_could_produce_our_names_is_refused_at_construction(template: str) -> None:
    from lightning_ckpt import CheckpointCallback

    with pytest.raises(ConfigurationError, match="reserved"):
        CheckpointCallback(filename=template)
