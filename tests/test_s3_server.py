"""Tests of the SeaweedFS test server (``s3_server.py``), and of what s3fs does against it.

The first half checks that the server is a usable S3: objects, multipart uploads, listings,
deletion, authentication, and a clean stop. The second half pins down s3fs behaviours that the
storage layer must handle — which exceptions it raises for absent objects, refused credentials
and a dead server, that a bulk ``rm`` does not report refusals, that leaving a ``with
fs.open(..., "wb")`` block by an exception commits the partial object, and that an upload cut
short by a server crash leaves no object but a pending multipart upload. If s3fs changes one of
these, the test that pins it fails and says which assumption no longer holds.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import fsspec
import pytest
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
from s3_server import SeaweedS3

MiB = 2**20


def _fs(url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """The filesystem and path for ``url``, reached the way the library reaches it."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, str(path)


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated, e.g. ``"AccessDenied"``."""
    cause = exc.__cause__
    if isinstance(cause, ClientError):
        return str(cause.response.get("Error", {}).get("Code"))
    return None


# ------------------------------------------------------------------------- the server works
def test_put_and_get_a_small_object(s3_bucket_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket_url
    fs, path = _fs(f"{url}/dir/hello.txt", options)

    fs.pipe_file(path, b"hello")

    assert fs.cat_file(path) == b"hello"
    assert fs.info(path)["size"] == 5
    with fs.open(path, "rb") as f:
        assert f.read() == b"hello"


def test_multipart_upload_reads_back_intact(s3_bucket_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket_url
    fs, path = _fs(f"{url}/big.bin", options)
    chunks = [os.urandom(MiB) for _ in range(12)]

    # s3fs sends everything buffered at a flush as one part, so write in pieces smaller than
    # the block size to get several parts (5 + 5 + 2 MiB).
    with fs.open(path, "wb", block_size=5 * MiB) as f:
        for chunk in chunks:
            f.write(chunk)

    info = fs.info(path)
    assert info["size"] == 12 * MiB
    assert info["ETag"].strip('"').endswith("-3"), info["ETag"]  # a 3-part multipart upload
    data = fs.cat_file(path)
    assert hashlib.sha256(data).digest() == hashlib.sha256(b"".join(chunks)).digest()


def test_listing(s3_bucket_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket_url
    fs, root = _fs(url, options)
    for name in ("a/1", "a/2", "b/1", "top"):
        fs.pipe_file(f"{root}/{name}", name.encode())

    assert sorted(fs.ls(root, detail=False)) == [f"{root}/a", f"{root}/b", f"{root}/top"]
    assert sorted(fs.ls(f"{root}/a", detail=False)) == [f"{root}/a/1", f"{root}/a/2"]
    assert sorted(fs.find(root)) == [f"{root}/{n}" for n in ("a/1", "a/2", "b/1", "top")]
    assert fs.info(f"{root}/a")["type"] == "directory"
    assert fs.isdir(f"{root}/b") and fs.isfile(f"{root}/top")


def test_deletion(s3_bucket_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket_url
    fs, root = _fs(url, options)
    for name in ("keep", "gone", "dir/x", "dir/y"):
        fs.pipe_file(f"{root}/{name}", b"1")

    fs.rm_file(f"{root}/gone")
    fs.rm(f"{root}/dir", recursive=True)

    assert fs.find(root) == [f"{root}/keep"]
    assert not fs.exists(f"{root}/gone")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{root}/dir/x")


def test_each_test_gets_a_fresh_empty_bucket(s3_bucket_url: tuple[str, dict[str, Any]], s3_url: str) -> None:
    url, options = s3_bucket_url
    fs, root = _fs(url, options)
    assert fs.find(root) == []
    assert s3_url == f"{url}/run"
    assert not fs.exists(s3_url)


@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_stop_leaves_no_process_and_no_files_behind(private_s3_server: SeaweedS3) -> None:
    server = private_s3_server
    pid, root = server.pid, server.root
    assert root is not None and os.path.isdir(root)
    assert server.ports is not None
    grpc_sockets = [f"/tmp/seaweedfs-{k}-grpc-{p}.sock" for k, p in server.ports.grpc_ports().items()]

    server.stop()

    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone, not just its leader
    assert not os.path.exists(root)
    assert [s for s in grpc_sockets if os.path.exists(s)] == []
    server.stop()  # a second stop is harmless


# ------------------------------------------------------------------------ what s3fs raises
def test_absent_object_and_bucket_are_file_not_found(
    s3_bucket_url: tuple[str, dict[str, Any]],
) -> None:
    url, options = s3_bucket_url
    fs, root = _fs(url, options)

    for call in (fs.cat_file, fs.info, lambda p: fs.open(p, "rb")):
        with pytest.raises(FileNotFoundError):
            call(f"{root}/missing")
    assert fs.exists(f"{root}/missing") is False
    with pytest.raises(FileNotFoundError):
        fs.ls("no-such-bucket-lckpt")
    # The server runs with -s3.autoCreateBucket=false, like AWS: no bucket, no write.
    with pytest.raises(FileNotFoundError) as excinfo:
        fs.pipe_file("no-such-bucket-lckpt/x", b"1")
    assert _error_code(excinfo.value) == "NoSuchBucket"


@pytest.mark.parametrize(
    ("key", "secret", "code"),
    [
        (SeaweedS3.key, "wrong-secret", "SignatureDoesNotMatch"),
        ("unknown-key", "wrong-secret", "InvalidAccessKeyId"),
    ],
    ids=["wrong-secret", "unknown-key"],
)
def test_wrong_credentials_are_permission_errors(
    s3_server: SeaweedS3, s3_bucket_url: tuple[str, dict[str, Any]], key: str, secret: str, code: str
) -> None:
    url, options = s3_bucket_url
    fs, root = _fs(url, options)
    fs.pipe_file(f"{root}/obj", b"1")
    bad = s3_server.filesystem(key=key, secret=secret)

    with pytest.raises(PermissionError) as excinfo:
        bad.pipe_file(f"{root}/new", b"1")
    assert _error_code(excinfo.value) == code
    with pytest.raises(PermissionError):
        bad.ls(root)
    # A HEAD/GET has no error body, so the code is only the HTTP status, but still a refusal.
    with pytest.raises(PermissionError):
        bad.cat_file(f"{root}/obj")
    # exists() does not turn a refusal into "absent": it raises for present and absent keys.
    with pytest.raises(PermissionError):
        bad.exists(f"{root}/obj")
    with pytest.raises(PermissionError):
        bad.exists(f"{root}/missing")


def test_read_only_identity_is_refused_writes_with_access_denied(
    s3_server: SeaweedS3, s3_bucket_url: tuple[str, dict[str, Any]]
) -> None:
    url, _ = s3_bucket_url
    root = url.removeprefix("s3://")
    reader = s3_server.filesystem(key=s3_server.readonly_key, secret=s3_server.readonly_secret)
    s3_server.filesystem().pipe_file(f"{root}/obj", b"1")

    assert reader.cat_file(f"{root}/obj") == b"1"
    with pytest.raises(PermissionError) as excinfo:
        reader.pipe_file(f"{root}/new", b"1")
    assert _error_code(excinfo.value) == "AccessDenied"
    with pytest.raises(PermissionError):
        reader.rm_file(f"{root}/obj")


def test_bulk_rm_does_not_report_a_refused_delete(
    s3_server: SeaweedS3, s3_bucket_url: tuple[str, dict[str, Any]]
) -> None:
    """s3fs's ``rm`` uses DeleteObjects and ignores the per-key errors in its reply.

    So ``rm`` is not proof of deletion: check what it returns (the keys deleted) or use
    ``rm_file``, which raises.
    """
    url, _ = s3_bucket_url
    root = url.removeprefix("s3://")
    admin = s3_server.filesystem()
    admin.pipe_file(f"{root}/obj", b"1")
    reader = s3_server.filesystem(key=s3_server.readonly_key, secret=s3_server.readonly_secret)

    deleted = reader.rm(f"{root}/obj")

    assert deleted == []  # no exception, and nothing deleted
    assert admin.exists(f"{root}/obj")


def test_leaving_a_write_block_by_an_exception_commits_the_partial_object(
    s3_bucket_url: tuple[str, dict[str, Any]],
) -> None:
    """fsspec's ``__exit__`` closes, and closing commits: a writer must ``discard()`` on error."""
    url, options = s3_bucket_url
    fs, root = _fs(url, options)

    with pytest.raises(RuntimeError), fs.open(f"{root}/partial", "wb", block_size=5 * MiB) as f:
        for _ in range(7):
            f.write(b"x" * MiB)
        raise RuntimeError("the writer failed half-way")

    assert fs.info(f"{root}/partial")["size"] == 7 * MiB

    with fs.open(f"{root}/discarded", "wb", block_size=5 * MiB) as f:
        for _ in range(7):
            f.write(b"x" * MiB)
        f.discard()  # aborts the multipart upload; the close that follows writes nothing
        f.closed = True
    assert not fs.exists(f"{root}/discarded")


@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_a_crash_keeps_committed_objects_and_drops_the_cut_upload(
    private_s3_server: SeaweedS3,
) -> None:
    server = private_s3_server
    endpoint = server.endpoint_url
    url = server.make_bucket("crash-test")
    fs, root = _fs(url, server.storage_options)
    fs.pipe_file(f"{root}/committed", b"persisted")
    path = f"{root}/ckpt.bin"
    f = fs.open(path, "wb", block_size=5 * MiB)
    for _ in range(11):
        f.write(b"x" * MiB)  # two 5 MiB parts are on the server now
    assert len(f.parts) == 2

    server.kill(hard=True)
    # A dead endpoint is a botocore error that s3fs passes through untranslated: not an OSError.
    with pytest.raises(EndpointConnectionError) as excinfo:
        for _ in range(10):
            f.write(b"x" * MiB)
    assert isinstance(excinfo.value, BotoCoreError)
    assert not isinstance(excinfo.value, OSError)

    server.start()  # same ports, same data
    assert server.endpoint_url == endpoint
    fresh = server.filesystem()
    assert fresh.cat_file(f"{root}/committed") == b"persisted"
    assert not fresh.exists(path)
    assert fresh.find(root) == [f"{root}/committed"]
    pending = fresh.call_s3("list_multipart_uploads", Bucket=root).get("Uploads", [])
    assert [u["Key"] for u in pending] == ["ckpt.bin"]

    # The failed file is still open: without discard() its __del__ would retry the upload
    # (and at interpreter exit, with fsspec's event loop gone, hang). discard() aborts the
    # upload but leaves the file "open" with no buffer, so mark it closed by hand.
    f.discard()
    f.closed = True
    assert fresh.call_s3("list_multipart_uploads", Bucket=root).get("Uploads", []) == []
