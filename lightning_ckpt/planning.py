"""Checkpoint planning: how often to save, and what saving costs, as pure functions.

A save that takes ``C`` seconds every ``interval`` seconds costs ``C / interval`` of the training
time. Saving rarely is cheap until a failure: the work since the last save is lost, on average
half an interval per failure. Young's first-order model (J. W. Young, 1974; refined by J. T. Daly,
2006) puts the two together: with a mean time between failures ``MTBF`` the expected waste is
``C / interval + interval / (2 * MTBF)``, smallest at ``interval = sqrt(2 * C * MTBF)``, where both
terms are equal. Nothing here touches storage, torch or Lightning; ``lightning-ckpt plan`` prints
these numbers. It owns this arithmetic and duration parsing only; it must not decide when a
save is due (the triggers in :mod:`lightning_ckpt.policies` do, using it).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Plan",
    "expected_lost_work",
    "format_duration",
    "interval_for_budget",
    "number_of_saves",
    "overhead_percent",
    "parse_duration",
    "plan",
    "young_daly_interval",
]

_UNITS = {
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}  # fmt: skip
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"


def _positive(name: str, value: float) -> float:
    """``value`` as a float if it is a finite number > 0, else a ValueError naming ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive, finite number, got {value!r}")
    return number


def parse_duration(text: str | float, default_unit: str = "s") -> float:
    """Seconds in a duration such as ``"30m"``, ``"2h"``, ``"90s"``, ``"1.5h"``, ``"1h30m"``, ``"7d"``.

    A bare number is in ``default_unit`` (seconds unless told otherwise). Units: ``s``, ``m``
    (minutes), ``h``, ``d`` and their spelled-out forms. Zero, negative and unparsable durations
    raise :class:`ValueError` saying what was expected.
    """
    if default_unit not in _UNITS:
        raise ValueError(f"unknown duration unit {default_unit!r}; use one of s, m, h, d")
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return _positive("a duration", float(text) * _UNITS[default_unit])
    compact = re.sub(r"\s+", "", str(text).lower())
    if compact.startswith("-"):
        raise ValueError(f"a duration must be positive, got {text!r}")
    if re.fullmatch(_NUMBER, compact):
        total = float(compact) * _UNITS[default_unit]
    elif re.fullmatch(f"(?:{_NUMBER}[a-z]+)+", compact):
        total = 0.0
        for number, unit in re.findall(f"({_NUMBER})([a-z]+)", compact):
            if unit not in _UNITS:
                raise ValueError(f"unknown unit {unit!r} in duration {text!r}; use s, m, h or d (e.g. 30m, 1.5h)")
            total += float(number) * _UNITS[unit]
    else:
        raise ValueError(f"cannot parse duration {text!r}; expected e.g. 90s, 30m, 1.5h, 1h30m, 7d or 45")
    if total <= 0:
        raise ValueError(f"a duration must be positive, got {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """A short human form: ``"45 s"``, ``"31.0 min"``, ``"1.87 h"``, ``"7.0 d"`` (days from 48 h)."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.1f} d"


def number_of_saves(train_hours: float, interval_hours: float) -> int:
    """Saves made in ``train_hours`` with one every ``interval_hours`` (the first after one interval)."""
    train = _positive("train_hours", train_hours)
    interval = _positive("interval_hours", interval_hours)
    ratio = train / interval
    # 1 h / (1/3 h) is 2.9999999999999996 in binary; that is still 3 saves
    return math.floor(ratio + 1e-9 * max(1.0, ratio))


def overhead_percent(train_hours: float, interval_hours: float, save_seconds: float) -> float:
    """Time spent saving as a percentage of the training time.

    7 days with a 20 s save every 30 minutes: 336 saves, 6720 s = 1.87 h, 1.11 %.
    """
    save = _positive("save_seconds", save_seconds)
    saves = number_of_saves(train_hours, interval_hours)
    return 100.0 * saves * save / (float(train_hours) * 3600.0)


def young_daly_interval(save_seconds: float, mtbf_seconds: float) -> float:
    """The save interval (seconds) that minimises expected waste: ``sqrt(2 * C * MTBF)``.

    A 20 s save with one failure a day (86 400 s) is best made every 1859 s, about 31 minutes.
    """
    save = _positive("save_seconds", save_seconds)
    mtbf = _positive("mtbf_seconds", mtbf_seconds)
    return math.sqrt(2.0 * save * mtbf)


def expected_lost_work(interval_seconds: float, mtbf_seconds: float, train_seconds: float) -> float:
    """Seconds of training expected to be redone: ``train / MTBF`` failures, half an interval each."""
    interval = _positive("interval_seconds", interval_seconds)
    mtbf = _positive("mtbf_seconds", mtbf_seconds)
    train = _positive("train_seconds", train_seconds)
    return train / mtbf * interval / 2.0


def interval_for_budget(save_seconds: float, budget_percent: float) -> float:
    """The shortest interval (seconds) whose saving overhead stays within ``budget_percent``."""
    save = _positive("save_seconds", save_seconds)
    budget = _positive("budget_percent", budget_percent)
    if budget >= 100:
        raise ValueError(f"budget_percent must be below 100, got {budget_percent!r}")
    return save / (budget / 100.0)


@dataclass(frozen=True)
class Plan:
    """The cost of one saving schedule; the ``rework`` fields are set when an MTBF is known."""

    train_seconds: float
    interval_seconds: float
    save_seconds: float
    saves: int
    saving_seconds: float
    overhead_percent: float
    mtbf_seconds: float | None = None
    rework_seconds: float | None = None
    rework_percent: float | None = None

    @property
    def waste_percent(self) -> float:
        """Saving plus expected rework, as a percentage of the training time."""
        return self.overhead_percent + (self.rework_percent or 0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``waste_percent`` included."""
        return {**asdict(self), "waste_percent": self.waste_percent}


def plan(
    train_seconds: float,
    interval_seconds: float,
    save_seconds: float,
    mtbf_seconds: float | None = None,
) -> Plan:
    """What saving every ``interval_seconds`` costs over ``train_seconds`` of training."""
    train = _positive("train_seconds", train_seconds)
    interval = _positive("interval_seconds", interval_seconds)
    save = _positive("save_seconds", save_seconds)
    saves = number_of_saves(train / 3600.0, interval / 3600.0)
    rework = rework_percent = None
    if mtbf_seconds is not None:
        rework = expected_lost_work(interval, mtbf_seconds, train)
        rework_percent = 100.0 * rework / train
    return Plan(
        train_seconds=train,
        interval_seconds=interval,
        save_seconds=save,
        saves=saves,
        saving_seconds=saves * save,
        overhead_percent=overhead_percent(train / 3600.0, interval / 3600.0, save),
        mtbf_seconds=None if mtbf_seconds is None else float(mtbf_seconds),
        rework_seconds=rework,
        rework_percent=rework_percent,
    )
