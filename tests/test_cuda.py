"""On a CUDA machine: GPU checkpoints are what tests/cuda_files.py fakes, and load where asked.

Skipped without CUDA (the CPU-only side is tests/test_cross_device.py, which
``benchmarks/gpu_check.sh`` also runs on the GPU machine with the GPUs hidden).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from cuda_files import all_tensors, saved_on_cuda, storage_locations

from lightning_ckpt import CheckpointManager, DeviceUnavailableError
from lightning_ckpt.async_saver import AsyncSaver
from lightning_ckpt.io import ManagedCheckpointIO
from lightning_ckpt.rng import capture_rng, restore_rng

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def state(device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, generator=g)
    return {
        "state_dict": {"w": weight.to(device), "tied": weight.to(device), "h": torch.randn(5, generator=g).half().to(device),
                       "b": torch.randn(3, generator=g).bfloat16().to(device), "i": torch.arange(4).to(device)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(8, 4, device=device)}},
                              "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "global_step": 3,
    }


def records(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n) for n in z.namelist() if not n.endswith(".data/serialization_id")}


def test_the_faked_gpu_file_is_byte_for_byte_what_a_gpu_writes() -> None:
    real, fake = io.BytesIO(), io.BytesIO()
    on_gpu = state("cuda:0")
    on_gpu["state_dict"]["tied"] = on_gpu["state_dict"]["w"]
    on_gpu["optimizer_states"][0]["state"][0]["step"] = torch.tensor(3.0)  # Adam keeps step on the CPU
    torch.save(on_gpu, real)
    on_cpu = state("cpu")
    on_cpu["state_dict"]["tied"] = on_cpu["state_dict"]["w"]
    step = on_cpu["optimizer_states"][0]["state"][0]["step"]
    with saved_on_cuda(select=lambda s: s.data_ptr() != step.untyped_storage().data_ptr()):
        torch.save(on_cpu, fake)
    assert records(real.getvalue()) == records(fake.getvalue())


def test_a_cpu_checkpoint_loads_onto_the_gpu_where_asked(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    manager.save(state("cpu"), "cpu.ckpt")
    for map_location in ("cuda", "cuda:0", torch.device("cuda", 0), {"cpu": "cuda:0"}):
        loaded = manager.load("cpu.ckpt", map_location=map_location)
        assert all(t.is_cuda for _, t in all_tensors(loaded)), map_location
    loaded = ManagedCheckpointIO().load_checkpoint(manager.url_of("cpu.ckpt"), map_location="cuda")
    assert all(t.is_cuda for _, t in all_tensors(loaded))


def test_a_gpu_checkpoint_stays_on_the_gpu_only_when_asked(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    manager.save(state("cuda"), "gpu.ckpt")
    assert "cuda:0" in storage_locations(tmp_path / "gpu.ckpt").values()
    assert all(t.is_cpu for _, t in all_tensors(manager.load("gpu.ckpt")))  # the default: the CPU
    kept = manager.load("gpu.ckpt", map_location=None)
    assert kept["state_dict"]["w"].is_cuda and kept["optimizer_states"][0]["state"][0]["step"].is_cpu


def test_a_gpu_index_this_machine_lacks_is_a_clear_error(tmp_path: Path) -> None:
    count = torch.cuda.device_count()
    manager = CheckpointManager(str(tmp_path))
    manager.save(state("cpu"), "cpu.ckpt")
    with pytest.raises(DeviceUnavailableError, match="map_location"):
        manager.load("cpu.ckpt", map_location=f"cuda:{count}")
    with saved_on_cuda(f"cuda:{count}"):
        manager.save(state("cpu"), "far.ckpt")  # written on a machine with more GPUs
    with pytest.raises(DeviceUnavailableError, match="map_location"):
        manager.load("far.ckpt", map_location=None)
    assert manager.load("far.ckpt")["global_step"] == 3


def test_background_saves_of_gpu_state_record_cpu_locations(tmp_path: Path) -> None:
    # the snapshot lives in pinned host buffers, so the file names no GPU at all
    manager = CheckpointManager(str(tmp_path))
    saver = AsyncSaver(manager)
    try:
        pending = saver.save(state("cuda"), "async.ckpt", global_step=3)
        assert pending is not None
        pending.wait()
    finally:
        saver.close()
    assert set(storage_locations(tmp_path / "async.ckpt").values()) == {"cpu"}
    assert torch.load(tmp_path / "async.ckpt", weights_only=True)["global_step"] == 3


def test_cuda_random_states_round_trip() -> None:
    torch.cuda.init()
    saved = capture_rng()
    assert len(saved["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda")
    restore_rng(saved)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
