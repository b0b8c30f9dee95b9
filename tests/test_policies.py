"""Save triggers and retention policies are pure functions of their inputs."""

import math
from dataclasses import replace

import pytest
from helpers import FakeClock

from lightning_ckpt.errors import ConfigurationError
from lightning_ckpt.integrity import Manifest
from lightning_ckpt.planning import interval_for_budget
from lightning_ckpt.policies import (
    AnyOf,
    EveryInterval,
    EveryNEpochs,
    EveryNSteps,
    KeepAll,
    KeepBestBy,
    KeepLatest,
    KeepTopK,
    KeepUnion,
    OverheadBudget,
    best_names,
    best_of,
    doomed,
    is_improvement,
    newest,
    recency,
    recorded_mode,
)


def m(name: str, step: int, loss: float | None = None, created: float = 0.0) -> Manifest:
    metrics = {} if loss is None else {"val_loss": loss}
    return Manifest(name=name, size=1, digest="0" * 64, global_step=step, metrics=metrics,
                    monitor="val_loss", created=created)


def test_every_n_steps() -> None:
    t = EveryNSteps(3)
    assert [s for s in range(10) if t.due_on_step(s, 0, 0)] == [3, 6, 9]
    assert not t.due_on_epoch(2)


def test_every_n_epochs_counts_from_zero() -> None:
    t = EveryNEpochs(2)
    assert [e for e in range(6) if t.due_on_epoch(e)] == [1, 3, 5]


def test_every_interval() -> None:
    t = EveryInterval(60)
    assert not t.due_on_step(1, now=159.0, last_save_time=100.0)
    assert t.due_on_step(1, now=160.0, last_save_time=100.0)


def test_overhead_budget_first_save_after_warmup_or_the_first_epoch_end() -> None:
    t = OverheadBudget(0.01, warmup=300)
    assert t.save_seconds is None and t.interval == 300
    assert not t.due_on_step(1, now=299.0, last_save_time=0.0)
    assert t.due_on_step(1, now=300.0, last_save_time=0.0)
    assert t.due_on_epoch(0)  # nothing measured yet: the first epoch end saves
    t.record(2.0)
    assert not t.due_on_epoch(0)  # from now on only the measured interval counts


def test_overhead_budget_interval_is_save_cost_over_budget() -> None:
    """A 20 s save within 1 % is made every 2000 s, as `lightning-ckpt plan --budget 1` says."""
    t = OverheadBudget(0.01, min_interval=0)
    t.record(20.0)
    assert t.interval == pytest.approx(2000.0) == pytest.approx(interval_for_budget(20.0, 1.0))
    assert not t.due_on_step(10, now=1999.0, last_save_time=0.0)
    assert t.due_on_step(10, now=2000.0, last_save_time=0.0)


def test_overhead_budget_follows_the_last_measured_cost() -> None:
    t = OverheadBudget(0.05, min_interval=0)
    t.record(1.0, step=10)
    assert t.interval == pytest.approx(20.0)
    t.record(4.0, step=20)  # storage got slower: save less often
    assert t.interval == pytest.approx(80.0)
    t.record(0.5, step=30)  # and faster again
    assert t.interval == pytest.approx(10.0)


def test_overhead_budget_adds_up_saves_of_the_same_step() -> None:
    t = OverheadBudget(0.1, min_interval=0)
    t.record(1.0, step=5)  # the top-k checkpoint
    t.record(2.0, step=5)  # and last.ckpt, before training went on
    assert t.save_seconds == pytest.approx(3.0) and t.interval == pytest.approx(30.0)
    t.record(1.0, step=6)
    assert t.save_seconds == pytest.approx(1.0)


def test_overhead_budget_never_saves_more_often_than_min_interval() -> None:
    t = OverheadBudget(0.5, min_interval=60)
    t.record(0.01)
    assert t.interval == 60
    t.record(0.0)  # a clock too coarse to see the save
    assert t.interval == 60


def test_overhead_budget_with_an_injected_clock() -> None:
    """The way the callback drives it: time the save with the clock, then ask the clock when next."""
    clock = FakeClock()
    t = OverheadBudget(0.1, min_interval=0, warmup=5, clock=clock)
    last = clock()
    starts: dict[int, float] = {}
    for step in range(1, 60):
        clock.advance(1.0)  # one training step
        if t.due_on_step(step, clock(), last):
            last = starts[step] = clock()
            clock.advance(2.0 if step < 30 else 0.5)  # the save itself; storage gets faster at step 30
            t.record(clock() - last, step)
    assert next(iter(starts)) == 5  # the warm-up
    gaps = [b - a for a, b in zip(list(starts.values()), list(starts.values())[1:])]
    assert gaps[:2] == [20.0, 20.0]  # 2 s saves within 10 %: one every 20 s (2 of them saving)
    assert len(gaps) > 3 and all(5.0 <= g < 6.0 for g in gaps[2:])  # 0.5 s saves: every 5 s, to the next step


@pytest.mark.parametrize("budget", [0, 1, 1.5, -0.01, True, "1%", float("nan")])
def test_overhead_budget_must_be_a_fraction(budget) -> None:  # noqa: ANN001
    with pytest.raises(ConfigurationError, match="between 0 and 1"):
        OverheadBudget(budget)


@pytest.mark.parametrize("kwargs", [{"min_interval": -1}, {"warmup": float("inf")}, {"clock": 3}])
def test_overhead_budget_bounds_are_validated(kwargs) -> None:  # noqa: ANN001
    with pytest.raises(ConfigurationError):
        OverheadBudget(0.01, **kwargs)


def test_any_of() -> None:
    t = AnyOf((EveryNSteps(5), EveryNEpochs(1)))
    assert t.due_on_step(5, 0, 0) and t.due_on_epoch(0) and not t.due_on_step(4, 0, 0)


@pytest.mark.parametrize("bad", [lambda: EveryNSteps(0), lambda: EveryNEpochs(-1), lambda: EveryInterval(-1),
                                 lambda: KeepLatest(-1), lambda: KeepTopK(-1, "x"), lambda: KeepTopK(1, "x", "avg")])
def test_invalid_policies(bad) -> None:  # noqa: ANN001
    with pytest.raises(ConfigurationError):
        bad()


def test_keep_top_k_min_and_max() -> None:
    ckpts = [m("a", 1, 0.5), m("b", 2, 0.3), m("c", 3, 0.9), m("d", 4, 0.1)]
    assert KeepTopK(2, "val_loss", "min").keep(ckpts) == {"b", "d"}
    assert KeepTopK(2, "val_loss", "max").keep(ckpts) == {"a", "c"}
    assert KeepTopK(0, "val_loss").keep(ckpts) == set()


def test_top_k_ignores_other_monitors_and_ranks_nan_last() -> None:
    other = Manifest(name="o", size=1, digest="0" * 64, metrics={"acc": 1.0}, monitor="acc")
    ckpts = [m("a", 1, math.nan), m("b", 2, 0.3), other]
    # as Lightning, which replaces NaN with inf (min) / -inf (max)
    assert [x.name for x in KeepTopK(5, "val_loss").ranked(ckpts)] == ["b", "a"]
    assert [x.name for x in KeepTopK(5, "val_loss", "max").ranked(ckpts)] == ["b", "a"]
    assert KeepTopK(1, "val_loss").keep(ckpts) == {"b"}


def test_nan_enters_a_top_k_that_is_not_full() -> None:
    assert KeepTopK(2, "val_loss").admits(math.nan, [m("b", 2, 0.3)])
    assert not KeepTopK(1, "val_loss").admits(math.nan, [m("b", 2, 0.3)])
    assert KeepTopK(1, "val_loss").admits(5.0, [m("a", 1, math.nan)])  # anything beats NaN


def test_best_of_ties_prefers_the_first_saved_and_never_a_last_copy() -> None:
    twin = m("epoch=1.ckpt", 8, 0.3, created=1)
    last = replace(twin, name="last.ckpt", created=2)
    later = m("epoch=2.ckpt", 16, 0.3, created=3)
    ranked = KeepTopK(3, "val_loss").ranked([later, last, twin])
    assert best_of(ranked, "val_loss", "min")[0].name == "epoch=1.ckpt"
    assert best_of(KeepTopK(3, "val_loss").ranked([last, later]), "val_loss", "min")[0].name == "epoch=2.ckpt"


def test_top_k_admits_only_strict_improvements_when_full() -> None:
    ckpts = [m("a", 1, 0.5), m("b", 2, 0.3)]
    policy = KeepTopK(2, "val_loss", "min")
    assert policy.admits(0.4, ckpts)
    assert not policy.admits(0.5, ckpts)  # equal to the k-th: Lightning keeps the older one
    assert not policy.admits(math.nan, ckpts)
    assert KeepTopK(3, "val_loss").admits(9.0, ckpts)


def test_keep_latest_and_all() -> None:
    ckpts = [m("a", 1, created=5), m("b", 3, created=1), m("c", 2, created=9)]
    assert KeepLatest(2).keep(ckpts) == {"b", "c"}
    assert KeepAll().keep(ckpts) == {"a", "b", "c"}


def test_is_improvement() -> None:
    assert is_improvement(1.0, None, "min")
    assert is_improvement(1.0, 2.0, "min") and not is_improvement(2.0, 1.0, "min")
    assert is_improvement(2.0, 1.0, "max")
    assert not is_improvement(math.nan, 1.0, "max")


def owned(name: str, step: int, owner: str, **metrics: float) -> Manifest:
    return Manifest(name=name, size=1, digest="0" * 64, global_step=step, metrics=metrics, monitor="val_loss",
                    owner=owner, created=float(step))


def test_keep_best_by_ranks_by_any_logged_metric() -> None:
    ckpts = [owned("a", 1, "x", val_loss=0.5, acc=0.7), owned("b", 2, "x", val_loss=0.3, acc=0.9),
             owned("c", 3, "x", val_loss=0.4)]
    assert KeepBestBy(1, "acc", "max").keep(ckpts) == {"b"}
    assert [m.name for m in KeepBestBy(5, "acc", "max").ranked(ckpts)] == ["b", "a"]  # c never logged acc
    assert KeepBestBy(2, "val_loss").keep(ckpts) == {"b", "c"}
    with pytest.raises(ConfigurationError):
        KeepBestBy(1, "acc", "avg")


def test_keep_union_judges_each_owner_and_keeps_each_newest() -> None:
    """As the callback prunes: top-k and last.ckpt are separate owners; each keeps its newest."""
    ckpts = [owned("a", 1, "cb", val_loss=0.1), owned("b", 2, "cb", val_loss=0.5), owned("c", 3, "cb", val_loss=0.9),
             owned("last", 3, "cb/last", val_loss=0.9)]
    assert KeepUnion((KeepBestBy(1, "val_loss"),)).keep(ckpts) == {"a", "c", "last"}
    assert KeepUnion((KeepLatest(2),)).keep(ckpts) == {"b", "c", "last"}
    assert KeepUnion(()).keep(ckpts) == {"c", "last"}


def test_newest_is_by_step_then_creation_time() -> None:
    ckpts = [m("a", 2, created=5.0), m("b", 3, created=1.0), m("c", 3, created=2.0), m("d", 1, created=9.0)]
    assert newest(ckpts).name == "c"
    assert newest([]) is None
    assert [c.name for c in sorted(ckpts, key=recency)] == ["d", "a", "b", "c"]
    assert KeepLatest(2).keep(ckpts) == {"b", "c"}


def test_doomed_keeps_policy_protected_and_each_owners_newest_in_order() -> None:
    ckpts = [owned("a", 1, "cb", val_loss=0.1), owned("b", 2, "cb", val_loss=0.5), owned("c", 3, "cb", val_loss=0.9),
             owned("x", 1, "other", val_loss=0.3), owned("y", 2, "other", val_loss=0.0),
             owned("z", 3, "other", val_loss=0.8),
             owned("last", 3, "cb/last", val_loss=0.9)]
    assert doomed(KeepTopK(1, "val_loss"), ckpts) == ["b", "x"]  # each owner: its best and its newest
    assert doomed(KeepTopK(1, "val_loss"), ckpts, protect={"b"}) == ["x"]
    assert doomed(KeepAll(), ckpts) == []
    assert doomed(KeepLatest(0), []) == []


def test_best_names_stars_ties_but_not_a_last_copy_of_the_best() -> None:
    ckpts = [owned("a", 1, "cb", val_loss=0.2), owned("b", 2, "cb", val_loss=0.2), owned("c", 3, "cb", val_loss=0.4),
             owned("last.ckpt", 2, "cb/last", val_loss=0.2)]
    assert best_names(ckpts, None, None) == {"a", "b"}
    assert best_names(ckpts, "val_loss", "max") == {"c"}
    assert best_names([owned("last.ckpt", 2, "cb/last", val_loss=0.2)], None, None) == {"last.ckpt"}
    assert best_names(ckpts, "acc", None) == set()


def test_recorded_mode_only_when_all_agree() -> None:
    assert recorded_mode([replace(m("a", 1), mode="max"), replace(m("b", 2), mode="max")]) == "max"
    assert recorded_mode([replace(m("a", 1), mode="max"), replace(m("b", 2), mode="min")]) is None
    assert recorded_mode([]) is None
