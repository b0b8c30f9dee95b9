"""When to save and what to keep, as small pure policy objects.

Save triggers answer "is a save due now?" from (epoch, step, time) alone; retention policies
answer "which of these committed checkpoints stay?" from their manifests alone. Neither touches
storage or Lightning, so each is a few lines to unit-test. The callback builds them from
ModelCheckpoint's familiar keyword arguments; advanced users may pass their own. The one trigger
with a memory is :class:`OverheadBudget`: it is told what each save cost and derives the next
interval from it (the arithmetic of :func:`lightning_ckpt.planning.interval_for_budget`).
:class:`KeepUnion` is retention as both the callback and ``lightning-ckpt prune`` apply it: per
owner, the newest always kept; :class:`KeepBestBy` ranks by any logged metric.

This module is the one owner of "newest" (:func:`recency`, :func:`newest`), "best"
(:func:`best_of`, :func:`best_names`) and of the retention decision (:func:`doomed`), which the
manager's ``prune``, the callback and the CLI apply. It must not touch storage (deleting is the
manager's job), Lightning or torch.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from lightning_ckpt.errors import ConfigurationError
from lightning_ckpt.integrity import Manifest
from lightning_ckpt.planning import interval_for_budget

__all__ = [
    "AnyOf",
    "EveryInterval",
    "EveryNEpochs",
    "EveryNSteps",
    "KeepAll",
    "KeepBestBy",
    "KeepLatest",
    "KeepTopK",
    "KeepUnion",
    "OverheadBudget",
    "RetentionPolicy",
    "SaveTrigger",
    "best_names",
    "best_of",
    "doomed",
    "is_improvement",
    "is_last_copy",
    "newest",
    "rank_value",
    "recency",
    "recorded_mode",
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
        if not self.seconds >= 0:  # zero is valid, as in Lightning: a save at every step
            raise ConfigurationError(f"train_time_interval must not be negative, got {self.seconds} s")

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


class OverheadBudget:
    """Due when the training time since the last save reaches ``save cost / budget``.

    A save that blocks training for ``C`` seconds, started every ``C / budget`` seconds, costs
    ``budget`` of the wall time (``lightning-ckpt plan --budget`` prints the same number). The
    callback reports the blocking cost of every save with :meth:`record`; the interval after a
    save is derived from that save's cost, so it follows storage that gets slower or faster.

    Args:
        budget: the fraction of training time saving may take, ``0 < budget < 1`` (``0.01`` = 1 %).
        min_interval: never save more often than this (seconds), however cheap a save is: a tiny
            model on a fast disk would otherwise save every few steps.
        warmup: before the first save has been measured, save once this many seconds of training
            passed or at the first epoch end, whichever comes first.
        clock: seconds as a monotonic float; the callback reads it both to time saves and to
            decide when one is due (tests inject a fake one).
    """

    def __init__(
        self,
        budget: float,
        min_interval: float = 60.0,
        warmup: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
            raise ConfigurationError(
                f"overhead_budget={budget!r} must be a fraction between 0 and 1 (0.01 is 1 % of the training time)"
            )
        for name, value in (("min_interval", min_interval), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigurationError(f"OverheadBudget({name}={value!r}) must be a finite number of seconds >= 0")
        if not callable(clock):
            raise ConfigurationError("OverheadBudget(clock=...) must be a callable returning seconds")
        self.budget = float(budget)
        self.min_interval = float(min_interval)
        self.warmup = float(warmup)
        self.clock = clock
        #: the blocking cost of the last save event (seconds); None until one was measured
        self.save_seconds: float | None = None
        self._step: int | None = None

    def __repr__(self) -> str:
        return (f"OverheadBudget(budget={self.budget!r}, min_interval={self.min_interval!r}, "
                f"warmup={self.warmup!r}, save_seconds={self.save_seconds!r})")

    def record(self, seconds: float, step: int | None = None) -> None:
        """Report that a save blocked training for ``seconds``.

        Saves reported for the same ``step`` (a top-k checkpoint and ``last.ckpt``) add up: the
        training paid for both before it went on.
        """
        seconds = max(0.0, float(seconds))
        if step is not None and step == self._step and self.save_seconds is not None:
            seconds += self.save_seconds
        self.save_seconds, self._step = seconds, step

    @property
    def interval(self) -> float:
        """Seconds from one save's start to the next: ``save_seconds / budget``, at least ``min_interval``."""
        if self.save_seconds is None:
            return self.warmup
        if self.save_seconds <= 0:
            return self.min_interval
        return max(self.min_interval, interval_for_budget(self.save_seconds, 100.0 * self.budget))

    def due_on_step(self, step: int, now: float, last_save_time: float) -> bool:
        return now - last_save_time >= self.interval

    def due_on_epoch(self, epoch: int) -> bool:
        # the first save is what tells the cost; afterwards only the measured interval counts
        return self.save_seconds is None


@dataclass(frozen=True)
class AnyOf:
    """Due when any of ``triggers`` is due."""

    triggers: tuple[SaveTrigger, ...]

    def due_on_step(self, step: int, now: float, last_save_time: float) -> bool:
        return any(t.due_on_step(step, now, last_save_time) for t in self.triggers)

    def due_on_epoch(self, epoch: int) -> bool:
        return any(t.due_on_epoch(epoch) for t in self.triggers)


def recency(m: Manifest) -> tuple[int, float]:
    """How new ``m`` is: its global step, then its creation time. The one meaning of "newer" in
    this package (retention, :meth:`CheckpointManager.latest`, the order of a listing)."""
    return (m.global_step or 0, m.created)


def newest(checkpoints: Iterable[Manifest]) -> Manifest | None:
    """The newest of ``checkpoints`` by :func:`recency` (None for none)."""
    return max(checkpoints, key=recency, default=None)


def is_improvement(current: float, reference: float | None, mode: str) -> bool:
    """Strictly better than ``reference`` (NaN is never better; no reference always is)."""
    if math.isnan(current):
        return False
    if reference is None:
        return True
    return current < reference if mode == "min" else current > reference


def rank_value(value: float | None, mode: str) -> float:
    """The value a checkpoint is ranked by: NaN (or nothing) counts as the worst, ``inf`` / ``-inf``.

    Lightning's ModelCheckpoint does the same ("do not save nan, replace with +/- inf"), so a NaN
    checkpoint can enter a top-k that is not full yet and is the first to go.
    """
    if value is None or math.isnan(value):
        return math.inf if mode == "min" else -math.inf
    return float(value)


def _sort_key(mode: str, monitor: str | None = None):
    def key(m: Manifest) -> tuple[float, float, float]:
        score = rank_value(m.metrics.get(monitor) if monitor is not None else m.score, mode)
        # best first; among equal scores the newer one ranks first, so that retention drops the
        # older of two equal k-th checkpoints -- as Lightning, whose k-th is the first one inserted
        primary = score if mode == "min" else -score
        return (primary, -(m.global_step or 0), -m.created)

    return key


def is_last_copy(m: Manifest) -> bool:
    """Whether ``m`` is a ``last.ckpt`` (a copy of the newest state, not a ranked checkpoint)."""
    return m.name == "last.ckpt" or (m.owner or "").endswith("/last")


def best_of(ranked: Sequence[Manifest], monitor: str, mode: str) -> list[Manifest]:
    """``ranked`` (best first) reordered so that ties for the best put the one to report first.

    Among checkpoints with the best value, Lightning's ``best_model_path`` is the first one saved;
    a ``last.ckpt`` copy never wins over the checkpoint it copies (or any other with that value).
    """
    if not ranked:
        return []
    top = rank_value(ranked[0].metrics.get(monitor), mode)
    tied = [m for m in ranked if rank_value(m.metrics.get(monitor), mode) == top]
    first = sorted(tied, key=lambda m: (is_last_copy(m), m.global_step or 0, m.created))
    return first + [m for m in ranked if m not in tied]


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
        return {m.name for m in sorted(checkpoints, key=recency, reverse=True)[: self.n]}


@dataclass(frozen=True)
class _KeepK:
    """The ``k`` first of ``ranked(checkpoints)`` (best first) by ``monitor`` under ``mode``."""

    k: int
    monitor: str
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigurationError(f"{type(self).__name__}(k={self.k}) must not be negative")
        if self.mode not in MODES:
            raise ConfigurationError(f"mode={self.mode!r} must be one of {MODES}")

    def ranked(self, checkpoints: Iterable[Manifest]) -> list[Manifest]:
        raise NotImplementedError

    def keep(self, checkpoints: Sequence[Manifest]) -> set[str]:
        return {m.name for m in self.ranked(checkpoints)[: self.k]}


@dataclass(frozen=True)
class KeepTopK(_KeepK):
    """Keep the ``k`` best checkpoints by ``monitor`` under ``mode`` (``save_top_k=k``)."""

    def ranked(self, checkpoints: Iterable[Manifest]) -> list[Manifest]:
        """Checkpoints that carry the monitored value, best first (a NaN value ranks last)."""
        scored = [m for m in checkpoints if m.monitor == self.monitor and self.monitor in m.metrics]
        return sorted(scored, key=_sort_key(self.mode, self.monitor))

    def admits(self, score: float, checkpoints: Sequence[Manifest]) -> bool:
        """Whether a new checkpoint scoring ``score`` would enter the top k (as Lightning decides).

        While fewer than k are kept anything enters, NaN too (ranked as the worst); then only a
        value strictly better than the k-th does.
        """
        if self.k == 0:
            return False
        ranked = self.ranked(checkpoints)
        if len(ranked) < self.k:
            return True
        if math.isnan(score):
            return False
        kth = rank_value(ranked[self.k - 1].metrics.get(self.monitor), self.mode)
        return is_improvement(score, kth, self.mode)

def _ranked_by(checkpoints: Iterable[Manifest], monitor: str, mode: str) -> list[Manifest]:
    """``checkpoints`` that logged ``monitor``, best first, whatever monitor each one recorded."""
    as_monitored = [replace(m, monitor=monitor) for m in checkpoints]
    by_name = {m.name: m for m in checkpoints}
    return [by_name[m.name] for m in KeepTopK(1, monitor, mode).ranked(as_monitored)]


@dataclass(frozen=True)
class KeepBestBy(_KeepK):
    """:class:`KeepTopK` over a metric every manifest logged, whatever monitor it recorded."""

    def ranked(self, checkpoints: Iterable[Manifest]) -> list[Manifest]:
        """Checkpoints that logged ``monitor``, best first (ties: the newer first)."""
        return _ranked_by(list(checkpoints), self.monitor, self.mode)


@dataclass(frozen=True)
class KeepUnion:
    """Keep what any of ``policies`` keeps, plus the newest, within each owner's checkpoints.

    Judging each owner separately is what the callback does (it prunes with its own owner): its
    top-k and its ``last.ckpt`` are separate owners, so ``last.ckpt`` never takes the place of a
    top-k or a latest checkpoint, and each owner keeps its newest one as the manager guarantees.
    """

    policies: tuple[RetentionPolicy, ...]

    def keep(self, checkpoints: Sequence[Manifest]) -> set[str]:
        groups: dict[str | None, list[Manifest]] = defaultdict(list)
        for m in checkpoints:
            groups[m.owner].append(m)
        policies = (*self.policies, KeepLatest(1))
        return {name for group in groups.values() for p in policies for name in p.keep(group)}


def doomed(policy: RetentionPolicy, checkpoints: Sequence[Manifest],
           protect: Iterable[str] = frozenset()) -> list[str]:
    """The names retention removes from committed ``checkpoints``, in their order.

    The one retention decision: what ``policy`` keeps within each owner's checkpoints, each
    owner's newest one, and the names in ``protect`` (the one a run resumed from, saves still
    persisting) stay; everything else goes. :meth:`CheckpointManager.prune` (and so
    ``lightning-ckpt prune``) and the callback both apply it.
    """
    keep = KeepUnion((policy,)).keep(checkpoints) | set(protect)
    return [m.name for m in checkpoints if m.name not in keep]


def recorded_mode(checkpoints: Iterable[Manifest]) -> str | None:
    """The mode all ``checkpoints`` were ranked by (the callback records it), if they agree."""
    modes = {m.mode for m in checkpoints}
    return modes.pop() if len(modes) == 1 else None


def best_names(checkpoints: Sequence[Manifest], monitor: str | None, mode: str | None) -> set[str]:
    """Names of the best checkpoints (all ties): by ``monitor``, else per each one's own monitor,
    under ``mode`` (else the mode they recorded, else ``"min"``).

    A ``last.ckpt`` copy is not a second best: it counts only when its original is gone.
    """
    groups: dict[str, list[Manifest]] = defaultdict(list)
    for m in checkpoints:
        key = monitor or m.monitor
        if key is not None:
            groups[key].append(m)
    names: set[str] = set()
    for key, group in groups.items():
        ranked = KeepBestBy(1, key, mode or recorded_mode(group) or "min").ranked(group)
        if ranked:
            top = ranked[0].metrics[key]
            tied = [m for m in ranked if m.metrics[key] == top]
            originals = [m for m in tied if not is_last_copy(m)]
            names |= {m.name for m in (originals or tied)}
    return names
