"""Transfer progress: the callback's byte counts on every backend, and a bar only on a terminal."""

from __future__ import annotations

import io

import torch
from backends import backend  # noqa: F401

from lightning_ckpt import CheckpointManager, load_checkpoint
from lightning_ckpt.progress import TransferProgress

MiB = 2**20


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []

    def __call__(self, done: int, total: int | None) -> None:
        self.calls.append((done, total))

    def check(self, size: int) -> None:
        done = [d for d, _ in self.calls]
        assert len(self.calls) >= 2, self.calls  # block by block, not once at the end
        assert done == sorted(done) and done[0] > 0, done  # monotonically increasing
        assert self.calls[-1] == (size, size)  # ending at the file size, total known by then


def test_save_and_load_report_progress_up_to_the_file_size(backend) -> None:  # noqa: F811
    url, options = backend
    manager = CheckpointManager(url, options)
    state = {f"w{i}": torch.randn(2 * MiB // 4) for i in range(20)}  # 40 MiB: several blocks and parts
    saving = Recorder()
    size = manager.save(state, "a.ckpt", progress=saving).manifest.size
    saving.check(size)
    assert all(total is None for _, total in saving.calls[:-1])  # a streamed save knows its size at the end
    loading = Recorder()
    loaded = manager.load("a.ckpt", progress=loading)
    loading.check(size)
    assert all(total == size for _, total in loading.calls)
    assert torch.equal(loaded["w3"], state["w3"])
    again = Recorder()
    load_checkpoint(f"{url}/a.ckpt", options, progress=again)
    again.check(size)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    with TransferProgress("saving", stream=out, min_bytes=0, min_seconds=0) as bar:
        for done in range(0, 1024 * MiB, 64 * MiB):
            bar(done, 1024 * MiB)
        assert not bar.showing
    assert out.getvalue() == ""


def test_silent_for_small_quick_transfers_on_a_terminal() -> None:
    out, clock = FakeTTY(), Clock()
    bar = TransferProgress("saving", stream=out, clock=clock)
    for done in range(0, 32 * MiB, 8 * MiB):
        clock.now += 0.1
        bar(done, None)
    assert not bar.showing and out.getvalue() == ""
    bar.close()


def test_a_bar_for_large_or_slow_transfers_on_a_terminal() -> None:
    out = FakeTTY()
    bar = TransferProgress("loading a.ckpt", stream=out)
    bar(8 * MiB, 256 * MiB)  # large: known from the total
    assert bar.showing
    bar(256 * MiB, 256 * MiB)  # done: the bar closes itself
    assert not bar.showing
    assert "loading a.ckpt" in out.getvalue()

    out, clock = FakeTTY(), Clock()
    slow = TransferProgress("saving", stream=out, clock=clock)
    slow(1 * MiB, None)
    clock.now = 2.5  # small, but running for longer than min_seconds
    slow(2 * MiB, None)
    assert slow.showing
    slow.close()
    assert "saving" in out.getvalue()


# -- wiring: the manager, the callback and the command line draw bars by themselves ---------------


class Made:
    """A transfer_progress factory that records what it made and whether each was closed."""

    def __init__(self) -> None:
        self.made: list[tuple[str, str, Recorder]] = []
        self.closed: list[str] = []

    def __call__(self, verb: str, name: str) -> Recorder:
        recorder = Recorder()
        recorder.close = lambda: self.closed.append(f"{verb} {name}")  # type: ignore[attr-defined]
        self.made.append((verb, name, recorder))
        return recorder


def test_the_manager_makes_and_closes_a_progress_for_every_transfer(tmp_path) -> None:
    manager = CheckpointManager(str(tmp_path))
    manager.transfer_progress = factory = Made()
    size = manager.save({"w": torch.randn(4 * MiB)}, "a.ckpt").manifest.size
    manager.verify("a.ckpt")
    manager.load("a.ckpt")
    assert [(verb, name) for verb, name, _ in factory.made] == [
        ("saving", "a.ckpt"), ("verifying", "a.ckpt"), ("loading", "a.ckpt")
    ]
    assert factory.closed == ["saving a.ckpt", "verifying a.ckpt", "loading a.ckpt"]
    assert factory.made[0][2].calls[-1][0] == size
    factory.made[1][2].check(size)
    explicit = Recorder()
    manager.load("a.ckpt", progress=explicit)  # an explicit progress wins
    assert len(factory.made) == 3 and explicit.calls


def test_the_callback_draws_on_rank_zero_and_only_from_the_main_thread(tmp_path) -> None:
    import threading

    from helpers import fit

    from lightning_ckpt import CheckpointCallback
    from lightning_ckpt.callback import _terminal_bar

    cb = CheckpointCallback(dirpath=str(tmp_path))
    trainer, _ = fit(cb, max_epochs=1)
    assert trainer.strategy.checkpoint_io.transfer_progress is _terminal_bar
    assert cb.manager.transfer_progress is _terminal_bar
    assert isinstance(_terminal_bar("saving", "a.ckpt"), TransferProgress)
    off_main: list[object] = []
    worker = threading.Thread(target=lambda: off_main.append(_terminal_bar("saving", "a.ckpt")))
    worker.start()
    worker.join()
    assert off_main == [None]  # a background save never draws over Lightning's bar


def test_the_command_line_shows_a_bar_for_a_large_download_on_a_terminal(tmp_path, monkeypatch) -> None:
    from lightning_ckpt.cli import main

    manager = CheckpointManager(str(tmp_path))
    manager.save({"w": torch.randn(17 * MiB)}, "big.ckpt")  # 68 MiB: above the bar's 64 MiB
    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    assert main(["verify", str(tmp_path)]) == 0
    assert "verifying big.ckpt" in tty.getvalue()
    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    assert main(["verify", str(tmp_path)]) == 0
    assert "verifying" not in quiet.getvalue()
