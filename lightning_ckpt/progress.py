"""Progress of long checkpoint transfers: a bar on a terminal, silence everywhere else.

Saving and loading take an optional ``progress(bytes_done, bytes_total)`` callback (``total`` is
``None`` while a save streams: its size is known only at the end), called once per block of a few
MiB. :class:`TransferProgress` is such a callback that draws a bar on standard error, but only
when standard error is a terminal and the transfer is worth watching: larger than ``min_bytes``
(64 MiB) or still running after ``min_seconds`` (2 s). In a batch job, a notebook's captured
stream, CI or a redirected log it prints nothing. It draws with ``rich`` (which Lightning's
``RichProgressBar`` uses) and falls back to ``tqdm``, then to nothing.

Owns: drawing. Must not: change what is transferred or fail a transfer.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any

__all__ = ["TransferProgress", "terminal_bar"]

MiB = 2**20


class TransferProgress:
    """A ``progress(done, total)`` callback that shows a bar for large transfers on a terminal.

    Args:
        description: the bar's label, e.g. ``"saving epoch=3.ckpt"``.
        stream: where to draw (default: ``sys.stderr`` at construction); never drawn on unless
            ``stream.isatty()``.
        min_bytes: show the bar once the transfer is known to be at least this large.
        min_seconds: ...or once it has been running this long.
        clock: a monotonic clock in seconds (for tests).

    Use as a context manager, or call :meth:`close` when done; a transfer that reports
    ``done == total`` closes the bar itself.
    """

    def __init__(
        self,
        description: str = "checkpoint",
        *,
        stream: IO[str] | None = None,
        min_bytes: int = 64 * MiB,
        min_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.min_bytes = min_bytes
        self.min_seconds = min_seconds
        self._clock = clock
        self._started: float | None = None
        self._bar: _Bar | None = None
        self._closed = False
        self.enabled = _is_tty(self.stream)

    @property
    def showing(self) -> bool:
        """Whether a bar is on screen."""
        return self._bar is not None

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled or self._closed:
            return
        now = self._clock()
        if self._started is None:
            self._started = now
        if self._bar is None:
            large = max(done, total or 0) >= self.min_bytes
            slow = now - self._started >= self.min_seconds
            if not (large or slow):
                return
            self._bar = _make_bar(self.description, self.stream)
            if self._bar is None:  # neither rich nor tqdm: stay silent
                self.enabled = False
                return
        self._bar.update(done, total)
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        """Remove the bar (if any); later calls are ignored."""
        self._closed = True
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    def __enter__(self) -> TransferProgress:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed, detached or not a file
        return False


class _Bar:
    def update(self, done: int, total: int | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _RichBar(_Bar):
    def __init__(self, description: str, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=stream, force_terminal=True),
        )
        self._task = self._progress.add_task(description, total=None)
        self._progress.start()

    def update(self, done: int, total: int | None) -> None:
        self._progress.update(self._task, completed=done, total=total)

    def close(self) -> None:
        self._progress.stop()


class _TqdmBar(_Bar):
    def __init__(self, description: str, stream: IO[str]) -> None:
        from tqdm import tqdm

        self._bar = tqdm(desc=description, total=None, unit="B", unit_scale=True, unit_divisor=1024, file=stream)

    def update(self, done: int, total: int | None) -> None:
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def _make_bar(description: str, stream: IO[str]) -> _Bar | None:
    for kind in (_RichBar, _TqdmBar):
        try:
            return kind(description, stream)
        except ImportError:
            continue
    return None


def terminal_bar(verb: str, name: str) -> TransferProgress | None:
    """A progress bar for a long transfer on rank 0's terminal, drawn between Lightning's updates.

    Only on the main thread: a background save drawing over Lightning's own bar would garble both.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return TransferProgress(f"lightning-ckpt: {verb} {name}")
