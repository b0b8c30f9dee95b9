"""AsyncSaver: exact snapshots into reused host buffers, bounded background persisting, errors surface.

Slow or failing storage is faked by subclassing :class:`CheckpointManager` (a save gated on a
``threading.Event``, or one that raises); ordering is checked through events, never through time.
"""

from __future__ import annotations

import collections
import copy
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from lightning_ckpt import (
    CheckpointError,
    CheckpointManager,
    CheckpointWarning,
    ConfigurationError,
    StorageError,
)
from lightning_ckpt.async_saver import AsyncSaver, PendingSave, SaveAbandonedError
from lightning_ckpt.manager import SaveResult

Point = collections.namedtuple("Point", "x y")  # module level: pickle finds it by name
WAIT = 30  # seconds; only a bound so that a broken implementation fails instead of hanging


def memory_url() -> str:
    return f"memory://async-{uuid.uuid4().hex[:12]}"


class GatedManager(CheckpointManager):
    """A manager whose saves start only when ``gate`` is set; logs start and commit of each save."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.log: list[str] = []

    def save(self, state: Any, name: str, **kwargs: Any) -> SaveResult:  # type: ignore[override]
        self.log.append(f"start {name}")
        self.entered.set()
        assert self.gate.wait(WAIT), "test gate never opened"
        result = super().save(state, name, **kwargs)
        self.log.append(f"commit {name}")
        return result


class FailingManager(CheckpointManager):
    """A manager whose storage fails the first ``failures`` saves with ``error``."""

    def __init__(self, url: str, error: BaseException, failures: int = 1) -> None:
        super().__init__(url)
        self.error = error
        self.failures = failures

    def save(self, state: Any, name: str, **kwargs: Any) -> SaveResult:  # type: ignore[override]
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return super().save(state, name, **kwargs)


@pytest.fixture
def savers() -> Iterator[list[AsyncSaver]]:
    """Savers a test creates; abandoned at the end so no thread outlives a failed test."""
    made: list[AsyncSaver] = []
    yield made
    for saver in made:
        saver.close(abandon=True)


def trained_checkpoint(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """A Lightning-shaped checkpoint: weights, Adam state (scalar CPU ``step``), scheduler, plain values."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for _ in range(3):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        sched.step()
    checkpoint = {
        "epoch": 2,
        "global_step": 3,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3, "completed": 2}}}},
        "callbacks": {"CheckpointCallback{monitor=val_loss}": {"best_model_score": torch.tensor(0.25),
                                                               "best_model_path": "memory://x/a.ckpt"}},
        "hyper_parameters": {"lr": 0.01, "layers": (8, 16, 2), "name": "mlp", "flag": None},
        "nested": [[torch.arange(6).reshape(2, 3)], ({"deep": torch.ones(2, dtype=torch.bfloat16)},)],
    }
    return model, opt, checkpoint


def assert_identical(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Same structure, same types, tensors equal bit for bit (dtype, shape and bytes)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def mutate_in_place(model: nn.Module, opt: torch.optim.Optimizer, checkpoint: dict[str, Any]) -> None:
    """What training does right after a save: weights, optimizer state and buffers change in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0).add_(1.0)
        for b in model.buffers():
            b.add_(7)
        for state in opt.state.values():
            for value in state.values():
                value.add_(1)  # includes the scalar CPU `step`
    checkpoint["nested"][0][0].zero_()
    checkpoint["nested"][1][0]["deep"].fill_(5)
    checkpoint["callbacks"]["CheckpointCallback{monitor=val_loss}"]["best_model_score"].fill_(9)
    checkpoint["hyper_parameters"]["lr"] = 123.0
    checkpoint["loops"]["fit_loop"]["epoch_progress"]["total"]["ready"] = 99


# -- exactness ---------------------------------------------------------------------------------


def test_persisted_state_is_the_state_at_the_call_even_if_mutated_right_after(savers) -> None:
    model, opt, checkpoint = trained_checkpoint()
    manager = CheckpointManager(memory_url())
    saver = AsyncSaver(manager)
    savers.append(saver)
    reference = copy.deepcopy(checkpoint)  # taken at the same moment as the async save

    pending = saver.save(checkpoint, "async.ckpt", epoch=2, global_step=3, metrics={"val_loss": 0.25})
    mutate_in_place(model, opt, checkpoint)
    assert pending is not None
    result = pending.wait(WAIT)
    manager.save(reference, "sync.ckpt", epoch=2, global_step=3, metrics={"val_loss": 0.25})

    loaded = manager.load("async.ckpt")
    assert_identical(loaded, manager.load("sync.ckpt"))
    assert_identical(loaded["optimizer_states"], reference["optimizer_states"])
    assert loaded["optimizer_states"][0]["state"][0]["step"].item() == 3.0  # not the mutated 4.0
    assert result.manifest.global_step == 3 and result.manifest.metrics == {"val_loss": 0.25}
    assert result.url == manager.url_of("async.ckpt")
    assert pending.done() and pending.persist_seconds is not None and pending.stall_seconds  # measured


def test_payload_is_byte_identical_to_a_synchronous_save(savers) -> None:
    _, _, checkpoint = trained_checkpoint()
    manager = CheckpointManager(memory_url())
    saver = AsyncSaver(manager)
    savers.append(saver)
    reference = copy.deepcopy(checkpoint)
    pending = saver.save(checkpoint, "async.ckpt")
    assert pending is not None
    synced = manager.save(reference, "sync.ckpt")
    assert pending.wait(WAIT).manifest.digest == synced.manifest.digest


def test_plain_values_containers_and_metadata_survive(savers) -> None:
    manager = CheckpointManager(memory_url())
    saver = AsyncSaver(manager)
    savers.append(saver)
    state_dict = nn.Linear(2, 2).state_dict()
    checkpoint = {
        "state_dict": state_dict,
        "ints": [1, 2, 3],
        "text": "hello",
        "none": None,
        "floats": {"a": 0.5, "b": float("inf")},
        "tuple": (1, ("x", torch.zeros(1))),
        "point": Point(1, 2),
        "empty": torch.empty(0, 3),
        "int64": torch.tensor([2**62], dtype=torch.int64),
    }
    pending = saver.save(checkpoint, "a.ckpt")
    assert pending is not None
    pending.wait(WAIT)
    loaded = manager.load("a.ckpt", weights_only=False)
    assert isinstance(loaded["state_dict"], collections.OrderedDict)
    assert loaded["state_dict"]._metadata == state_dict._metadata  # load_state_dict's version info
    assert isinstance(loaded["point"], Point) and loaded["point"] == Point(1, 2)
    for key in ("ints", "text", "none", "floats"):
        assert loaded[key] == checkpoint[key]
    assert_identical(loaded["tuple"], checkpoint["tuple"])
    assert loaded["empty"].shape == (0, 3)
    assert loaded["int64"].item() == 2**62


def test_shared_storages_stay_shared_like_torch_save(savers) -> None:
    manager = CheckpointManager(memory_url())
    saver = AsyncSaver(manager)
    savers.append(saver)
    base = torch.arange(12, dtype=torch.float32)
    checkpoint = {"tied_a": base, "tied_b": base.view(3, 4), "slice": base[4:8], "t": base.view(3, 4).t()}
    pending = saver.save(checkpoint, "a.ckpt")
    assert pending is not None
    pending.wait(WAIT)
    assert len(saver.buffers) == 1 and saver.buffer_bytes == base.nbytes
    loaded = manager.load("a.ckpt")
    ptrs = {loaded[k].untyped_storage().data_ptr() for k in checkpoint}
    assert len(ptrs) == 1
    for key, value in checkpoint.items():
        assert torch.equal(loaded[key], value) and loaded[key].stride() == value.stride()


# -- buffers -----------------------------------------------------------------------------------


def test_host_buffers_are_allocated_once_and_reused(savers) -> None:
    model, opt, checkpoint = trained_checkpoint()
    manager = CheckpointManager(memory_url())
    saver = AsyncSaver(manager)
    savers.append(saver)
    first = saver.save(checkpoint, "a.ckpt")
    assert first is not None
    first.wait(WAIT)
    pointers = [b.data_ptr() for b in saver.buffers]
    size = saver.buffer_bytes
    state_bytes = sum(t.untyped_storage().nbytes() for t in model.state_dict().values())
    assert size >= state_bytes

    mutate_in_place(model, opt, checkpoint)
    _, _, checkpoint = trained_checkpoint(seed=1)  # same structure, new tensors and values
    second = saver.save(checkpoint, "b.ckpt")
    assert second is not None
    second.wait(WAIT)
    assert [b.data_ptr() for b in saver.buffers] == pointers
    assert saver.buffer_bytes == size
    assert_identical(manager.load("b.ckpt")["state_dict"], checkpoint["state_dict"])
    assert_identical(manager.load("a.ckpt")["epoch"], 2)


def test_a_structure_change_reallocates(savers) -> None:
    manager = CheckpointManager(memory_url())
    saver = AsyncSaver(manager)
    savers.append(saver)
    saver.save({"w": torch.ones(10)}, "a.ckpt")
    saver.wait()
    assert saver.buffer_bytes == 40
    saver.save({"w": torch.ones(10), "extra": torch.zeros(5, dtype=torch.float64)}, "b.ckpt")
    saver.wait()
    assert saver.buffer_bytes == 80 and len(saver.buffers) == 2
    assert torch.equal(manager.load("b.ckpt")["extra"], torch.zeros(5, dtype=torch.float64))
    saver.save({"w": torch.ones(20)}, "c.ckpt")
    saver.wait()
    assert saver.buffer_bytes == 80 and len(saver.buffers) == 1
    assert torch.equal(manager.load("c.ckpt")["w"], torch.ones(20))


# -- bounded: one save persisting at a time ----------------------------------------------------


def test_skip_policy_skips_and_warns_while_a_save_persists(savers) -> None:
    manager = GatedManager(memory_url())
    saver = AsyncSaver(manager, when_busy="skip")
    savers.append(saver)
    first = saver.save({"w": torch.ones(4)}, "a.ckpt")
    assert first is not None
    assert manager.entered.wait(WAIT)
    assert saver.busy
    with pytest.warns(CheckpointWarning, match="still persisting"):
        assert saver.save({"w": torch.zeros(4)}, "b.ckpt") is None
    assert saver.skipped == 1
    manager.gate.set()
    saver.wait()
    assert not saver.busy
    assert [m.name for m in manager.manifests()] == ["a.ckpt"]
    assert torch.equal(manager.load("a.ckpt")["w"], torch.ones(4))
    # once idle, saving resumes
    later = saver.save({"w": torch.zeros(4)}, "b.ckpt")
    assert later is not None
    later.wait(WAIT)
    assert saver.skipped == 1


def test_wait_policy_blocks_until_the_previous_save_committed(savers) -> None:
    manager = GatedManager(memory_url())
    saver = AsyncSaver(manager, when_busy="wait")
    savers.append(saver)
    saver.save({"w": torch.ones(4)}, "a.ckpt")
    assert manager.entered.wait(WAIT)
    second_state = {"w": torch.full((4,), 2.0)}

    def second_save() -> None:
        saver.save(second_state, "b.ckpt")
        manager.log.append("b.ckpt save() returned")

    thread = threading.Thread(target=second_save)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive(), "save() returned while the previous save was still persisting"
    manager.gate.set()
    thread.join(WAIT)
    saver.wait()
    assert manager.log.index("commit a.ckpt") < manager.log.index("b.ckpt save() returned")
    assert manager.log.index("commit a.ckpt") < manager.log.index("start b.ckpt")
    assert torch.equal(manager.load("b.ckpt")["w"], second_state["w"])


def test_on_done_runs_after_the_commit(savers) -> None:
    manager = CheckpointManager(memory_url())
    saver = AsyncSaver(manager)
    savers.append(saver)
    seen: list[tuple[str, list[str], str]] = []

    def on_done(result: SaveResult) -> None:
        seen.append((result.manifest.name, [m.name for m in manager.manifests()], threading.current_thread().name))

    pending = saver.save({"w": torch.ones(2)}, "a.ckpt", on_done=on_done)
    assert pending is not None
    pending.wait(WAIT)
    assert seen and seen[0][:2] == ("a.ckpt", ["a.ckpt"])
    assert seen[0][2] != threading.current_thread().name


# -- errors surface ----------------------------------------------------------------------------


def test_a_storage_error_is_raised_by_the_next_save_and_by_wait(savers) -> None:
    manager = FailingManager(memory_url(), StorageError("memory://x/a.ckpt: disk on fire"))
    saver = AsyncSaver(manager)
    savers.append(saver)
    first = saver.save({"w": torch.ones(2)}, "a.ckpt")
    assert first is not None
    with pytest.raises(StorageError, match="disk on fire"):
        saver.save({"w": torch.ones(2)}, "b.ckpt")  # previous failure: this save does not start
    assert manager.manifests() == []
    # reported once by the saver; the handle still answers with its error
    with pytest.raises(StorageError):
        first.wait(WAIT)
    again = saver.save({"w": torch.ones(2)}, "b.ckpt")
    assert again is not None and again.wait(WAIT).manifest.name == "b.ckpt"


def test_a_foreign_error_is_wrapped_typed_and_raised_by_wait_and_close(savers) -> None:
    manager = FailingManager(memory_url(), OSError(28, "No space left on device"), failures=2)
    saver = AsyncSaver(manager)
    savers.append(saver)
    saver.save({"w": torch.ones(2)}, "a.ckpt")
    with pytest.raises(CheckpointError, match="No space left") as info:
        saver.wait()
    assert isinstance(info.value.__cause__, OSError)
    assert any("background save" in note for note in getattr(info.value, "__notes__", []))
    assert saver.wait() is None  # reported already
    saver.save({"w": torch.ones(2)}, "b.ckpt")
    with pytest.raises(CheckpointError, match="No space left"):
        saver.close()
    with pytest.raises(CheckpointError, match="closed"):
        saver.save({"w": torch.ones(2)}, "c.ckpt")


def test_an_on_done_error_surfaces(savers) -> None:
    manager = CheckpointManager(memory_url())
    saver = AsyncSaver(manager)
    savers.append(saver)

    def on_done(result: SaveResult) -> None:
        raise RuntimeError("retention failed")

    saver.save({"w": torch.ones(2)}, "a.ckpt", on_done=on_done)
    with pytest.raises(CheckpointError, match="retention failed"):
        saver.wait()
    assert [m.name for m in manager.manifests()] == ["a.ckpt"]  # the checkpoint itself committed


# -- close ---------------------------------------------------------------------------------------


def test_close_waits_for_the_save_in_flight() -> None:
    manager = GatedManager(memory_url())
    saver = AsyncSaver(manager)
    pending = saver.save({"w": torch.ones(3)}, "a.ckpt")
    assert pending is not None

    def release_once_started() -> None:
        manager.entered.wait(WAIT)
        manager.gate.set()

    threading.Thread(target=release_once_started).start()
    saver.close()
    assert pending.done()
    assert [m.name for m in manager.manifests()] == ["a.ckpt"]
    assert saver.buffer_bytes == 0
    saver.close()  # idempotent


def test_close_abandon_makes_nothing_visible() -> None:
    manager = GatedManager(memory_url())
    saver = AsyncSaver(manager)
    pending = saver.save({"w": torch.ones(1000)}, "a.ckpt")
    assert pending is not None
    assert manager.entered.wait(WAIT)
    saver.close(abandon=True)  # returns at once, raising nothing
    manager.gate.set()
    with pytest.raises(SaveAbandonedError):
        pending.wait(WAIT)
    assert manager.manifests() == []
    assert list(manager.storage.list()) == []  # no payload, no marker left either


def test_abandon_warns_about_an_unreported_error() -> None:
    manager = FailingManager(memory_url(), StorageError("boom"))
    saver = AsyncSaver(manager)
    pending = saver.save({"w": torch.ones(2)}, "a.ckpt")
    assert pending is not None
    with pytest.raises(StorageError):
        pending.wait(WAIT)
    saver.close(abandon=True)  # reported already by the handle: silent

    saver = AsyncSaver(manager := FailingManager(memory_url(), StorageError("boom")))
    pending = saver.save({"w": torch.ones(2)}, "a.ckpt")
    assert pending is not None
    pending._finished.wait(WAIT)
    with pytest.warns(CheckpointWarning, match="boom"):
        saver.close(abandon=True)
    assert manager.manifests() == []


def test_context_manager_flushes() -> None:
    manager = CheckpointManager(memory_url())
    with AsyncSaver(manager) as saver:
        saver.save({"w": torch.ones(2)}, "a.ckpt")
    assert [m.name for m in manager.manifests()] == ["a.ckpt"]


# -- arguments -----------------------------------------------------------------------------------


def test_bad_arguments_are_rejected() -> None:
    manager = CheckpointManager(memory_url())
    with pytest.raises(ConfigurationError):
        AsyncSaver(manager, when_busy="queue")  # type: ignore[arg-type]
    saver = AsyncSaver(manager)
    with pytest.raises(ConfigurationError):
        saver.save({"w": torch.ones(1)}, "a.ckpt", write=lambda f: None)
    with pytest.raises(ConfigurationError):
        saver.save([torch.ones(1)], "a.ckpt")  # type: ignore[arg-type]
    assert saver.pending is None and saver.wait() is None
    saver.close()


def test_pending_wait_times_out_without_cancelling(savers) -> None:
    manager = GatedManager(memory_url())
    saver = AsyncSaver(manager)
    savers.append(saver)
    pending = saver.save({"w": torch.ones(2)}, "a.ckpt")
    assert isinstance(pending, PendingSave)
    with pytest.raises(TimeoutError):
        pending.wait(timeout=0.01)
    manager.gate.set()
    assert pending.wait(WAIT).manifest.name == "a.ckpt"


# -- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("overlap", [False, True])
def test_cuda_state_is_copied_into_pinned_buffers_exactly(savers, overlap: bool) -> None:
    manager = CheckpointManager(memory_url())
    saver = AsyncSaver(manager, overlap=overlap)
    savers.append(saver)
    model = nn.Linear(256, 256).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 256, device="cuda")).sum().backward()
    opt.step()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    expected = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}
    pending = saver.save(checkpoint, "a.ckpt")
    assert pending is not None
    if overlap:
        saver.wait_snapshot()  # the contract: before anything mutates the weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    pending.wait(WAIT)
    cuda_buffers = [b for b in saver.buffers if b.is_pinned()]
    assert cuda_buffers and all(b.device.type == "cpu" for b in saver.buffers)
    assert_identical(manager.load("a.ckpt")["state_dict"], expected["state_dict"])
