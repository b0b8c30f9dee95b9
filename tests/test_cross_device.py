"""A checkpoint written on a GPU resumes on a CPU-only machine, and map_location is honoured.

The GPU-written files are made here without a GPU (tests/cuda_files.py): every storage carries
the location tag ``"cuda:0"`` that ``torch.save`` records on a GPU box. The checkpoints of the
run directory are written by a real fit through the callback and manager, so they verify.
The other direction (a CPU checkpoint onto a GPU) is tested where CUDA exists
(``benchmarks/gpu_check.sh``); here it must fail saying why.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from backends import backend  # noqa: F401
from cuda_files import all_tensors, saved_on_cuda, storage_locations
from helpers import TinyModel, fit

from lightning_ckpt import (
    CheckpointCallback,
    CheckpointManager,
    ConfigurationError,
    DeviceUnavailableError,
    IncompatibleCheckpointError,
    load_checkpoint,
)
from lightning_ckpt.cli import main
from lightning_ckpt.io import ManagedCheckpointIO
from lightning_ckpt.resumable import adapt_optimizer_states
from lightning_ckpt.rng import capture_rng, restore_rng
from lightning_ckpt.security import Encryptor

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="proves the CPU-only side"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Lightning's hints about workers and loggers
]

CPU_ERROR = "Attempting to deserialize object on a CUDA device"


def callback(directory: Any) -> CheckpointCallback:
    return CheckpointCallback(dirpath=str(directory), monitor="val_loss", save_top_k=2, save_last=True)


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs saved "on a GPU": a checkpoint per epoch and last.ckpt, with manifests."""
    directory = tmp_path_factory.mktemp("gpu") / "run"
    with saved_on_cuda():
        fit(callback(directory), max_epochs=2)
    return directory


@pytest.fixture
def run(gpu_run: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the GPU run (resuming writes into it)."""
    copy = tmp_path / "run"
    shutil.copytree(gpu_run, copy)
    yield copy


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.ckpt"))


def assert_on_cpu(checkpoint: dict[str, Any]) -> None:
    tensors = all_tensors(checkpoint)
    assert tensors and all(t.device.type == "cpu" for _, t in tensors), [k for k, t in tensors if not t.is_cpu]


def test_the_files_are_what_a_gpu_box_writes(run: Path) -> None:
    assert names(run) == ["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt", "last.ckpt"]
    for name in names(run):
        locations = storage_locations(run / name)
        assert locations["/state_dict/net.0.weight"] == "cuda:0"
        assert locations["/optimizer_states/0/state/0/exp_avg"] == "cuda:0"
        assert set(locations.values()) == {"cuda:0"}
        with pytest.raises(RuntimeError, match=CPU_ERROR):  # what stock torch.load says here
            torch.load(run / name, weights_only=True)
        assert CheckpointManager(str(run)).verify(name).global_step in (8, 16)


def test_manager_and_function_load_to_the_cpu_without_a_map_location(run: Path) -> None:
    checkpoint = CheckpointManager(str(run)).load("last.ckpt")
    assert_on_cpu(checkpoint)
    assert checkpoint["global_step"] == 16
    assert_on_cpu(load_checkpoint(str(run / "epoch=0-step=8.ckpt")))


@pytest.mark.parametrize("where", ["explicit", "last", "best"])
def test_fit_resumes_a_gpu_checkpoint_on_the_cpu(run: Path, where: str) -> None:
    ckpt_path = {"explicit": str(run / "epoch=0-step=8.ckpt"), "last": "last", "best": "best"}[where]
    best = min((m for m in CheckpointManager(str(run)).manifests() if m.name != "last.ckpt"),
               key=lambda m: m.metrics["val_loss"])
    start = {"explicit": 8, "last": 16, "best": best.global_step}[where]
    expected = {"explicit": "epoch=0-step=8.ckpt", "last": "last.ckpt", "best": best.name}[where]
    saved = CheckpointManager(str(run)).load(expected)
    seen: dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            seen["step"] = trainer.global_step
            seen["weight"] = pl_module.net[0].weight.detach().clone()
            seen["exp_avg"] = trainer.optimizers[0].state_dict()["state"][0]["exp_avg"].clone()

    cb = callback(run)
    trainer, model = fit(cb, max_epochs=3, ckpt_path=ckpt_path, extra_callbacks=[Probe()])
    assert cb.resumed_from is not None and cb.resumed_from.endswith(expected)
    assert seen["step"] == start
    assert torch.equal(seen["weight"], saved["state_dict"]["net.0.weight"])
    assert torch.equal(seen["exp_avg"], saved["optimizer_states"][0]["state"][0]["exp_avg"])
    assert trainer.global_step == 24
    assert all(t.is_cpu for _, t in all_tensors(trainer.optimizers[0].state_dict()))
    assert all(p.is_cpu for p in model.parameters())


def test_a_resumed_gpu_checkpoint_continues_exactly_as_an_uninterrupted_run(tmp_path: Path) -> None:
    _, straight = fit(callback(tmp_path / "straight"), max_epochs=2)
    with saved_on_cuda():
        fit(callback(tmp_path / "gpu"), max_epochs=1)
    _, resumed = fit(callback(tmp_path / "gpu"), max_epochs=2, ckpt_path="last")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_load_from_checkpoint_needs_no_map_location(run: Path) -> None:
    model = TinyModel.load_from_checkpoint(run / "last.ckpt")
    expected = CheckpointManager(str(run)).load("last.ckpt")["state_dict"]["net.0.weight"]
    assert model.net[0].weight.is_cpu and torch.equal(model.net[0].weight, expected)
    CALLS.clear()
    model = TinyModel.load_from_checkpoint(run / "last.ckpt", map_location=cuda_to_cpu)  # Lightning's own load
    assert CALLS and set(CALLS) == {"cuda:0"} and torch.equal(model.net[0].weight, expected)


def cuda_to_cpu(storage: Any, location: str) -> Any:
    CALLS.append(location)
    return storage


CALLS: list[str] = []

MAP_LOCATIONS = {
    "callable": cuda_to_cpu,
    "dict": {"cuda:0": "cpu"},
    "string": "cpu",
    "device": torch.device("cpu"),
}


@pytest.mark.parametrize("kind", list(MAP_LOCATIONS))
def test_an_explicit_map_location_is_honoured_everywhere_we_load(run: Path, kind: str) -> None:
    map_location = MAP_LOCATIONS[kind]
    loaders = {
        "manager": lambda: CheckpointManager(str(run)).load("last.ckpt", map_location=map_location),
        "function": lambda: load_checkpoint(str(run / "last.ckpt"), map_location=map_location),
        "io": lambda: ManagedCheckpointIO().load_checkpoint(str(run / "last.ckpt"), map_location=map_location),
    }
    for loader, load in loaders.items():
        CALLS.clear()
        checkpoint = load()
        assert_on_cpu(checkpoint)
        assert checkpoint["global_step"] == 16, loader
        if kind == "callable":
            assert CALLS and set(CALLS) == {"cuda:0"}, loader  # ours was asked, with the recorded tag


def test_a_map_location_sends_tensors_where_it_says(run: Path) -> None:
    # the meta device holds no data: proof that the map_location, not a default, placed them
    checkpoint = CheckpointManager(str(run)).load("last.ckpt", map_location={"cuda:0": "meta"})
    assert all(t.device.type == "meta" for _, t in all_tensors(checkpoint))
    checkpoint = ManagedCheckpointIO().load_checkpoint(str(run / "last.ckpt"), map_location="meta")
    assert all(t.device.type == "meta" for _, t in all_tensors(checkpoint))


@pytest.mark.parametrize("map_location", ["cuda", "cuda:0", torch.device("cuda", 1), None, {"cuda:0": "cuda:1"}])
def test_a_device_this_machine_lacks_is_a_clear_error_not_corruption(run: Path, tmp_path: Path,
                                                                     map_location: Any) -> None:
    cpu = CheckpointManager(str(tmp_path / "cpu"))
    cpu.save({"w": torch.ones(3)}, "cpu.ckpt")
    cases = [(CheckpointManager(str(run)), "last.ckpt")]
    if map_location is not None and not isinstance(map_location, dict):
        cases.append((cpu, "cpu.ckpt"))  # the reverse direction: a CPU checkpoint asked onto CUDA
    for manager, name in cases:
        with pytest.raises(DeviceUnavailableError, match=r"(?i)cuda.*map_location") as info:
            manager.load(name, map_location=map_location)
        assert isinstance(info.value, IncompatibleCheckpointError) and isinstance(info.value, ValueError)
        assert manager.url_of(name) in str(info.value)
        if map_location is None:
            continue  # to Lightning's CheckpointIO, None means "not given": the CPU
        with pytest.raises(DeviceUnavailableError):
            ManagedCheckpointIO().load_checkpoint(manager.url_of(name), map_location=map_location)


@pytest.mark.parametrize("map_location", ["cuda:abc", "bogus", 5, b"nowhere"])
def test_a_map_location_that_is_no_device_is_a_configuration_error(run: Path, map_location: Any) -> None:
    with pytest.raises(ConfigurationError, match="map_location"):
        CheckpointManager(str(run)).load("last.ckpt", map_location=map_location)
    assert CheckpointManager(str(run)).load("last.ckpt", map_location=b"cpu")["global_step"] == 16


def test_the_cli_inspects_diffs_and_exports_gpu_checkpoints(run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(run / "last.ckpt")]) == 0
    assert "net.0.weight" in capsys.readouterr().out
    assert main(["diff", str(run / "epoch=0-step=8.ckpt"), str(run / "last.ckpt")]) in (0, 1)
    assert "net.0.weight" in capsys.readouterr().out
    assert main(["verify", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", str(run / "last.ckpt"), "--format", "torch", "-o", str(tmp_path / "w.pt")]) == 0
    exported = torch.load(tmp_path / "w.pt", weights_only=True)  # stock torch, no map_location
    assert set(storage_locations(tmp_path / "w.pt").values()) == {"cpu"}
    assert torch.equal(exported["net.0.weight"], CheckpointManager(str(run)).load("last.ckpt")["state_dict"]["net.0.weight"])
    assert main(["export", str(run / "last.ckpt"), "-o", str(tmp_path / "w.safetensors")]) == 0


def test_gpu_checkpoints_load_to_the_cpu_from_every_backend(backend) -> None:  # noqa: F811
    url, options = backend
    manager = CheckpointManager(url, options)
    with saved_on_cuda():
        manager.save({"state_dict": {"w": torch.arange(6.0)}, "global_step": 2}, "g.ckpt", global_step=2)
    assert_on_cpu(manager.load("g.ckpt"))
    assert_on_cpu(load_checkpoint(manager.url_of("g.ckpt"), options))
    assert manager.load("g.ckpt", map_location={"cuda:0": "meta"})["state_dict"]["w"].is_meta
    with pytest.raises(DeviceUnavailableError, match="map_location"):
        manager.load("g.ckpt", map_location=None)


def test_encrypted_gpu_checkpoints_load_to_the_cpu_and_honour_map_location(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path), encryptor=Encryptor(b"k" * 32))
    with saved_on_cuda():
        manager.save({"state_dict": {"w": torch.arange(6.0)}}, "enc.ckpt")
    assert_on_cpu(manager.load("enc.ckpt"))
    assert manager.load("enc.ckpt", map_location={"cuda:0": "meta"})["state_dict"]["w"].is_meta
    with pytest.raises(DeviceUnavailableError, match="map_location"):
        manager.load("enc.ckpt", map_location=None)


def test_sharded_gpu_checkpoints_load_on_the_cpu(tmp_path: Path) -> None:
    from lightning_ckpt.sharded import ShardedCheckpointer, consolidate

    manager = CheckpointManager(str(tmp_path))
    model = torch.nn.Linear(4, 2)
    with pytest.warns(UserWarning), saved_on_cuda():  # "torch.distributed is disabled": one process
        ShardedCheckpointer(manager).save({"state_dict": model.state_dict()},
                                          {"global_step": 3, "score": torch.tensor(0.5)}, "s.ckpt", global_step=3)
    fresh = torch.nn.Linear(4, 2)
    with pytest.warns(UserWarning):
        _, extras = ShardedCheckpointer(manager).load("s.ckpt", fresh)
    assert extras["score"].is_cpu and torch.equal(fresh.weight, model.weight)
    assert_on_cpu(consolidate(manager, "s.ckpt"))


def test_cuda_random_states_are_skipped_with_a_note_where_cuda_is_missing(caplog: pytest.LogCaptureFixture) -> None:
    state = capture_rng()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # what torch.cuda.get_rng_state_all() gives
    expected = torch.rand(3)
    with caplog.at_level(logging.INFO, logger="lightning_ckpt"):
        restore_rng(state)
    assert torch.equal(torch.rand(3), expected)  # every other stream was restored
    assert "1 CUDA device" in caplog.text and "not restored" in caplog.text


def test_a_gpu_checkpoint_with_cuda_random_states_resumes_on_the_cpu(run: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(str(run))
    checkpoint = manager.load("last.ckpt")
    states = [v for v in checkpoint["callbacks"].values() if isinstance(v, dict) and v.get("rng")]
    assert states
    for state in states:
        state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    with saved_on_cuda():
        manager.save(checkpoint, "gpu-rng.ckpt", global_step=16)
    with caplog.at_level(logging.INFO, logger="lightning_ckpt"):
        trainer, _ = fit(callback(run), max_epochs=3, ckpt_path=str(run / "gpu-rng.ckpt"))
    assert trainer.global_step == 24
    assert "2 CUDA device" in caplog.text


def test_a_gpu_checkpoint_of_a_capturable_optimizer_resumes_on_the_cpu(run: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    # Adam(capturable=True) on a GPU (CUDA graphs) keeps `step` on the GPU and saves the flag;
    # torch's load_state_dict would put it back, and Adam's step then refuses CPU parameters
    manager = CheckpointManager(str(run))
    checkpoint = manager.load("last.ckpt")
    for state in checkpoint["optimizer_states"]:
        for group in state["param_groups"]:
            group["capturable"] = True
        for per_param in state["state"].values():
            per_param["step"] = per_param["step"].float()
    with saved_on_cuda():
        manager.save(checkpoint, "capturable.ckpt", global_step=16)
    with caplog.at_level(logging.INFO, logger="lightning_ckpt"):
        trainer, _ = fit(callback(run), max_epochs=3, ckpt_path=str(run / "capturable.ckpt"))
    assert trainer.global_step == 24
    assert not trainer.optimizers[0].param_groups[0]["capturable"]
    assert "capturable" in caplog.text


def test_only_a_capturable_flag_the_cpu_cannot_honour_is_changed() -> None:
    params = [torch.nn.Parameter(torch.ones(2))]
    saved = lambda: [{"state": {}, "param_groups": [{"capturable": True, "lr": 0.5, "params": [0]}]}]  # noqa: E731
    states = saved()
    assert adapt_optimizer_states([torch.optim.Adam(params, capturable=True)], states) == []  # asked for here
    assert states == saved()
    states = saved()
    notes = adapt_optimizer_states([torch.optim.Adam(params)], states)
    assert len(notes) == 1 and "capturable" in notes[0]
    assert states[0]["param_groups"][0] == {"capturable": False, "lr": 0.5, "params": [0]}
    plain = [{"state": {}, "param_groups": [{"lr": 0.5, "params": [0]}]}]
    assert adapt_optimizer_states([torch.optim.SGD(params, lr=0.1)], plain) == [] and "capturable" not in plain[0]["param_groups"][0]


def test_validate_and_other_devices_indices_load_on_the_cpu(run: Path, tmp_path: Path) -> None:
    from helpers import data, trainer

    _, val = data()
    metrics = trainer([callback(run)]).validate(TinyModel(), val, ckpt_path=str(run / "last.ckpt"), verbose=False)
    assert metrics and "val_loss" in metrics[0]
    manager = CheckpointManager(str(tmp_path))
    with saved_on_cuda("cuda:7"):  # a single-GPU run on the eighth GPU of its machine
        manager.save({"w": torch.ones(2)}, "seven.ckpt")
    assert manager.load("seven.ckpt")["w"].is_cpu
    assert manager.load("seven.ckpt", map_location={"cuda:7": "cpu"})["w"].is_cpu
    with pytest.raises(DeviceUnavailableError):
        manager.load("seven.ckpt", map_location={"cuda:0": "cpu"})  # the mapping misses the saved device


@pytest.mark.parametrize("saved_on", ["cuda:1", "mps", "xla:0", "hpu:0", "privateuseone:0"])
def test_checkpoints_of_other_accelerators_load_on_the_cpu(tmp_path: Path, saved_on: str) -> None:
    manager = CheckpointManager(str(tmp_path))
    with saved_on_cuda(saved_on):  # the same record, another accelerator's name
        manager.save({"w": torch.arange(3.0)}, "x.ckpt")
    assert set(storage_locations(tmp_path / "x.ckpt").values()) == {saved_on}
    assert torch.equal(manager.load("x.ckpt")["w"], torch.arange(3.0))
    with pytest.raises(DeviceUnavailableError, match="map_location=None"):
        manager.load("x.ckpt", map_location=None)


def test_a_map_location_callable_keeps_its_own_errors(run: Path) -> None:
    def broken(storage: Any, location: str) -> Any:
        raise KeyError(f"no rule for {location}")

    with pytest.raises(KeyError, match="no rule for cuda:0"):  # the caller's error, not "corrupt"
        CheckpointManager(str(run)).load("last.ckpt", map_location=broken)

    def to_missing_gpu(storage: Any, location: str) -> Any:
        return torch.serialization.default_restore_location(storage, "cuda:0")

    with pytest.raises(DeviceUnavailableError, match="map_location"):  # a missing device, in torch's words
        CheckpointManager(str(run)).load("last.ckpt", map_location=to_missing_gpu)


def test_an_old_format_gpu_checkpoint_loads_on_the_cpu(tmp_path: Path) -> None:
    with saved_on_cuda():  # torch < 1.6 wrote no zip; its location records are the same
        torch.save({"w": torch.arange(3.0)}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    with pytest.warns(UserWarning, match="unverified"):  # a plain file of someone else's: no manifest
        assert torch.equal(CheckpointManager(str(tmp_path)).load("old.ckpt")["w"], torch.arange(3.0))
    with pytest.warns(UserWarning), pytest.raises(DeviceUnavailableError):
        CheckpointManager(str(tmp_path)).load("old.ckpt", map_location=None)
