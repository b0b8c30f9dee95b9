"""When to save and what to keep, as small pure policy objects.

Save triggers answer "is a save due now?" from (epoch, step, time) alone; retention policies
answer "which of these committed checkpoints stay?" from their manifests alone. Neither touches
storage or Lightning, so each is a few lines to unit-test. The callback builds them from
ModelCheckpoint's familiar keyword arguments; advanced users may pass their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lightning_ckpt.errors import ConfigurationError
from lightning_ckpt.integrity import Manifest

__all__ = [
    "AnyOf",
    "EveryInterval",
    "EveryNEpochs",
    "EveryNSteps",
    "KeepAll",
    "KeepLatest",
    "KeepTopK",
    "RetentionPolicy",
    "SaveTrigger",
    "is_improvement",
]

MODES = ("min", "max")


class SaveTrigger(Protocol):
    """Decides whether a save is due at a training-batch end or a training-epoch end."""

    def due_on_step(self, step: int, now: float, last_save_time: float) -> bool: ...

    def due_on_epoch(self, epoch: int) -> bool: ...


@dataclass(frozen=True)
class EveryNSteps:
    """Due every ``n`` optimizer steps (Lightning's ``every_n_train_steps``)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigurationError(f"every_n_train_steps={self.n} must be >= 1 (0 disables it)")

    def due_on_step(self, step: int, now: float, last_save_time: float) -> bool:
        return step > 0 and step % self.n == 0

    def due_on_epoch(self, epoch: int) -> bool:
        return False


@dataclass(frozen=True)
class EveryInterval:
    """Due when ``seconds`` of wall time passed since the last save (``train_time_interval``)."""

    seconds: float

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ConfigurationError(f"train_time_interval must be positive, got {self.seconds} s")

    def due_on_step(self, step: int, now: float, last_save_time: float) -> bool:
        return now - last_save_time >= self.seconds

    def due_on_epoch(self, epoch: int) -> bool:
        return False


@dataclass(frozen=True)
class EveryNEpochs:
    """Due at the end of every ``n``-th epoch (``every_n_epochs``; epochs count from 0)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigurationError(f"every_n_epochs={self.n} must be >= 1 (0 disables it)")

    def due_on_step(self, step: int, now: float, last_save_time: float) -> bool:
        return False

    def due_on_epoch(self, epoch: int) -> bool:
        return (epoch + 1) % self.n == 0


@dataclass(frozen=True)
class AnyOf:
    """Due when any of ``triggers`` is due."""

    triggers: tuple[SaveTrigger, ...]

    def due_on_step(self, step: int, now: float, last_save_time: float) -> bool:
        return any(t.due_on_step(step, now, last_save_time) for t in self.triggers)

    def due_on_epoch(self, epoch: int) -> bool:
        return any(t.due_on_epoch(epoch) for t in self.triggers)


def is_improvement(current: float, reference: float | None, mode: str) -> bool:
    """Strictly better than ``reference`` (NaN is never better; no reference always is)."""
    if math.isnan(current):
        return False
    if reference is None:
        return True
    return current < reference if mode == "min" else current > reference


def _sort_key(mode: str):
    def key(m: Manifest) -> tuple[float, float, float]:
        score = m.score
        if score is None:
            score = math.inf if mode == "min" else -math.inf
        # best first; among equal scores the newer one ranks first
        primary = score if mode == "min" else -score
        return (primary, -(m.global_step or 0), -m.created)

    return key


class RetentionPolicy(Protocol):
    """Chooses which committed checkpoints to keep; everything else may be deleted."""

    def keep(self, checkpoints: Sequence[Manifest]) -> set[str]: ...


@dataclass(frozen=True)
class KeepAll:
    """Keep everything (``save_top_k=-1``)."""

    def keep(self, checkpoints: Sequence[Manifest]) -> set[str]:
        return {m.name for m in checkpoints}


@dataclass(frozen=True)
class KeepLatest:
    """Keep the ``n`` newest checkpoints by (global step, creation time)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ConfigurationError(f"KeepLatest(n={self.n}) must not be negative")

    def keep(self, checkpoints: Sequence[Manifest]) -> set[str]:
        newest = sorted(checkpoints, key=lambda m: (m.global_step or 0, m.created), reverse=True)
        return {m.name for m in newest[: self.n]}


@dataclass(frozen=True)
class KeepTopK:
    """Keep the ``k`` best checkpoints by ``monitor`` under ``mode`` (``save_top_k=k``)."""

    k: int
    monitor: str
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigurationError(f"KeepTopK(k={self.k}) must not be negative")
        if self.mode not in MODES:
            raise ConfigurationError(f"mode={self.mode!r} must be one of {MODES}")

    def ranked(self, checkpoints: Iterable[Manifest]) -> list[Manifest]:
        """Checkpoints that carry the monitored value, best first."""
        scored = [m for m in checkpoints if m.monitor == self.monitor and m.score is not None]
        return sorted(scored, key=_sort_key(self.mode))

    def keep(self, checkpoints: Sequence[Manifest]) -> set[str]:
        return {m.name for m in self.ranked(checkpoints)[: self.k]}

    def admits(self, score: float, checkpoints: Sequence[Manifest]) -> bool:
        """Whether a new checkpoint scoring ``score`` would enter the top k."""
        if self.k == 0 or math.isnan(score):
            return False
        ranked = self.ranked(checkpoints)
        if len(ranked) < self.k:
            return True
        kth = ranked[self.k - 1].score
        return is_improvement(score, kth, self.mode)
