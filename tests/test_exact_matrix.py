"""The exact-resume matrix: every save trigger, loader and model feature, each resume in a fresh process.

Each cell trains tests/matrix_run.py uninterrupted (3 epochs of 6 batches: a dropout MLP, AdamW, a
StepLR stepping per epoch or per step, items drawing from Python's, NumPy's and torch's generators,
validation drawing too), then resumes from checkpoints that run left (one, or two spread over it),
each in a new process, and compares the final weights, optimizer and scheduler states bit for
bit. The processes are forked from one that only imported the libraries (a fresh process without
7 s of imports each); the 2-process DDP cells launch as users do (marked ``slow``: ``-m slow``).

Combinations that cannot be exact are not in the matrix: they warn (tests at the end) and the
README lists them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_ckpt import CheckpointManager

RUN = str(Path(__file__).with_name("matrix_run.py"))
EPOCHS, STEPS_PER_EPOCH = 3, 6

Runner = Callable[[dict[str, Any]], int]


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, RUN, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    assert server.stdin is not None and server.stdout is not None

    def run(config: dict[str, Any]) -> int:
        server.stdin.write(json.dumps(config) + "\n")
        server.stdin.flush()
        return int(server.stdout.readline())

    yield run
    server.stdin.close()
    server.wait(timeout=60)


def launch(config: dict[str, Any]) -> str:
    """A run as its own script (Lightning's DDP launcher starts the other rank from sys.argv); its stderr."""
    env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, RUN, json.dumps(config)], capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def assert_identical(full: dict[str, Any], resumed: dict[str, Any], where: str) -> None:
    trace, rtrace = json.loads(full["trace"]), json.loads(resumed["trace"])
    start = len(trace) - len(rtrace)
    diverged = next((f"{a} != {b}" for a, b in zip(trace[start:], rtrace) if a != b), None)
    assert resumed["step"] == full["step"], where
    assert diverged is None, f"resumed from {where}: first difference (kind, epoch, step, batch sum, loss) {diverged}"
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), f"resumed from {where}: weight {key} differs"
    for pid, state in full["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][pid][key]), f"{where}: optimizer {pid}.{key}"
    assert full["optimizer"]["param_groups"] == resumed["optimizer"]["param_groups"], where
    assert full["scheduler"] == resumed["scheduler"], where


def resume_points(dirpath: Path, final: int, most: int) -> list[str]:
    """Up to ``most`` checkpoints the run left before its ``final`` step: the first and last of them, ..."""
    names = [m.name for m in sorted(CheckpointManager(str(dirpath)).manifests(), key=lambda m: m.global_step or 0)
             if (m.global_step or 0) < final and m.name != "last.ckpt"]
    if len(names) <= most:
        return names
    if most == 1:
        return [names[len(names) // 2]]
    return [names[round(i * (len(names) - 1) / (most - 1))] for i in range(most)]


def check_cell(run: Runner, tmp: Path, config: dict[str, Any]) -> list[str]:
    config = {"epochs": EPOCHS, **config}
    most = config.pop("resumes", 1)
    assert run({**config, "dirpath": str(tmp / "full"), "out": str(tmp / "full.pt")}) == 0
    full = load(tmp / "full.pt")
    batches = config.get("limit_train_batches", STEPS_PER_EPOCH)
    assert full["step"] == (config.get("max_steps") or config["epochs"] * batches // config.get("accumulate", 1))
    points = resume_points(tmp / "full", full["step"], most)
    assert points, "the uninterrupted run left no checkpoint to resume from"
    for name in points:
        out = tmp / f"{name}.pt"
        status = run({**config, "dirpath": str(tmp / f"resumed-{name}"), "out": str(out),
                      "ckpt_path": str(tmp / "full" / name)})
        assert status == 0, f"resuming from {name} failed"
        assert_identical(full, load(out), name)
    return points


CELLS: dict[str, dict[str, Any]] = {
    # triggers, with a shuffling DataLoader over the default generator
    "epoch-end-after-validation": {"trigger": "epoch", "resumes": 2},  # from each epoch's checkpoint
    "epoch-end-no-validation": {"trigger": "epoch_noval", "interval": "step"},
    "check-val-every-2-epochs": {"trigger": "val_every_2"},
    "val-check-interval-half": {"trigger": "val_half", "interval": "step"},
    "every-n-train-steps": {"trigger": "steps", "every": 4, "resumes": 2},
    "every-n-train-steps-at-epoch-ends-no-validation": {"trigger": "steps", "every": 6, "noval": True},
    "train-time-interval": {"trigger": "time", "every": 5},
    "epoch-end-training-by-max-steps": {"trigger": "epoch", "max_steps": EPOCHS * STEPS_PER_EPOCH, "epochs": -1},
    # loaders
    "explicit-generator-epoch": {"trigger": "epoch", "loader": "generator"},
    "explicit-generator-steps": {"trigger": "steps", "every": 5, "loader": "generator"},
    "two-workers-epoch": {"trigger": "epoch", "loader": "workers"},
    "two-workers-steps": {"trigger": "steps", "every": 5, "loader": "workers", "interval": "step"},
    "iterable-without-length-epoch": {"trigger": "epoch", "loader": "iterable"},
    "persistent-workers-mid-epoch": {"trigger": "steps", "every": 5, "loader": "persistent"},
    # models: gradient accumulation (3 optimizer steps an epoch)
    "accumulate-2-epoch": {"trigger": "epoch", "accumulate": 2, "interval": "step"},
    "accumulate-2-steps": {"trigger": "steps", "every": 2, "accumulate": 2, "resumes": 2},
}
#: more schedules and loaders, with ``-m slow``
MORE_CELLS: dict[str, dict[str, Any]] = {
    "every-n-train-steps-at-epoch-ends": {"trigger": "steps", "every": 6, "interval": "step"},
    "val-check-every-4-batches-across-epochs": {"trigger": "val_steps", "resumes": 2},
    "saved-at-validation-end": {"trigger": "epoch", "save_on_train_epoch_end": False},
    "no-sanity-check": {"trigger": "epoch", "sanity": 0},
    "reload-dataloaders-every-epoch": {"trigger": "epoch", "reload": 1},
    "limit-train-batches-steps": {"trigger": "steps", "every": 5, "limit_train_batches": 4, "resumes": 2},
    "torchdata-loader-epoch": {"trigger": "epoch", "loader": "torchdata"},
    "iterable-without-length-no-validation": {"trigger": "epoch_noval", "loader": "iterable"},
    "iterable-with-state-epoch": {"trigger": "epoch", "loader": "iterable_stateful"},
}


@pytest.mark.parametrize("cell", [*CELLS, *(pytest.param(c, marks=pytest.mark.slow) for c in MORE_CELLS)])
def test_resume_is_bit_identical(runner: Runner, tmp_path: Path, cell: str) -> None:
    check_cell(runner, tmp_path, CELLS.get(cell) or MORE_CELLS[cell])


@pytest.mark.parametrize(("at", "noval"), [(8, False), (6, False), (12, True), (3, True)],
                         ids=["mid-epoch", "last-batch-before-validation", "last-batch-no-validation",
                              "mid-accumulation"])
def test_resume_after_preemption_is_bit_identical(runner: Runner, tmp_path: Path, at: int, noval: bool) -> None:
    config = {"epochs": EPOCHS, "trigger": "preempt", "interval": "step", "noval": noval,
              "accumulate": 2 if at == 3 else 1}
    assert runner({**config, "dirpath": str(tmp_path / "full"), "out": str(tmp_path / "full.pt")}) == 0
    cut = {**config, "dirpath": str(tmp_path / "cut"), "out": str(tmp_path / "cut.pt")}
    assert runner({**cut, "preempt_at": at}) == 75
    assert runner({**cut, "ckpt_path": str(tmp_path / "cut" / "preempted.ckpt")}) == 0
    assert_identical(load(tmp_path / "full.pt"), load(tmp_path / "cut.pt"), f"preempted.ckpt (step {at})")


def ddp_cell(tmp: Path, config: dict[str, Any]) -> None:
    config = {"epochs": EPOCHS, "loader": "distributed", **config}
    log = launch({**config, "dirpath": str(tmp / "full"), "out": str(tmp / "full.pt")})
    assert "set_vital" not in log  # also where Lightning rebuilds the loader with a DistributedSampler
    full = load(tmp / "full.pt")
    assert full["step"] == EPOCHS * STEPS_PER_EPOCH // 2  # each of 2 ranks sees half of every epoch
    (name,) = resume_points(tmp / "full", full["step"], most=1)
    out = tmp / f"{name}.pt"
    launch({**config, "dirpath": str(tmp / "resumed"), "out": str(out), "ckpt_path": str(tmp / "full" / name)})
    assert_identical(full, load(out), name)


@pytest.mark.slow  # two processes per run, about a minute on 2 cores
@pytest.mark.parametrize("config", [{"trigger": "epoch"}, {"trigger": "steps", "every": 4}], ids=["epoch", "steps"])
def test_ddp_with_a_distributed_sampler_resumes_bit_identically(tmp_path: Path, config: dict[str, Any]) -> None:
    ddp_cell(tmp_path, config)


# -- what cannot be exact says so -----------------------------------------------------------------

def _fit(tmp: Path, loader: Any, exact_resume: bool = True, **cb: Any) -> list[warnings.WarningMessage]:
    from helpers import TinyModel, trainer

    from lightning_ckpt import CheckpointCallback

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = CheckpointCallback(dirpath=str(tmp), save_top_k=-1, exact_resume=exact_resume, **cb)
        trainer([callback], max_epochs=2).fit(TinyModel(), loader)
    return caught


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(4):
            x = torch.randn(8, 4)
            yield x, x.sum(1, keepdim=True)


def _not_exact(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "cannot restore their position" in str(w.message)]


def test_a_mid_epoch_save_of_an_iterable_without_state_warns_once(tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(Stream(), batch_size=None)
    (message,) = _not_exact(_fit(tmp_path, loader, every_n_train_steps=1))  # 8 saves, 6 mid-epoch
    assert "['DataLoader']" in message and "will not be bit-identical" in message


def test_epoch_end_saves_of_an_iterable_without_state_are_exact_and_say_nothing(tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(Stream(), batch_size=None)
    assert _not_exact(_fit(tmp_path, loader)) == []
    assert _not_exact(_fit(tmp_path / "off", loader, exact_resume=False, every_n_train_steps=1)) == []


def test_a_mid_epoch_save_of_a_stateful_loader_without_length_warns_once(tmp_path: Path) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    caught = _fit(tmp_path, StatefulDataLoader(Stream(), batch_size=None), every_n_train_steps=1)
    (message,) = [str(w.message) for w in caught if "one batch ahead" in str(w.message)]
    assert "['StatefulDataLoader']" in message
    assert not [w for w in _fit(tmp_path / "e", StatefulDataLoader(Stream(), batch_size=None))
                if "one batch ahead" in str(w.message)]


def test_an_epoch_end_save_with_persistent_workers_warns_once(tmp_path: Path) -> None:
    x = torch.randn(32, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=1, persistent_workers=True)
    (message,) = [str(w.message) for w in _fit(tmp_path, loader) if "persistent worker" in str(w.message)]
    assert "persistent_workers=False makes every checkpoint exact" in message
    mid_epoch = _fit(tmp_path / "mid", loader, every_n_train_steps=3)  # steps 3 and 6: mid-epoch only
    assert not [w for w in mid_epoch if "persistent worker" in str(w.message)]


def test_exact_resume_adds_no_warning_of_its_own(tmp_path: Path) -> None:
    """torchdata's "'set_vital' is deprecated" (or anything else) must not come with exact_resume=True."""
    x = torch.randn(32, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, num_workers=workers)
        on = {str(w.message) for w in _fit(tmp_path / f"on{workers}", loader, every_n_train_steps=3)}
        off = {str(w.message) for w in _fit(tmp_path / f"off{workers}", loader, exact_resume=False,
                                              every_n_train_steps=3)}
        assert not any("set_vital" in m for m in on)
        assert on <= off, on - off


def test_a_loader_generator_the_resumed_run_lacks_warns(tmp_path: Path) -> None:
    from helpers import TinyModel, trainer

    from lightning_ckpt import CheckpointCallback, CheckpointWarning

    x = torch.randn(32, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    shuffled = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator())
    trainer([CheckpointCallback(dirpath=str(tmp_path))], max_epochs=1).fit(TinyModel(), shuffled)
    plain = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    with pytest.warns(CheckpointWarning, match="holds 1 train loader generator"):
        trainer([CheckpointCallback(dirpath=str(tmp_path))], max_epochs=2).fit(TinyModel(), plain, ckpt_path="last")


def test_resuming_a_checkpoint_without_random_streams_says_it_is_not_exact(tmp_path: Path) -> None:
    from helpers import TinyModel, data, fit, trainer

    from lightning_ckpt import CheckpointCallback, CheckpointWarning

    fit(CheckpointCallback(dirpath=str(tmp_path), exact_resume=False), max_epochs=1)
    train, val = data()
    with pytest.warns(CheckpointWarning, match="holds no random streams"):
        trainer([CheckpointCallback(dirpath=str(tmp_path))], max_epochs=2).fit(TinyModel(), train, val,
                                                                              ckpt_path="last")
