"""The storage layer over every backend: atomic writes, listing, honest errors."""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import uuid
from pathlib import Path

import pytest
import torch
from backends import backend  # noqa: F401
from faulty_fs import Fault, FaultPlan, register

import lightning_ckpt
from lightning_ckpt import CheckpointManager
from lightning_ckpt.errors import (
    BucketNotFoundError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    StorageError,
    StoragePermissionError,
    UnsupportedURLError,
)
from lightning_ckpt.storage import TEMP_MARK, Expected, RetryPolicy, Storage, is_transient, split_url


def test_write_read_list_delete(backend) -> None:  # noqa: F811
    url, options = backend
    s = Storage(url, options)
    assert s.list() == []  # an absent directory is empty, not an error
    s.write_bytes("a.bin", b"hello")
    with s.open_write("b.bin") as f:
        f.write(b"x" * 100)
    assert {f.name: f.size for f in s.list()} == {"a.bin": 5, "b.bin": 100}
    assert s.read_bytes("a.bin") == b"hello"
    assert s.exists("a.bin") and not s.exists("zzz")
    s.delete("a.bin")
    s.delete("a.bin")  # deleting an absent file is not an error
    assert [f.name for f in s.list()] == ["b.bin"]


def test_failed_write_leaves_nothing_and_keeps_old_content(backend) -> None:  # noqa: F811
    url, options = backend
    s = Storage(url, options)
    s.write_bytes("c.bin", b"old")
    with pytest.raises(RuntimeError), s.open_write("c.bin") as f:
        f.write(b"new-partial")
        raise RuntimeError("boom")
    names = [f.name for f in s.list()]
    assert not any(TEMP_MARK in n for n in names)
    if not url.startswith("memory://"):  # an atomic rename or upload: the old content survives
        assert s.read_bytes("c.bin") == b"old"
    with pytest.raises(RuntimeError), s.open_write("c.bin") as f:  # several blocks/parts on their way
        f.write(os.urandom(3 * 2**20) * 7)
        raise RuntimeError("boom")
    if not url.startswith("memory://"):
        assert s.read_bytes("c.bin") == b"old"
    with pytest.raises(RuntimeError), s.open_write("d.bin") as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert not s.exists("d.bin")


def test_copy(backend) -> None:  # noqa: F811
    url, options = backend
    s = Storage(url, options)
    s.write_bytes("src", b"payload")
    s.copy("src", "dst")
    s.write_bytes("src", b"changed")  # a later rewrite of the source does not reach the copy
    assert s.read_bytes("dst") == b"payload"


def test_read_into_reports_longer_files(backend) -> None:  # noqa: F811
    url, options = backend
    s = Storage(url, options)
    s.write_bytes("f", b"0123456789")
    buf = bytearray(4)
    assert s.read_into("f", memoryview(buf)) == 5  # len + 1 means "longer than expected"
    buf = bytearray(10)
    seen = []
    assert s.read_into("f", memoryview(buf), sink=lambda v: seen.append(bytes(v))) == 10
    assert b"".join(seen) == b"0123456789"


def test_missing_file_is_not_found(backend) -> None:  # noqa: F811
    url, options = backend
    s = Storage(url, options)
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        s.read_bytes("nope")
    with pytest.raises(FileNotFoundError):
        s.info("nope")


def test_directory_where_a_file_should_be(tmp_path) -> None:
    (tmp_path / "d" / "x.ckpt").mkdir(parents=True)
    s = Storage(str(tmp_path / "d"))
    with pytest.raises(StorageError, match="directory"):
        s.info("x.ckpt")


def test_unknown_protocol_and_missing_backend() -> None:
    with pytest.raises(UnsupportedURLError, match="nope"):
        Storage("nope://bucket/x")
    with pytest.raises(ValueError):
        Storage("nope://bucket/x")


@pytest.mark.parametrize("bad", ["", None, 3])
def test_bad_directory(bad) -> None:  # noqa: ANN001
    with pytest.raises(ConfigurationError):
        Storage(bad)


@pytest.mark.parametrize("bad", ["", "a/b", "..", "."])
def test_bad_names(tmp_path, bad: str) -> None:
    with pytest.raises(ConfigurationError):
        Storage(str(tmp_path)).path(bad)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_error_is_typed(tmp_path) -> None:  # pragma: no cover - CI runs as root
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    with pytest.raises(StoragePermissionError):
        Storage(str(d)).write_bytes("x", b"1")


def test_local_urls_are_plain_paths(tmp_path) -> None:
    assert Storage(str(tmp_path)).url == str(tmp_path)
    assert Storage(f"file://{tmp_path}").url == f"file://{tmp_path}"
    assert Storage(f"{tmp_path}/a/../b").root == str(tmp_path / "b")


def test_split_url() -> None:
    assert split_url("s3://b/run/x.ckpt") == ("s3://b/run", "x.ckpt")
    assert split_url("memory://x.ckpt") == ("memory://", "x.ckpt")
    assert split_url("/tmp/x.ckpt") == ("/tmp", "x.ckpt")
    assert split_url("x.ckpt") == (".", "x.ckpt")
    with pytest.raises(ConfigurationError):
        split_url("")


def test_retry_classification_and_backoff() -> None:
    import errno

    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(OSError(errno.ECONNRESET, "reset"))
    assert is_transient(RuntimeError("SlowDown: please reduce your request rate"))
    assert not is_transient(PermissionError())
    assert not is_transient(FileNotFoundError())
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    policy = RetryPolicy(attempts=3, initial_delay=1.0, max_delay=3.0)
    assert 0.5 <= policy.delay(1) <= 1.0 and policy.delay(5) <= 3.0
    with pytest.raises(ConfigurationError):
        RetryPolicy(attempts=0)


def test_botocore_connection_errors_are_transient() -> None:
    class EndpointConnectionError(Exception):  # botocore's class name and message, not an OSError
        pass

    assert is_transient(EndpointConnectionError('Could not connect to the endpoint URL: "http://x"'))


def test_a_missing_bucket_is_an_error_but_a_missing_prefix_is_empty(s3_server, s3_bucket_url) -> None:
    url, options = s3_bucket_url
    assert Storage(f"{url}/no/such/prefix", options).list() == []  # legitimately empty
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    with pytest.raises(BucketNotFoundError, match=bucket) as info:
        Storage(f"s3://{bucket}/run", options).list()
    assert not isinstance(info.value, FileNotFoundError)  # never "no checkpoint yet"
    with pytest.raises(BucketNotFoundError, match=bucket):
        Storage(f"s3://{bucket}", options).list()
    manager = CheckpointManager(f"s3://{bucket}/run", options)
    with pytest.raises(BucketNotFoundError):
        manager.latest()  # what ckpt_path="last" asks: an error, not a fresh start
    with pytest.raises(BucketNotFoundError, match=bucket):
        manager.save({"w": torch.ones(2)}, "a.ckpt")
    with pytest.raises(FileNotFoundError):
        s3_server.filesystem().info(bucket)  # and nothing created it


# -- S3: parallel multipart uploads ------------------------------------------------------------


def _uploads(server, url: str) -> list[dict]:
    """Incomplete multipart uploads in the bucket of ``url``, asked with a separate client."""
    fs = server.filesystem()
    return fs.call_s3("list_multipart_uploads", Bucket=url.removeprefix("s3://").split("/")[0]).get("Uploads") or []


def own_client(options: dict) -> dict:
    """Options for a filesystem of the test's own: hooks attached to it cannot reach other tests."""
    return {**options, "skip_instance_cache": True}


class S3Calls:
    """Counts (and optionally fails) S3 API calls of a filesystem: botocore event hooks, no mocks."""

    def __init__(self, fs, fail: dict[str, int] | None = None) -> None:
        self.count: dict[str, int] = {}
        self.fail = dict(fail or {})
        fs.connect()
        fs.s3.meta.events.register("before-call.s3", self._seen, unique_id=f"s3calls-{id(self)}")

    def _seen(self, model, **kwargs) -> None:
        self.count[model.name] = self.count.get(model.name, 0) + 1
        if self.fail.get(model.name, 0) > 0:
            self.fail[model.name] -= 1
            raise ConnectionResetError(f"injected reset before {model.name}")


def test_s3_small_objects_are_one_put_and_large_ones_parallel_parts(s3_server, s3_bucket_url) -> None:
    from lightning_ckpt.storage import PART_SIZE

    url, options = s3_bucket_url
    s = Storage(f"{url}/run", own_client(options))
    calls = S3Calls(s.fs)
    s.write_bytes("small", b"x" * 1000)
    assert calls.count.get("PutObject") == 1 and "CreateMultipartUpload" not in calls.count
    data = os.urandom(2**20) * (2 * PART_SIZE // 2**20 + 5)  # two full parts and a short third
    with s.open_write("big") as f:
        for start in range(0, len(data), 3 * 2**20 + 7):  # odd block sizes straddle part borders
            f.write(data[start : start + 3 * 2**20 + 7])
    assert calls.count.get("UploadPart") == 3 and calls.count.get("CompleteMultipartUpload") == 1
    assert s3_server.filesystem().cat_file(f"{url.removeprefix('s3://')}/run/big") == data
    assert _uploads(s3_server, url) == []


def test_s3_failed_upload_is_aborted_and_invisible(s3_server, s3_bucket_url) -> None:
    from lightning_ckpt.storage import PART_SIZE

    url, options = s3_bucket_url
    s = Storage(f"{url}/run", options)
    with pytest.raises(RuntimeError, match="boom"), s.open_write("big") as f:
        f.write(bytes(3 * PART_SIZE))  # three parts on their way
        raise RuntimeError("boom")
    assert not s.exists("big")
    assert _uploads(s3_server, url) == []  # aborted: no parts left on the server


def test_s3_transient_part_failures_are_retried(s3_server, s3_bucket_url) -> None:
    from lightning_ckpt.storage import PART_SIZE

    url, options = s3_bucket_url
    s = Storage(f"{url}/run", own_client(options), retry=RetryPolicy(attempts=4, initial_delay=0.01))
    s.fs.retries = 1  # s3fs's own retry loop off: ours must do it
    calls = S3Calls(s.fs, fail={"UploadPart": 2})
    data = os.urandom(2 * PART_SIZE + 10)
    with s.open_write("big") as f:
        f.write(data)
    assert calls.count["UploadPart"] == 3 + 2
    assert s.read_bytes("big") == data
    calls.fail = {"UploadPart": 100}  # a part that never succeeds: a StorageError naming the URL
    with pytest.raises(StorageError, match=f"{url}/run/doomed"), s.open_write("doomed") as f:
        f.write(data)
    assert not s.exists("doomed") and _uploads(s3_server, url) == []


def test_part_size_schedule() -> None:
    from lightning_ckpt.storage import S3_MAX_PART, S3_MAX_PARTS, S3_MIN_PART, part_size

    MiB, GiB = 2**20, 2**30
    sizes = [part_size(n) for n in range(1, S3_MAX_PARTS + 1)]
    assert sizes[0] == sizes[999] == 16 * MiB and sizes[1000] == 32 * MiB and sizes[2000] == 64 * MiB
    assert sizes == sorted(sizes)  # never shrinks
    assert all(S3_MIN_PART <= size <= S3_MAX_PART for size in sizes)
    assert sizes[-1] == S3_MAX_PART  # capped at 5 GiB
    assert sum(sizes) > 5 * 1024 * GiB  # 10,000 parts reach S3's 5 TiB object limit
    assert sum(part_size(n, base=8 * MiB, grow_every=10**9) for n in range(1, 10_001)) < 79 * GiB  # the old cap
    assert part_size(1, base=MiB) == S3_MIN_PART  # S3's minimum wins over a smaller base
    assert part_size(3, base=4 * GiB, grow_every=1) == S3_MAX_PART
    for bad in (0, S3_MAX_PARTS + 1):
        with pytest.raises(ValueError):
            part_size(bad)


def test_fetch_checks_size_and_digest_with_the_hasher_it_is_given(backend) -> None:  # noqa: F811
    url, options = backend
    s = Storage(url, options)
    data = os.urandom(3 * 2**20 + 17)
    s.write_bytes("a.bin", data)
    good = Expected(len(data), hashlib.blake2b(data).hexdigest())
    source = s.fetch("a.bin", shown_as="a.ckpt", expected=good, hasher=hashlib.blake2b)
    try:
        assert source.size == len(data)
        source.file.seek(0)
        assert source.file.read() == data
    finally:
        source.close()
    with pytest.raises(CorruptCheckpointError, match=r"a\.ckpt does not match the blake2b"):
        s.fetch("a.bin", shown_as="a.ckpt", expected=Expected(len(data), "0" * 128), hasher=hashlib.blake2b)
    with pytest.raises(CorruptCheckpointError, match="its manifest says 5 bytes"):
        s.fetch("a.bin", expected=Expected(5, good.digest), hasher=hashlib.blake2b)
    with pytest.raises(CheckpointNotFoundError):
        s.fetch("missing.bin", expected=good)


def test_a_fetch_restarted_after_a_transient_read_error_hashes_only_the_new_bytes() -> None:
    register()
    plan = FaultPlan()
    s = Storage(f"faulty://f-{uuid.uuid4().hex[:8]}/d", {"target_protocol": "memory", "plan": plan},
                retry=RetryPolicy(attempts=3, initial_delay=0.0))
    data = os.urandom(2 * 8 * 2**20 + 5)  # three blocks: the second read fails
    s.write_bytes("a.bin", data)
    fault = plan.add(Fault(op="read", nth=2, exc=ConnectionResetError(errno.ECONNRESET, "reset by peer")))
    source = s.fetch("a.bin", expected=Expected(len(data), hashlib.sha256(data).hexdigest()))
    try:
        assert fault.fired and source.size == len(data)
        source.file.seek(0)
        assert source.file.read() == data  # the spool holds the file once, not a failed start + all
    finally:
        source.close()


def test_what_the_directory_is_and_when_a_file_changed(tmp_path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    assert Storage(str(tmp_path)).kind() == "directory"
    assert Storage(str(tmp_path / "f")).kind() == "file"
    assert Storage(str(tmp_path / "nothing")).kind() is None
    s = Storage(str(tmp_path))
    assert abs(s.modified("f") - (tmp_path / "f").stat().st_mtime) < 1e-3
    with pytest.raises(CheckpointNotFoundError):
        s.modified("nothing")


def test_an_outage_is_never_read_as_no_directory() -> None:
    register()
    plan = FaultPlan()
    s = Storage(f"faulty://f-{uuid.uuid4().hex[:8]}/d", {"target_protocol": "memory", "plan": plan},
                retry=RetryPolicy(attempts=2, initial_delay=0.0))
    plan.add(Fault(op="info", times=None, exc=OSError(errno.EIO, "I/O error")))
    with pytest.raises(StorageError, match="I/O error"):
        s.kind()
    with pytest.raises(StorageError, match="I/O error"):
        s.modified("a.bin")


def test_a_bare_protocol_names_no_file_and_its_root_joins_names_as_urls() -> None:
    for url in ("memory://", "memory:///", "s3://"):
        with pytest.raises(ConfigurationError, match="does not name a file"):
            split_url(url)  # not a local file called "memory:" in the working directory
    root = Storage("memory://")
    name = f"a16-{uuid.uuid4().hex}.bin"
    root.write_bytes(name, b"x")
    url = root.url_of(name)
    assert url == f"memory://{name}"  # a URL the user can pass back to us
    directory, file = split_url(url)
    assert Storage(directory).read_bytes(file) == b"x"
    root.delete(name)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_directory_url_that_is_a_file_is_an_error_not_an_empty_directory(tmp_path: Path, where: str) -> None:
    # dirpath="runs/last.ckpt" by mistake: "no checkpoint yet" would start a resume afresh
    parent = str(tmp_path) if where == "local" else f"memory://a16-{uuid.uuid4().hex}"
    Storage(parent).write_bytes("last.ckpt", b"payload")
    with pytest.raises(StorageError, match="not a directory"):
        Storage(f"{parent}/last.ckpt").list()
    with pytest.raises(StorageError, match="not a directory"):
        CheckpointManager(f"{parent}/last.ckpt").latest()


def test_the_backend_is_chosen_once_by_the_filesystem() -> None:
    import s3fs

    from lightning_ckpt.storage.backends import FsspecBackend, LocalBackend, choose
    from lightning_ckpt.storage.objectstores import S3Backend

    class MyS3(s3fs.S3FileSystem):  # a subclass from another package is still S3
        pass

    assert type(Storage("memory://x/y").backend) is FsspecBackend
    assert type(Storage(".").backend) is LocalBackend
    assert type(choose(MyS3(anon=True, skip_instance_cache=True))) is S3Backend


def test_only_the_storage_package_imports_fsspec_and_its_modules_are_small() -> None:
    package = Path(lightning_ckpt.__file__).parent
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        if path.parent.name != "storage":
            assert not any(m == "fsspec" or m.startswith("fsspec.") for m in imported), path
            continue
        assert len(path.read_text().splitlines()) <= 600, path
        assert "must not" in " ".join((ast.get_docstring(tree) or "").split()).lower() or path.name == "__init__.py", path


def test_read_range(backend) -> None:  # noqa: F811
    url, options = backend
    s = Storage(url, options)
    s.write_bytes("a.bin", b"0123456789")
    assert s.read_range("a.bin", 2, 3) == b"234"
    assert s.read_range("a.bin", 8, 5) == b"89"  # fewer where the file is shorter
    assert s.read_range("a.bin", 4, 0) == b""
    with pytest.raises(CheckpointNotFoundError):
        s.read_range("missing.bin", 0, 1)


def test_the_dcp_internals_the_storage_package_uses_are_where_it_expects(tmp_path: Any) -> None:
    """storage/dcp.py reaches torch's private ``_fsspec_filesystem``: fail here, naming torch's
    version, the day it moves, instead of at a user's first sharded save or load."""
    import torch
    from torch.distributed.checkpoint import _fsspec_filesystem as private

    from lightning_ckpt.storage import dcp

    assert hasattr(private, "FsspecWriter") and hasattr(private, "FsspecReader"), torch.__version__
    read = dcp.reader(str(tmp_path), {}, lambda open_file, path: None)
    assert isinstance(read, private.FsspecReader), torch.__version__
    assert callable(getattr(read, "_get_metadata_path", None)), torch.__version__
    assert hasattr(read, "fs") and hasattr(read, "load_id"), torch.__version__
    assert str(read._get_metadata_path(None)).endswith(".metadata"), torch.__version__
    assert isinstance(dcp.writer(str(tmp_path), {}), private.FsspecWriter), torch.__version__
