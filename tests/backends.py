"""One storage suite over every backend: the ``backend`` fixture yields (url, storage_options).

Import the fixture into a test module (``from backends import backend  # noqa: F401``) and every
test using it runs on a local directory, on ``memory://`` and on a real S3 server (SeaweedFS,
started by the ``s3_server`` session fixture in conftest).
"""

from __future__ import annotations

import uuid
from typing import Any

import fsspec
import pytest

BACKENDS = ["local", "memory", "s3"]


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
        url, options = request.getfixturevalue("s3_bucket_url")
        yield f"{url}/ckpts", options
