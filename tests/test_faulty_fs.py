"""Tests of the fault-injecting ``faulty://`` filesystem (``faulty_fs.py``).

First that, with no faults, it behaves like its target (memory and local alike, paths spelled
the caller's way), and that code which only has the URL and the storage options reaches the
configured faults, from any thread. Then each fault kind on each kind of operation: errors,
short writes/reads/commits, hangs the test releases, slow calls, counts (``nth``/``times``) and
path globs.
"""

from __future__ import annotations

import copy
import errno
import io
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from faulty_fs import Call, Fault, FaultPlan, FaultyFileSystem, register

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(autouse=True)
def _registered() -> None:
    register()


@pytest.fixture
def plan() -> FaultPlan:
    return FaultPlan()


@pytest.fixture
def memfs(plan: FaultPlan, request: pytest.FixtureRequest) -> Iterator[tuple[FaultyFileSystem, str]]:
    """A faulty filesystem over memory, and a fresh bucket-like root, removed afterwards."""
    fs = fsspec.filesystem("faulty", target_protocol="memory", plan=plan, name=request.node.name)
    root = f"bucket-{uuid.uuid4().hex[:8]}"
    yield fs, root
    if fs.target.exists(f"/{root}"):
        fs.target.rm(f"/{root}", recursive=True)


@pytest.fixture(params=["memory", "local"])
def anyfs(
    request: pytest.FixtureRequest, plan: FaultPlan, tmp_path: Path
) -> Iterator[tuple[FaultyFileSystem, str]]:
    """The same checks over a memory and a local target."""
    if request.param == "memory":
        root = f"bucket-{uuid.uuid4().hex[:8]}"
    else:
        root = str(tmp_path / "root")
        Path(root).mkdir()
    fs = fsspec.filesystem("faulty", target_protocol=request.param, plan=plan, name=request.node.name)
    yield fs, root
    if request.param == "memory" and fs.target.exists(f"/{root}"):
        fs.target.rm(f"/{root}", recursive=True)


# ------------------------------------------------------------------- reaching the instance
def test_import_registers_nothing() -> None:
    code = "import fsspec, faulty_fs; assert 'faulty' not in fsspec.registry, 'registered at import'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def test_url_and_storage_options_reach_the_configured_instance() -> None:
    fs = fsspec.filesystem("faulty", target_protocol="memory", name="t1")

    via_url, path = fsspec.core.url_to_fs("faulty://bucket/x", target_protocol="memory", name="t1")

    assert via_url is fs
    assert path == "bucket/x"
    assert fsspec.filesystem("faulty", target_protocol="memory", name="t2") is not fs


def test_a_plan_in_the_storage_options_is_shared_across_threads(memfs: tuple[FaultyFileSystem, str]) -> None:
    """fsspec caches sync filesystems per thread; the plan is what threads share."""
    fs, root = memfs
    fs.add_fault(Fault(op="open_write", exc=ENOSPC))
    options = dict(fs.storage_options)
    seen: dict[str, Any] = {}

    def library_code() -> None:  # only has the URL and the storage options, in another thread
        other, path = fsspec.core.url_to_fs(f"faulty://{root}/ckpt", **options)
        seen["same_instance"] = other is fs
        try:
            other.pipe_file(path, b"data")
        except OSError as exc:
            seen["errno"] = exc.errno

    thread = threading.Thread(target=library_code)
    thread.start()
    thread.join()

    assert seen == {"same_instance": False, "errno": errno.ENOSPC}
    assert fs.count("open_write") == 1


def test_adding_faults_keeps_the_url_reaching_the_same_instance(plan: FaultPlan) -> None:
    fs = fsspec.filesystem("faulty", target_protocol="memory", plan=plan)
    fs.add_fault(Fault(op="ls"))
    fs.calls.append(Call("ls", "x"))

    via_url, _ = fsspec.core.url_to_fs("faulty://bucket/x", target_protocol="memory", plan=plan)

    assert via_url is fs


def test_plans_stay_distinct_in_the_instance_cache() -> None:
    a, b = FaultPlan(), FaultPlan()
    fs_a = fsspec.filesystem("faulty", target_protocol="memory", plan=a)
    fs_b = fsspec.filesystem("faulty", target_protocol="memory", plan=b)
    assert fs_a is not fs_b and fs_a.plan is a and fs_b.plan is b
    assert copy.deepcopy({"plan": a})["plan"] is a  # options may be copied; the plan is shared


# -------------------------------------------------------------- no faults: like the target
def test_without_faults_it_behaves_like_the_target(anyfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = anyfs
    target = fs.target
    fs.makedirs(f"{root}/dir", exist_ok=True)
    fs.pipe_file(f"{root}/dir/a.bin", b"alpha")
    with fs.open(f"{root}/dir/b.bin", "wb") as f:
        f.write(b"be")
        f.write(b"ta")
    with fs.open(f"{root}/note.txt", "w") as f:
        f.write("text\n")

    assert fs.cat_file(f"{root}/dir/a.bin") == b"alpha"
    assert fs.cat_file(f"{root}/dir/a.bin", start=1, end=3) == b"lp"
    with fs.open(f"{root}/dir/b.bin", "rb") as f:
        assert f.read(2) == b"be"
        assert f.tell() == 2
        f.seek(0)
        assert f.read() == b"beta"
    with fs.open(f"{root}/note.txt", "r") as f:
        assert f.read() == "text\n"
    assert sorted(fs.ls(f"{root}/dir", detail=False)) == [f"{root}/dir/a.bin", f"{root}/dir/b.bin"]
    assert {e["name"]: e["size"] for e in fs.ls(f"{root}/dir")} == {
        f"{root}/dir/a.bin": 5,
        f"{root}/dir/b.bin": 4,
    }
    assert fs.find(root) == [f"{root}/dir/a.bin", f"{root}/dir/b.bin", f"{root}/note.txt"]
    assert fs.glob(f"{root}/dir/*.bin") == [f"{root}/dir/a.bin", f"{root}/dir/b.bin"]
    assert [r for r, _, _ in fs.walk(root)] == [root, f"{root}/dir"]
    info = fs.info(f"{root}/dir/a.bin")
    assert info["name"] == f"{root}/dir/a.bin" and info["size"] == 5 and info["type"] == "file"
    assert fs.exists(f"{root}/dir/a.bin") and not fs.exists(f"{root}/nope")
    assert fs.isdir(f"{root}/dir") and fs.isfile(f"{root}/note.txt")
    assert fs.size(f"{root}/dir/a.bin") == 5
    assert fs.modified(f"{root}/dir/a.bin") == target.modified(fs._to_target(f"{root}/dir/a.bin"))
    assert fs.created(f"{root}/dir/a.bin") is not None
    with pytest.raises(FileNotFoundError):
        fs.info(f"{root}/nope")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{root}/nope")

    fs.mv(f"{root}/dir/a.bin", f"{root}/moved.bin")
    fs.cp_file(f"{root}/moved.bin", f"{root}/copied.bin")
    fs.copy(f"{root}/copied.bin", f"{root}/copied2.bin")
    fs.rm_file(f"{root}/copied2.bin")
    fs.rm(f"{root}/dir", recursive=True)

    assert fs.find(root) == [f"{root}/copied.bin", f"{root}/moved.bin", f"{root}/note.txt"]
    assert fs.cat_file(f"{root}/copied.bin") == b"alpha"
    assert target.cat_file(fs._to_target(f"{root}/moved.bin")) == b"alpha"  # it is the target's data
    assert [c.op for c in fs.calls][:3] == ["mkdir", "open_write", "write"]


def test_paths_keep_the_callers_spelling(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fs.pipe_file(f"faulty://{root}/x", b"1")
    assert fs.ls(root, detail=False) == [f"{root}/x"]
    assert fs.ls(f"/{root}", detail=False) == [f"/{root}/x"]  # memory's own spelling works too
    assert fs.info(f"faulty://{root}/x")["name"] == f"{root}/x"


def test_torch_save_and_load_through_faulty_files(memfs: tuple[FaultyFileSystem, str]) -> None:
    torch = pytest.importorskip("torch")
    fs, root = memfs
    state = {"w": torch.arange(10, dtype=torch.float32), "step": 3}

    with fs.open(f"{root}/model.pt", "wb") as f:
        torch.save(state, f)
    with fs.open(f"{root}/model.pt", "rb") as f:
        loaded = torch.load(io.BytesIO(f.read()), weights_only=True)
    with fs.open(f"{root}/model.pt", "rb") as f:
        loaded_direct = torch.load(f, weights_only=True)

    for result in (loaded, loaded_direct):
        assert result["step"] == 3 and torch.equal(result["w"], state["w"])


# ------------------------------------------------------------------------------- errors
def test_error_at_open_for_write_creates_nothing(anyfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = anyfs
    fs.add_fault(Fault(op="open_write", exc=ENOSPC))

    with pytest.raises(OSError) as excinfo:
        fs.open(f"{root}/x", "wb")

    assert excinfo.value.errno == errno.ENOSPC
    assert not fs.exists(f"{root}/x")
    fs.pipe_file(f"{root}/x", b"ok")  # times=1: the next open succeeds
    assert fs.cat_file(f"{root}/x") == b"ok"


def test_the_nth_write_fails_then_writes_succeed(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fault = fs.add_fault(Fault(op="write", nth=2, exc=ENOSPC))

    with fs.open(f"{root}/x", "wb") as f:
        f.write(b"one")
        with pytest.raises(OSError, match="No space left"):
            f.write(b"two")
        f.write(b"three")

    assert fs.cat_file(f"{root}/x") == b"onethree"
    assert (fault.seen, fault.fired) == (3, 1)
    assert fs.count("write") == 3


def test_times_none_fails_every_call_from_nth_on(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fs.add_fault(Fault(op="write", nth=2, times=None))
    with fs.open(f"{root}/x", "wb") as f:
        f.write(b"1")
        for _ in range(3):
            with pytest.raises(OSError) as excinfo:
                f.write(b"2")
            assert excinfo.value.errno == errno.EIO  # the default injected error


def test_a_path_glob_limits_the_fault(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fs.add_fault(Fault(op="write", path="*.manifest.json", times=None, exc=PermissionError("denied")))

    fs.pipe_file(f"{root}/step-1/model.bin", b"payload")
    with pytest.raises(PermissionError):
        fs.pipe_file(f"{root}/step-1/step-1.manifest.json", b"{}")

    assert fs.cat_file(f"{root}/step-1/model.bin") == b"payload"
    assert fs.count("write", "*.manifest.json") == 1
    assert fs.count("write") == 2


def test_close_error_on_memory_keeps_what_was_written_like_the_target(
    memfs: tuple[FaultyFileSystem, str],
) -> None:
    """Memory (like a local disk) shows data as it is written; a failed close cannot hide it."""
    fs, root = memfs
    fs.add_fault(Fault(op="close", exc=OSError(errno.EIO, "commit failed")))

    with pytest.raises(OSError, match="commit failed"), fs.open(f"{root}/x", "wb") as f:
        f.write(b"data")

    assert f.closed
    assert fs.cat_file(f"{root}/x") == b"data"


def test_close_error_on_s3_commits_nothing_unless_commit_is_set(
    s3_bucket_url: tuple[str, dict[str, Any]],
) -> None:
    """Over a real object store a failed close leaves no object; commit=True is the ambiguous case."""
    url, options = s3_bucket_url
    bucket = url.removeprefix("s3://")
    fs = fsspec.filesystem("faulty", target_protocol="s3", target_options=options, plan=FaultPlan())
    fs.add_fault(Fault(op="close", path="*/lost"))
    fs.add_fault(Fault(op="close", path="*/landed", commit=True))

    for name in ("lost", "landed"):
        with pytest.raises(OSError), fs.open(f"{bucket}/{name}", "wb") as f:
            f.write(b"data")

    assert not fs.exists(f"{bucket}/lost")
    assert fs.cat_file(f"{bucket}/landed") == b"data"


@pytest.mark.parametrize(
    ("op", "call"),
    [
        ("ls", lambda fs, root: fs.ls(root)),
        ("ls", lambda fs, root: fs.find(root)),
        ("info", lambda fs, root: fs.info(f"{root}/x")),
        ("info", lambda fs, root: fs.exists(f"{root}/x")),  # raises, never "absent"
        ("read", lambda fs, root: fs.cat_file(f"{root}/x")),
        ("read", lambda fs, root: fs.open(f"{root}/x", "rb").read()),
        ("open_read", lambda fs, root: fs.open(f"{root}/x", "rb")),
        ("rm", lambda fs, root: fs.rm_file(f"{root}/x")),
        ("rm", lambda fs, root: fs.rm(f"{root}/x")),
        ("mv", lambda fs, root: fs.mv(f"{root}/x", f"{root}/y")),
        ("copy", lambda fs, root: fs.cp_file(f"{root}/x", f"{root}/y")),
        ("mkdir", lambda fs, root: fs.makedirs(f"{root}/d", exist_ok=True)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_errors_on_every_op_leave_the_target_untouched(
    anyfs: tuple[FaultyFileSystem, str], op: str, call: Any
) -> None:
    fs, root = anyfs
    fs.pipe_file(f"{root}/x", b"data")
    fs.add_fault(Fault(op=op, exc=PermissionError(errno.EACCES, "Access Denied")))  # type: ignore[arg-type]

    with pytest.raises(PermissionError):
        call(fs, root)

    assert fs.find(root) == [f"{root}/x"]
    assert fs.cat_file(f"{root}/x") == b"data"


def test_mv_fault_matches_the_destination(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fs.pipe_file(f"{root}/tmp-123", b"{}")
    fs.add_fault(Fault(op="mv", path="*.manifest.json"))

    with pytest.raises(OSError):
        fs.mv(f"{root}/tmp-123", f"{root}/ckpt.manifest.json")

    assert fs.calls[-1] == Call("mv", f"{root}/tmp-123", f"{root}/ckpt.manifest.json")
    assert fs.count("mv", "*.manifest.json") == 1
    assert fs.find(root) == [f"{root}/tmp-123"]


# ------------------------------------------------------------------------ short data
def test_a_silent_short_write_loses_data_without_an_error(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fs.add_fault(Fault(op="write", kind="short", nth=2, keep=3))

    with fs.open(f"{root}/x", "wb") as f:
        assert f.write(b"aaaa") == 4
        assert f.write(b"bbbbbb") == 6  # claims the whole chunk
        f.write(b"cc")

    assert fs.cat_file(f"{root}/x") == b"aaaabbbcc"


def test_a_short_write_with_exc_writes_part_then_raises(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fs.add_fault(Fault(op="write", kind="short", exc=ENOSPC))  # keep=None: half the chunk

    with pytest.raises(OSError) as excinfo, fs.open(f"{root}/x", "wb") as f:
        f.write(b"12345678")

    assert excinfo.value.errno == errno.ENOSPC
    assert fs.cat_file(f"{root}/x") == b"1234"  # the with-block's close still committed it


def test_a_short_close_truncates_the_committed_object(anyfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = anyfs
    fs.add_fault(Fault(op="close", kind="short", path="*.bin", keep=-1))

    fs.pipe_file(f"{root}/model.bin", b"0123456789")  # no error

    assert fs.cat_file(f"{root}/model.bin") == b"012345678"


def test_short_reads_return_less_than_was_stored(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fs.pipe_file(f"{root}/x", b"0123456789")
    fs.add_fault(Fault(op="read", kind="short", keep=4, times=2))

    assert fs.cat_file(f"{root}/x") == b"0123"
    with fs.open(f"{root}/x", "rb") as f:
        assert f.read() == b"0123"
    assert fs.cat_file(f"{root}/x") == b"0123456789"  # the fault has fired twice: done


# --------------------------------------------------------------------------- hang, slow
def test_a_hang_blocks_until_the_test_releases_it(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fault = fs.add_fault(Fault(op="write", kind="hang"))
    finished = threading.Event()

    def writer() -> None:
        fs.pipe_file(f"{root}/x", b"data")
        finished.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert fault.entered.wait(10), "the write never reached the hang"
    assert not finished.is_set()
    assert fs.cat_file(f"{root}/x") == b""  # opened, nothing written yet

    fault.release.set()
    thread.join(10)

    assert finished.is_set()
    assert fs.cat_file(f"{root}/x") == b"data"


def test_an_unreleased_hang_times_out(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fs.add_fault(Fault(op="ls", kind="hang", timeout=0.01))
    with pytest.raises(TimeoutError):
        fs.ls(root)


def test_a_released_hang_can_then_fail(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fault = fs.add_fault(Fault(op="info", kind="hang", exc=ConnectionResetError("reset")))
    fault.release.set()  # released before the call: no blocking, just the error
    with pytest.raises(ConnectionResetError):
        fs.info(f"{root}/x")


def test_slow_delays_each_matching_call(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fault = fs.add_fault(Fault(op="write", kind="slow", delay=0.001, times=None))

    with fs.open(f"{root}/x", "wb") as f:
        for _ in range(5):
            f.write(b"chunk")

    assert fault.fired == 5
    assert fs.cat_file(f"{root}/x") == b"chunk" * 5


def test_slow_sleeps_through_an_injected_sleep(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    slept: list[float] = []
    fs.add_fault(Fault(op="close", kind="slow", delay=5.0, times=None, sleep=slept.append))

    with fs.open(f"{root}/x", "wb") as f:
        f.write(b"data")

    assert slept == [5.0]
    assert fs.cat_file(f"{root}/x") == b"data"


# ------------------------------------------------------------------------- bookkeeping
def test_calls_record_every_operation_in_order(memfs: tuple[FaultyFileSystem, str]) -> None:
    fs, root = memfs
    fs.pipe_file(f"{root}/x", b"1")
    fs.ls(root)
    fs.rm_file(f"{root}/x")
    assert fs.calls == [
        Call("open_write", f"{root}/x"),
        Call("write", f"{root}/x"),
        Call("close", f"{root}/x"),
        Call("ls", root),
        Call("rm", f"{root}/x"),
    ]
    fs.plan.clear()
    assert fs.calls == [] and fs.faults == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"op": "nope"},
        {"op": "write", "kind": "explode"},
        {"op": "ls", "kind": "short"},
        {"op": "write", "nth": 0},
        {"op": "write", "times": 0},
        {"op": "write", "exc": OSError},
        {"op": "write", "kind": "slow"},
        {"op": "write", "commit": True},
    ],
)
def test_bad_fault_rules_are_rejected_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        Fault(**kwargs)


def test_construction_needs_exactly_one_target() -> None:
    with pytest.raises(ValueError):
        FaultyFileSystem(skip_instance_cache=True)
    with pytest.raises(ValueError):
        FaultyFileSystem(target_protocol="faulty", skip_instance_cache=True)
