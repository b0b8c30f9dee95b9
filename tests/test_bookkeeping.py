"""The pure top-k / best / last bookkeeping (lightning_ckpt/bookkeeping.py): no Trainer, no storage."""

from __future__ import annotations

import math

import pytest

from lightning_ckpt.bookkeeping import Bookkeeping, Standing
from lightning_ckpt.integrity import Manifest
from lightning_ckpt.policies import KeepAll, KeepLatest, KeepTopK


def rec(name: str, step: int, loss: float | None = None, owner: str = "cb") -> Manifest:
    metrics = {} if loss is None else {"loss": loss}
    return Manifest(name=name, size=1, digest="", global_step=step, created=float(step), metrics=metrics,
                    monitor="loss" if loss is not None else None, owner=owner)


def topk(k: int, mode: str = "min") -> Bookkeeping:
    return Bookkeeping(KeepTopK(k, "loss", mode), "loss", mode, k)


def test_top_k_standing_names_best_kth_and_keeps_lightnings_insertion_order() -> None:
    book = topk(2)
    for r in (rec("a", 1, 0.5), rec("b", 2, 0.3), rec("c", 3, 0.4)):
        book.add(r)
    assert book.to_drop() == ["a"]
    book.forget(book.to_drop())
    standing = book.standing()
    assert standing == Standing(best="b", best_score=0.3, top_k={"b": 0.3, "c": 0.4}, kth="c", kth_score=0.4)
    assert list(standing.top_k or {}) == ["b", "c"]  # oldest first, as Lightning inserts


def test_a_k_th_is_named_only_once_k_are_kept() -> None:
    book = topk(3)
    book.add(rec("a", 1, 0.5))
    standing = book.standing()
    assert standing.best == "a" and standing.kth is None


def test_max_mode_ranks_the_highest_first() -> None:
    book = topk(1, "max")
    book.add(rec("a", 1, 0.5))
    book.add(rec("b", 2, 0.9))
    assert book.to_drop() == ["a"]
    assert book.standing().best == "b"


def test_nan_never_ranks_above_a_number() -> None:
    book = topk(1)
    book.add(rec("nan", 1, math.nan))
    book.add(rec("b", 2, 7.0))
    assert book.to_drop() == ["nan"]
    assert book.admits(8.0) == (False, False)


def test_a_persisting_save_neither_counts_nor_is_dropped() -> None:
    book = topk(1)
    book.add(rec("old", 1, 0.5))
    book.add(rec("new", 2, 0.1))
    assert book.to_drop(persisting={"new"}) == []  # "new" may yet fail: "old" stays
    assert book.standing(persisting={"new"}).best == "old"
    assert book.admits(0.3, persisting={"new"}) == (False, True)  # wait for "new" before judging


def test_a_provisional_save_counts_as_in_the_checkpoint_lightning_writes() -> None:
    book = topk(1)
    book.add(rec("old", 1, 0.5))
    standing = book.standing(provisional=rec("new", 2, 0.1))
    assert standing.best == "new" and standing.top_k == {"new": 0.1}


def test_the_protected_checkpoint_is_never_dropped() -> None:
    book = topk(1)
    book.add(rec("resumed", 1, 0.9))
    book.add(rec("b", 2, 0.1))
    book.protected = {"resumed"}
    assert book.to_drop() == []


def test_pushed_out_is_the_kth_once_k_are_kept() -> None:
    book = topk(2)
    book.add(rec("a", 1, 0.5))
    assert book.pushed_out() is None
    book.add(rec("b", 2, 0.3))
    assert book.pushed_out() == "a"


@pytest.mark.parametrize("n", [1, 2])
def test_without_a_monitor_the_newest_is_best_and_the_latest_n_stay(n: int) -> None:
    book = Bookkeeping(KeepLatest(n), None, "min", n)
    for step in range(1, 4):
        book.add(rec(f"s{step}", step))
    assert book.to_drop() == [f"s{s}" for s in range(1, 4 - n)]
    assert book.standing() == Standing(best="s3")
    assert book.admits(0.0) == (True, True) and book.pushed_out() is None


def test_keep_all_drops_nothing_and_reports_every_one() -> None:
    book = Bookkeeping(KeepAll(), "loss", "min", -1)
    for step, loss in ((1, 0.3), (2, 0.1), (3, 0.2)):
        book.add(rec(f"s{step}", step, loss))
    assert book.to_drop() == [] and book.keeps_all()
    standing = book.standing()
    assert standing.best == "s2" and standing.kth == "s1" and len(standing.top_k or {}) == 3


def test_the_newest_of_each_owner_is_kept_whatever_the_policy() -> None:
    book = topk(1)
    book.add(rec("last.ckpt", 1, 0.9, owner="cb/last"))
    book.add(rec("a", 2, 0.1))
    assert book.to_drop() == []


def test_a_save_of_the_same_name_replaces_its_record() -> None:
    book = topk(2)
    book.add(rec("a", 1, 0.5))
    book.add(rec("a", 2, 0.1))
    assert [r.global_step for r in book.records] == [2]


def test_empty_bookkeeping_reports_nothing_to_change() -> None:
    assert topk(1).standing() == Standing(top_k={})
    assert Bookkeeping(KeepLatest(1), None, "min", 1).standing() == Standing()
