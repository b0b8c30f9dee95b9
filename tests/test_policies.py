"""Save triggers and retention policies are pure functions of their inputs."""

import math

import pytest

from lightning_ckpt.errors import ConfigurationError
from lightning_ckpt.integrity import Manifest
from lightning_ckpt.policies import (
    AnyOf,
    EveryInterval,
    EveryNEpochs,
    EveryNSteps,
    KeepAll,
    KeepLatest,
    KeepTopK,
    is_improvement,
)


def m(name: str, step: int, loss: float | None = None, created: float = 0.0) -> Manifest:
    metrics = {} if loss is None else {"val_loss": loss}
    return Manifest(name=name, size=1, sha256="0" * 64, global_step=step, metrics=metrics,
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


def test_any_of() -> None:
    t = AnyOf((EveryNSteps(5), EveryNEpochs(1)))
    assert t.due_on_step(5, 0, 0) and t.due_on_epoch(0) and not t.due_on_step(4, 0, 0)


@pytest.mark.parametrize("bad", [lambda: EveryNSteps(0), lambda: EveryNEpochs(-1), lambda: EveryInterval(0),
                                 lambda: KeepLatest(-1), lambda: KeepTopK(-1, "x"), lambda: KeepTopK(1, "x", "avg")])
def test_invalid_policies(bad) -> None:  # noqa: ANN001
    with pytest.raises(ConfigurationError):
        bad()


def test_keep_top_k_min_and_max() -> None:
    ckpts = [m("a", 1, 0.5), m("b", 2, 0.3), m("c", 3, 0.9), m("d", 4, 0.1)]
    assert KeepTopK(2, "val_loss", "min").keep(ckpts) == {"b", "d"}
    assert KeepTopK(2, "val_loss", "max").keep(ckpts) == {"a", "c"}
    assert KeepTopK(0, "val_loss").keep(ckpts) == set()


def test_top_k_ignores_other_monitors_and_nan() -> None:
    other = Manifest(name="o", size=1, sha256="0" * 64, metrics={"acc": 1.0}, monitor="acc")
    ckpts = [m("a", 1, math.nan), m("b", 2, 0.3), other]
    assert [x.name for x in KeepTopK(5, "val_loss").ranked(ckpts)] == ["b"]


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
