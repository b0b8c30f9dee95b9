"""Save-interval arithmetic: saves, overhead, Young/Daly, budgets, and duration parsing."""

from __future__ import annotations

import math

import pytest

from lightning_ckpt.planning import (
    expected_lost_work,
    format_duration,
    interval_for_budget,
    number_of_saves,
    overhead_percent,
    parse_duration,
    plan,
    young_daly_interval,
)


def test_seed_example_seven_days_every_30_minutes() -> None:
    """7 days, a 20 s save every 30 min: 336 saves, 1.87 h saving, about 1.1 % overhead."""
    assert number_of_saves(7 * 24, 0.5) == 336
    assert overhead_percent(7 * 24, 0.5, 20) == pytest.approx(1.111, abs=1e-3)
    p = plan(7 * 86400, 1800, 20)
    assert p.saves == 336
    assert p.saving_seconds == 336 * 20
    assert p.saving_seconds / 3600 == pytest.approx(1.87, abs=0.005)
    assert p.overhead_percent == pytest.approx(1.11, abs=0.005)
    assert p.rework_percent is None and p.waste_percent == p.overhead_percent


def test_young_daly_interval() -> None:
    """C = 20 s, MTBF = 24 h: sqrt(2 * 20 * 86400) = 1859 s, about 31 minutes."""
    interval = young_daly_interval(20, 24 * 3600)
    assert interval == pytest.approx(math.sqrt(2 * 20 * 86400))
    assert interval == pytest.approx(1859, abs=0.5)
    assert interval / 60 == pytest.approx(31, abs=0.1)


def test_young_daly_balances_saving_and_rework() -> None:
    """At the optimum, time saving and expected rework are equal and their sum is smallest."""
    mtbf, save, train = 86400.0, 20.0, 7 * 86400.0
    best = young_daly_interval(save, mtbf)
    at_best = plan(train, best, save, mtbf)
    assert at_best.overhead_percent == pytest.approx(at_best.rework_percent, rel=0.01)
    for other in (best / 2, best * 2):
        assert plan(train, other, save, mtbf).waste_percent > at_best.waste_percent


def test_expected_lost_work_is_half_an_interval_per_failure() -> None:
    # 7 failures in 7 days, 15 minutes lost each
    assert expected_lost_work(1800, 86400, 7 * 86400) == pytest.approx(7 * 900)


def test_interval_for_budget() -> None:
    assert interval_for_budget(20, 1) == pytest.approx(2000)
    assert interval_for_budget(20, 1.11) == pytest.approx(1801.8, abs=0.1)
    # the interval it gives indeed stays within the budget
    assert overhead_percent(1000, interval_for_budget(20, 2) / 3600, 20) <= 2 + 1e-9


def test_number_of_saves_is_not_fooled_by_binary_fractions() -> None:
    assert number_of_saves(1, 1 / 3) == 3
    assert number_of_saves(1, 2) == 0
    assert overhead_percent(1, 2, 20) == 0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800), ("2h", 7200), ("90s", 90), ("1.5h", 5400), ("45", 45), ("1h30m", 5400), ("7d", 604800),
     (" 2 H ", 7200), ("10min", 600), (".5h", 1800), (12, 12), (0.5, 0.5)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_default_unit() -> None:
    assert parse_duration("168", default_unit="h") == 168 * 3600
    assert parse_duration("7d", default_unit="h") == 7 * 86400


@pytest.mark.parametrize(
    ("text", "message"),
    [("0", "positive"), ("0m", "positive"), ("-5m", "positive"), ("-3", "positive"), ("abc", "cannot parse"),
     ("", "cannot parse"), ("1h30", "cannot parse"), ("inf", "cannot parse"), ("5 parsecs", "unknown unit"),
     (-1, "positive"), (0, "positive"), (math.nan, "positive"), (math.inf, "positive")],
)  # fmt: skip
def test_parse_duration_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: overhead_percent(0, 0.5, 20), "train_hours"),
        (lambda: overhead_percent(168, -1, 20), "interval_hours"),
        (lambda: overhead_percent(168, 0.5, 0), "save_seconds"),
        (lambda: young_daly_interval(20, 0), "mtbf_seconds"),
        (lambda: young_daly_interval(-20, 86400), "save_seconds"),
        (lambda: young_daly_interval("twenty", 86400), "save_seconds must be a number"),
        (lambda: interval_for_budget(20, 0), "budget_percent"),
        (lambda: interval_for_budget(20, 100), "below 100"),
        (lambda: expected_lost_work(1800, 86400, 0), "train_seconds"),
        (lambda: plan(7 * 86400, 1800, 20, mtbf_seconds=-1), "mtbf_seconds"),
    ],
)
def test_functions_reject_bad_input(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_format_duration() -> None:
    assert format_duration(20) == "20 s"
    assert format_duration(1859) == "31.0 min"
    assert format_duration(6720) == "1.87 h"
    assert format_duration(7 * 86400) == "7.0 d"
