"""S3 under throttling, server errors and dropped connections (issue 15): a loopback proxy
(tests/s3_proxy.py) in front of SeaweedFS injects them; every retried request must resend its
whole body, so every save commits and loads back byte for byte."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from s3_proxy import FaultyProxy, every

from lightning_ckpt import CheckpointManager, RetryPolicy

FAST = RetryPolicy(attempts=6, initial_delay=0.01, max_delay=0.05)


@pytest.fixture
def bucket(s3_server: Any, s3_bucket_url: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any], Any]:
    url, options = s3_bucket_url
    return url, options, s3_server


@pytest.mark.parametrize("fault", ["503", "503-early", "500", "reset"])
def test_a_40_mib_multipart_save_survives_every_third_write_failing(bucket, fault: str) -> None:
    url, options, server = bucket
    state = {"w": torch.arange(10 * 2**20, dtype=torch.float32)}  # 40 MiB: three 16 MiB parts
    with FaultyProxy(server.endpoint_url, every(3, fault)) as proxy:
        mgr = CheckpointManager(url + "/run", proxy.storage_options(options), retry=FAST)
        result = mgr.save(state, "big.ckpt", global_step=1)
        assert proxy.faulted(fault) >= 2, proxy.requests  # the failures really happened
    direct = CheckpointManager(url + "/run", options)
    assert direct.verify("big.ckpt").digest == result.manifest.digest
    assert torch.equal(direct.load("big.ckpt")["w"], state["w"])


@pytest.mark.parametrize("fault", ["503", "reset"])
@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_small_writes_and_reads_survive_faults_too(bucket, fault: str) -> None:
    url, options, server = bucket
    with FaultyProxy(server.endpoint_url, every(2, fault, methods=("PUT", "POST", "GET", "HEAD", "DELETE"))) as proxy:
        mgr = CheckpointManager(url + "/run", proxy.storage_options(options), retry=FAST)
        mgr.save({"w": torch.arange(1000.0)}, "a.ckpt", global_step=1)
        mgr.save({"w": torch.arange(2000.0)}, "b.ckpt", global_step=2)
        assert mgr.latest().name == "b.ckpt"
        assert torch.equal(mgr.load("a.ckpt")["w"], torch.arange(1000.0))
        assert proxy.faulted(fault) >= 3
