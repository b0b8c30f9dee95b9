"""One storage suite over every backend: the ``backend`` fixture yields (url, storage_options).

Import the fixture into a test module (``from backends import backend  # noqa: F401``) and every
test using it runs on a local directory, on ``memory://`` and on real servers: S3 (SeaweedFS),
GCS (fake-gcs-server) and Azure Blob (Azurite), each started once per session by conftest. The
test ids end in ``[s3]``, ``[gcs]``, ``[azure]``: ``pytest -k "gcs or azure"`` selects them.
"""

from __future__ import annotations

import uuid
from typing import Any

import fsspec
import pytest

BACKENDS = ["local", "memory", "s3", "gcs", "azure"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    kind = request.param
    if kind == "local":
        yield str(tmp_path / "ckpts"), {}
    elif kind == "memory":
        root = f"memory://t-{uuid.uuid4().hex[:10]}/ckpts"
        yield root, {}
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        fixture = {"s3": "s3_bucket_url", "gcs": "gcs_bucket_url", "azure": "azure_container_url"}[kind]
        url, options = request.getfixturevalue(fixture)
        yield f"{url}/ckpts", options
