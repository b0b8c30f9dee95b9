"""The few collectives this package needs across processes, over ``torch.distributed``.

Everything here is a no-op (or the trivial answer) in a single process, so code above it reads
the same with and without a process group. Lightning is not imported: the sharded checkpointer
and the RNG capture use these; the callback talks to Lightning's strategy for everything else.

Owns: the package's own process groups (decision, background). Must not: decide anything, or
import Lightning.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = [
    "active",
    "all_gather",
    "background_group",
    "barrier",
    "broadcast",
    "decision_group",
    "rank",
    "release_background_group",
    "world_size",
]

_background: tuple[Any, Any] | None = None  # (the world group it belongs to, the group)


def active() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (of ``group``, default all)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def decision_group(timeout: timedelta) -> Any:
    """A new CPU (gloo) group of every rank whose collectives give up after ``timeout``.

    For the exchanges that guard a decision every rank must share: a rank that never arrives makes
    the others fail with gloo's timeout error (a ``RuntimeError``) instead of waiting for the
    training group's own timeout (30 minutes in Lightning). Creating it is a collective: every
    rank must ask at the same point. ``None`` in one process.
    """
    if not active():
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait until every rank got here."""
    if active():
        dist.barrier()


def background_group() -> Any:
    """A CPU (gloo) group of every rank for collectives run from background threads.

    Background collectives must not share the training's group (their order would interleave
    with the training's all-reduces). Created on first use -- a collective itself, so every rank
    must ask at the same point -- and again for a new process group. ``None`` in one process.
    """
    global _background
    if not active():
        return None
    world = dist.group.WORLD
    if _background is None or _background[0] is not world:
        _background = (world, dist.new_group(backend="gloo"))
    return _background[1]


def release_background_group(timeout: float = 30.0) -> None:
    """Destroy the background group once every rank is done with it.

    A rank that closed its connections while another still finished DCP's last background
    collective could break that one mid-way, so the ranks first meet in a barrier on the group
    itself -- bounded by ``timeout`` (a rank that crashed never comes), then destroyed regardless.
    """
    global _background
    if _background is None:
        return
    world, group = _background
    _background = None
    if not (dist.is_available() and dist.is_initialized() and dist.group.WORLD is world):
        return
    with contextlib.suppress(Exception):
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout), wait_all_ranks=True)
    dist.destroy_process_group(group)
