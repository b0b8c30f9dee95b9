"""The commit protocol's model-based test (tests/commit_model.py), bounded for CI.

A few dozen random sequences per backend (about 30-60 s in all); ``python tests/commit_model_long.py
--long`` runs many more and reports how many sequences and steps ran.
"""

from __future__ import annotations

from typing import Any

import pytest
from commit_model import Counts, local_dir, machine, memory_dir, s3_dir
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

pytestmark = pytest.mark.filterwarnings("ignore::lightning_ckpt.CheckpointWarning")

CI = {"memory": (15, 12), "local": (10, 12), "s3": (4, 8)}  # (sequences, steps per sequence)


def _run(make: Any, backend: str, incremental: bool = False) -> Counts:
    counts = Counts()
    examples, steps = CI[backend]
    run_state_machine_as_test(
        machine(make, counts, incremental),
        settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=True,
                          suppress_health_check=list(HealthCheck), database=None),
    )
    print(f"{backend}: {counts}")
    assert counts.sequences >= examples and counts.saves_ok > 0
    return counts


def test_commit_protocol_on_memory() -> None:
    _run(memory_dir, "memory")


def test_commit_protocol_on_a_local_disk(tmp_path: Any) -> None:
    _run(local_dir(str(tmp_path)), "local")


def test_commit_protocol_on_s3(s3_bucket_url: tuple[str, dict[str, Any]]) -> None:
    _run(s3_dir(*s3_bucket_url), "s3")


def test_incremental_commit_protocol_on_memory() -> None:
    _run(memory_dir, "memory", incremental=True)


def test_incremental_commit_protocol_on_a_local_disk(tmp_path: Any) -> None:
    _run(local_dir(str(tmp_path)), "local", incremental=True)


def test_incremental_commit_protocol_on_s3(s3_bucket_url: tuple[str, dict[str, Any]]) -> None:
    _run(s3_dir(*s3_bucket_url), "s3", incremental=True)
