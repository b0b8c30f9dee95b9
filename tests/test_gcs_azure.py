"""GCS and Azure Blob against real servers (fake-gcs-server, Azurite): the callback's scenarios,
what the commit protocol relies on, refused credentials, missing buckets, bounded-memory uploads.

Every test runs once per store (ids ``[gcs]`` and ``[azure]``); objects are inspected with a
separate client of the server, never through the code under test. The shared backend suite
(tests/backends.py) runs on both as well.
"""

from __future__ import annotations

import gc
import io
import os
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from azure_server import WRONG_KEY, Azurite
from gcs_server import FakeGCS, RefusingGCS
from helpers import fit

from lightning_ckpt import (
    BucketNotFoundError,
    CheckpointCallback,
    CheckpointManager,
    RetryPolicy,
    StoragePermissionError,
)
from lightning_ckpt.integrity import MANIFEST_SUFFIX
from lightning_ckpt.manager import PENDING_SUFFIX
from lightning_ckpt.storage import Storage

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")

MiB = 2**20
STEPS_PER_EPOCH = 8  # helpers.fit: 64 samples, batches of 8


@dataclass
class Store:
    """One store under test: a fresh bucket/container URL, options, and a separate client."""

    kind: str
    url: str  # gs://bucket or az://container
    options: dict[str, Any]
    server: Any

    @property
    def bucket(self) -> str:
        return self.url.split("://", 1)[1]

    def client(self) -> Any:
        return self.server.filesystem()

    def objects(self, prefix: str = "run") -> dict[str, bytes]:
        """Every object under ``<bucket>/<prefix>`` by name (directory entries do not count)."""
        fs = self.client()
        try:
            found = fs.find(f"{self.bucket}/{prefix}".rstrip("/"), detail=True)
        except FileNotFoundError:
            return {}
        return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p, info in found.items() if info.get("type") != "directory"}

    def missing_bucket_url(self) -> str:
        return f"{self.kind_scheme}://no-such-{uuid.uuid4().hex[:12]}/run"

    @property
    def kind_scheme(self) -> str:
        return self.url.split("://", 1)[0]


@pytest.fixture(params=["gcs", "azure"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    fixture = {"gcs": "gcs_bucket_url", "azure": "azure_container_url"}[request.param]
    url, options = request.getfixturevalue(fixture)
    server = request.getfixturevalue({"gcs": "gcs_server", "azure": "azure_server"}[request.param])
    yield Store(request.param, url, options, server)


def ckpt_name(epoch: int) -> str:
    return f"epoch={epoch}-step={(epoch + 1) * STEPS_PER_EPOCH}.ckpt"


# -- the callback: save, top-k, last, resume from "last" and "best", foreign files untouched ----------


def test_top_k_last_and_resume_from_last_and_best(store: Store) -> None:
    url = f"{store.url}/run"
    foreign = {"notes.txt": b"my notes", "other.ckpt": b"a checkpoint someone else wrote"}
    fs = store.client()
    for name, data in foreign.items():
        fs.pipe_file(f"{store.bucket}/run/{name}", data)
    kw = {"dirpath": url, "storage_options": store.options, "monitor": "val_loss", "save_top_k": 2,
          "save_last": True}
    cb = CheckpointCallback(**kw)
    trainer, _ = fit(cb, max_epochs=3)
    found = store.objects()
    for name, data in foreign.items():
        assert found[name] == data
    ours = {n for n in found if n not in foreign}
    assert not [n for n in ours if n.endswith(PENDING_SUFFIX)]
    payloads = {n for n in ours if not n.endswith(MANIFEST_SUFFIX)}
    assert payloads == {m.name for m in cb.manager.manifests(owner=cb.owner)} | {"last.ckpt"}
    assert len(payloads) == 3 and {n[: -len(MANIFEST_SUFFIX)] for n in ours - payloads} == payloads
    assert cb.last_model_path == f"{url}/last.ckpt" and cb.best_model_path.startswith(f"{url}/epoch=")
    last = torch.load(io.BytesIO(found["last.ckpt"]), weights_only=True)
    assert last["global_step"] == trainer.global_step == 3 * STEPS_PER_EPOCH

    again = CheckpointCallback(**kw)
    resumed, _ = fit(again, max_epochs=4, ckpt_path="last")
    assert again.resumed_from == f"{url}/last.ckpt"
    assert resumed.global_step == 4 * STEPS_PER_EPOCH

    best = CheckpointCallback(**kw)
    best_path = CheckpointManager(url, store.options).best(monitor="val_loss", mode="min")
    fit(best, max_epochs=5, ckpt_path="best")
    assert best.resumed_from is not None and best.resumed_from.endswith(best_path.name)
    for name, data in foreign.items():  # still untouched after two resumes and their pruning
        assert store.objects()[name] == data


def test_cleanup_removes_an_interrupted_save_and_its_unfinished_upload(store: Store) -> None:
    url = f"{store.url}/run"
    manager = CheckpointManager(url, store.options)
    manager.save({"w": torch.ones(3)}, "kept.ckpt", global_step=1)
    storage = Storage(url, store.options)
    storage.write_bytes("dead.ckpt" + PENDING_SUFFIX, b"")  # the marker a save writes first
    # a writer killed mid-upload: blocks / chunks on the server, never completed, never discarded
    f = storage.fs.open(storage.path("dead.ckpt"), "wb", block_size=8 * MiB)
    f.write(os.urandom(17 * MiB))
    f.flush()
    f.closed = True  # as if the process died here: no close() will ever complete the upload
    assert "dead.ckpt" not in store.objects()  # invisible
    removed = manager.cleanup()
    assert "dead.ckpt" + PENDING_SUFFIX in removed
    if store.kind == "azure":  # Azure lists never-committed blobs: they are deleted
        assert "dead.ckpt (unfinished upload)" in removed
        assert _uncommitted(store) == []
    assert set(store.objects()) == {"kept.ckpt", "kept.ckpt" + MANIFEST_SUFFIX}
    assert [m.name for m in manager.manifests()] == ["kept.ckpt"]


_KILLED_WRITER = r"""
import json, os, signal, sys
import torch
from lightning_ckpt import CheckpointManager

url, options = sys.argv[1], json.loads(sys.argv[2])

def progress(done, total):
    # die mid-upload, past two GCS chunks (sent one by one) and past the point where Azure's
    # writer, with four 16 MiB blocks in flight at most, must have waited for a staged block
    if done >= 80 * 2**20:
        os.kill(os.getpid(), signal.SIGKILL)

state = {f"w{i}": torch.randn(2**20) for i in range(24)}  # 96 MiB
CheckpointManager(url, options).save(state, "dead.ckpt", progress=progress)
"""


@pytest.mark.slow
def test_a_writer_killed_mid_upload_leaves_nothing_after_cleanup(store: Store, tmp_path) -> None:
    import json
    import signal
    import subprocess
    import sys

    url = f"{store.url}/run"
    manager = CheckpointManager(url, store.options)
    manager.save({"w": torch.ones(3)}, "kept.ckpt", global_step=1)
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), url, json.dumps(store.options)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "dead.ckpt" not in store.objects()  # never visible
    assert [m.name for m in manager.manifests()] == ["kept.ckpt"]
    removed = manager.cleanup()
    assert any(n.startswith("dead.ckpt~lckpt-") and n.endswith(PENDING_SUFFIX) for n in removed), removed
    if store.kind == "azure":
        assert "dead.ckpt (unfinished upload)" in removed and _uncommitted(store) == []
    assert set(store.objects()) == {"kept.ckpt", "kept.ckpt" + MANIFEST_SUFFIX}
    assert manager.latest().name == "kept.ckpt"


def _uncommitted(store: Store) -> list[str]:
    from fsspec.asyn import sync

    fs = store.client()
    container = fs.service_client.get_container_client(store.bucket)

    async def names() -> list[str]:
        return [b.name async for b in container.list_blobs(include=["uncommittedblobs"])
                if b.name not in committed]

    committed = {p.split("/", 1)[1] for p in fs.find(store.bucket)}
    return sync(fs.loop, names)


def test_the_bucket_root_itself_as_the_directory(store: Store) -> None:
    manager = CheckpointManager(store.url, store.options)  # gs://bucket, az://container: no prefix
    manager.save({"w": torch.ones(2)}, "a.ckpt", global_step=1)
    Storage(store.url, store.options).write_bytes("b.ckpt" + PENDING_SUFFIX, b"")
    assert manager.cleanup() == ["b.ckpt" + PENDING_SUFFIX]
    assert manager.latest().name == "a.ckpt" and manager.url_of("a.ckpt") == f"{store.url}/a.ckpt"
    assert set(store.objects("")) == {"a.ckpt", "a.ckpt" + MANIFEST_SUFFIX}


# -- wrong bucket, wrong credentials ---------------------------------------------------------------


def test_a_missing_bucket_is_an_error_not_an_empty_directory(store: Store) -> None:
    url = store.missing_bucket_url()
    bucket = url.split("://", 1)[1].split("/")[0]
    manager = CheckpointManager(url, store.options)
    with pytest.raises(BucketNotFoundError, match=bucket) as info:
        manager.latest()
    assert not isinstance(info.value, FileNotFoundError) or info.type is BucketNotFoundError
    with pytest.raises(BucketNotFoundError, match=bucket):
        manager.save({"w": torch.ones(2)}, "a.ckpt")
    cb = CheckpointCallback(dirpath=url, storage_options=store.options)
    with pytest.raises(BucketNotFoundError):
        fit(cb, max_epochs=1, ckpt_path="last")  # never a silent fresh start
    with pytest.raises(FileNotFoundError):
        store.client().info(bucket)  # and nothing created it
    assert Storage(f"{store.url}/no/such/prefix", store.options).list() == []  # a prefix may be empty


@pytest.fixture
def refused(store: Store) -> Iterator[tuple[dict[str, Any], Any]]:
    """Storage options the server refuses, and the refusing endpoint (its ``requests``) for GCS.

    fake-gcs-server checks no credentials: GCS's refusal comes from :class:`RefusingGCS`.
    """
    if store.kind == "gcs":
        with RefusingGCS() as gate:
            yield gate.storage_options, gate
    else:
        yield store.server.storage_options_for(WRONG_KEY), None


def test_refused_credentials_are_a_permission_error_and_are_not_retried(
    store: Store, refused: tuple[dict[str, Any], Any]
) -> None:
    options, gate = refused
    url = f"{store.url}/run"
    patient = RetryPolicy(attempts=5, initial_delay=30.0, max_delay=30.0)  # a retry would take minutes
    for operation in ("save", "list"):
        manager = CheckpointManager(url, options, retry=patient)
        before = gate.requests if gate else 0
        with pytest.raises(StoragePermissionError, match=url) as info:
            if operation == "save":
                manager.save({"w": torch.ones(3)}, "a.ckpt")
            else:
                manager.manifests()
        assert isinstance(info.value, PermissionError)
        if gate is not None:
            assert gate.requests - before <= 2, operation  # one refused request (two at most), no retry
    cb = CheckpointCallback(dirpath=url, storage_options=options, retry=patient)
    with pytest.raises(StoragePermissionError, match=url):
        fit(cb, max_epochs=1, ckpt_path="last")
    assert store.objects() == {}


def test_azure_read_only_sas_can_list_and_load_but_not_save(azure_server: Azurite, azure_container_url) -> None:
    import datetime

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas
    from azure_server import ACCOUNT, ACCOUNT_KEY

    url, options = azure_container_url
    CheckpointManager(f"{url}/run", options).save({"w": torch.ones(3)}, "a.ckpt", global_step=1)
    sas = generate_container_sas(ACCOUNT, url.removeprefix("az://"), account_key=ACCOUNT_KEY,
                                 permission=ContainerSasPermissions(read=True, list=True),
                                 expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1))
    reader = CheckpointManager(f"{url}/run", {"connection_string": f"BlobEndpoint={azure_server.endpoint_url};"
                                                                   f"SharedAccessSignature={sas}"})
    assert [m.name for m in reader.manifests()] == ["a.ckpt"]
    assert torch.equal(reader.load("a.ckpt")["w"], torch.ones(3))
    with pytest.raises(StoragePermissionError, match=url):
        reader.save({"w": torch.zeros(3)}, "b.ckpt")
    assert [m.name for m in CheckpointManager(f"{url}/run", options).manifests()] == ["a.ckpt"]


# -- what the commit protocol relies on --------------------------------------------------------------


def test_an_unfinished_upload_is_invisible_until_it_completes(store: Store) -> None:
    s = Storage(f"{store.url}/run", store.options)
    s.write_bytes("a.bin", b"old")
    data = os.urandom(5 * MiB) * 4  # several chunks / blocks
    with s.open_write("a.bin") as f:
        f.write(data[: 17 * MiB])  # two chunks/blocks are on the server now
        assert store.client().cat_file(f"{store.bucket}/run/a.bin") == b"old"  # readers see the old one
        assert store.objects() == {"a.bin": b"old"}
        f.write(data[17 * MiB :])
    assert store.client().cat_file(f"{store.bucket}/run/a.bin") == data  # listed and read right after
    assert [(i.name, i.size) for i in s.list()] == [("a.bin", len(data))]


def test_server_side_copy_and_delete(store: Store) -> None:
    s = Storage(f"{store.url}/run", store.options)
    data = os.urandom(8 * MiB) * 2  # exactly two blocks: the upload ends with an empty final flush
    with s.open_write("epoch=1.ckpt") as f:
        f.write(data)
    s.copy("epoch=1.ckpt", "last.ckpt")  # what save_last does
    s.delete("epoch=1.ckpt")
    assert store.objects() == {"last.ckpt": data}  # the copy is whole and independent of its source
    s.delete("last.ckpt")
    s.delete("last.ckpt")  # absent is fine
    assert store.objects() == {} and s.list() == []


def test_a_failed_upload_leaves_nothing_behind(store: Store) -> None:
    s = Storage(f"{store.url}/run", store.options)
    with pytest.raises(RuntimeError, match="boom"), s.open_write("big") as f:
        f.write(os.urandom(3 * MiB) * 6)
        raise RuntimeError("boom")
    assert store.objects() == {}
    if store.kind == "azure":
        assert _uncommitted(store) == []  # no block list left: nothing to commit, nothing listed


# -- bounded memory for large objects ----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "total", "bound"), [
    # blocks of 16 MiB staged 4 at a time (the S3 writer's parts): at most 4 buffers
    pytest.param("azure", 112 * MiB, 80 * MiB, id="azure", marks=pytest.mark.azure),
    # 32 MiB resumable chunks: 94 MiB measured for a 128 MiB upload (about 14 s on fake-gcs-server)
    pytest.param("gcs", 160 * MiB, 128 * MiB, id="gcs", marks=[pytest.mark.gcs, pytest.mark.slow]),
])
def test_a_large_upload_streams_with_bounded_memory(
    kind: str, total: int, bound: int, request: pytest.FixtureRequest
) -> None:
    url, options = request.getfixturevalue({"gcs": "gcs_bucket_url", "azure": "azure_container_url"}[kind])
    s = Storage(f"{url}/run", options)
    block = os.urandom(MiB)
    gc.collect()
    tracemalloc.start()
    try:
        with s.open_write("big") as f:
            for _ in range(total // MiB):
                f.write(block)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s.info("big").size == total
    # a few chunks / blocks in memory, never the whole object
    assert peak < bound, f"peak {peak / MiB:.0f} MiB for a {total // MiB} MiB upload"


# -- the SDKs' exceptions, translated (no server needed) ---------------------------------------------


def test_gcs_and_azure_refusals_and_missing_containers_are_typed() -> None:
    from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError
    from gcsfs.retry import HttpError

    from lightning_ckpt.storage import is_transient

    expired = HttpError({"code": 401, "message": "Invalid Credentials"})  # gcsfs already retried it
    forbidden = OSError("Forbidden: b/bucket/o\ncaller does not have storage.objects.list access")
    refused = ClientAuthenticationError("Server failed to authenticate the request.")
    refused.status_code = 403
    wrapped = RuntimeError("Failed to upload block: Server failed to authenticate the request.")
    wrapped.__cause__ = refused  # how adlfs raises it
    for exc in (expired, forbidden, refused, wrapped):
        assert not is_transient(exc), exc
        assert isinstance(Storage.translate(exc, "list", "gs://b/run"), StoragePermissionError), exc
    missing = ResourceNotFoundError("The specified container does not exist.")
    missing.error_code = "ContainerNotFound"
    container = RuntimeError("Failed to upload block")
    container.__cause__ = missing
    assert isinstance(Storage.translate(container, "write", "az://c/run/a"), BucketNotFoundError)
    busy = HttpError({"code": 503, "message": "Service Unavailable"})
    assert is_transient(busy)
