"""Top-k, best and last as a small pure object: which of our checkpoints count, rank and go.

:class:`Bookkeeping` holds the records (manifests) of the checkpoints one callback saved in one
directory and answers the questions Lightning's ``ModelCheckpoint`` answers with its attributes:
is a new score good enough to save, which file does a save push out, which checkpoints does
retention drop, and what are ``best_model_path``, ``best_model_score``, ``best_k_models`` and the
k-th now (:class:`Standing`). Ranking and retention are the policies' (:mod:`lightning_ckpt.policies`),
the same ones ``lightning-ckpt prune`` applies.

Owns: the in-memory list of records and the rules of what counts (only committed checkpoints,
never a protected one). Must not: do I/O, import Lightning or torch, or know URLs -- names only;
the callback turns them into paths and tensors and the manager deletes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from lightning_ckpt.integrity import Manifest
from lightning_ckpt.policies import (
    KeepAll,
    KeepTopK,
    RetentionPolicy,
    best_of,
    doomed,
    newest,
    rank_value,
    recency,
)

__all__ = ["ADOPTED", "Bookkeeping", "Standing"]

#: ``Manifest.extra`` flag of a checkpoint ModelCheckpoint wrote (no manifest) that a migrated run ranks
ADOPTED = "adopted_from_model_checkpoint"


@dataclass(frozen=True)
class Standing:
    """What Lightning's ModelCheckpoint reports, by name; ``None`` where it would keep its previous value.

    Scores are in the monitored quantity's own units (``rank_value``: NaN ranks last).
    """

    best: str | None = None
    best_score: float | None = None
    #: name -> score, in Lightning's insertion order (oldest first); ``None`` without a monitor
    top_k: dict[str, float] | None = None
    kth: str | None = None
    kth_score: float | None = None


@dataclass
class Bookkeeping:
    """The checkpoints one callback saved here, and what its retention keeps of them.

    Args:
        retention: which checkpoints stay (top-k by ``monitor``, the latest n, or all).
        monitor: the ranked quantity (``None``: the newest is the "best", as in Lightning).
        mode: ``"min"`` or ``"max"``.
        save_top_k: Lightning's k (``-1``: all), for the k-th it reports.
    """

    retention: RetentionPolicy
    monitor: str | None
    mode: str
    save_top_k: int
    #: our checkpoints: committed ones, background saves still persisting, adopted ModelCheckpoint files
    records: list[Manifest] = field(default_factory=list)
    #: names retention never drops (the checkpoint the run resumed from)
    protected: set[str] = field(default_factory=set)

    def add(self, record: Manifest) -> None:
        """Count ``record`` (a save of that name replaces the earlier record)."""
        self.records = [r for r in self.records if r.name != record.name] + [record]

    def forget(self, names: Iterable[str]) -> None:
        """Stop counting ``names`` (deleted, failed, or pushed out)."""
        gone = set(names)
        self.records = [r for r in self.records if r.name not in gone]

    def committed(self, persisting: Collection[str] = ()) -> list[Manifest]:
        """Our checkpoints that committed (a background save still persisting may yet fail)."""
        return [r for r in self.records if r.name not in persisting]

    def _dropped(self, records: list[Manifest], extra: Collection[str] = ()) -> list[str]:
        # the decision `lightning-ckpt prune` and the manager apply too: ours, plus the newest of ours
        return doomed(self.retention, records, self.protected | set(extra))

    def to_drop(self, persisting: Collection[str] = ()) -> list[str]:
        """Committed checkpoints retention no longer keeps (never a protected or persisting one)."""
        return self._dropped(self.committed(persisting), persisting)

    def admits(self, score: float, persisting: Collection[str] = ()) -> tuple[bool, bool]:
        """Whether ``score`` earns a place: (among every record, among committed ones only).

        They differ only while saves persist in the background that rank above it: one of those
        may yet fail, so the caller may wait for them before judging.
        """
        if not isinstance(self.retention, KeepTopK):
            return True, True
        return self.retention.admits(score, self.records), self.retention.admits(score, self.committed(persisting))

    def pushed_out(self) -> str | None:
        """Lightning's ``del_filepath``: the record the next top-k save replaces once k are kept."""
        if not isinstance(self.retention, KeepTopK):
            return None
        ranked = self.retention.ranked(self.records)
        return ranked[self.save_top_k - 1].name if len(ranked) >= self.save_top_k else None

    def standing(self, persisting: Collection[str] = (), provisional: Manifest | None = None) -> Standing:
        """best / top-k / k-th as Lightning's ModelCheckpoint reports them.

        While a save is in progress (``provisional``) it counts already, and what retention will
        drop once it commits no longer does -- the state Lightning writes into that checkpoint.
        Otherwise only committed checkpoints count: the best and the top k never name a
        background save still persisting (it may yet fail).
        """
        records = self.records if provisional is not None else self.committed(persisting)
        if provisional is not None:
            records = [r for r in records if r.name != provisional.name] + [provisional]
            dropped = set(self._dropped(records, {provisional.name}))
            records = [r for r in records if r.name not in dropped]
        if self.monitor is None:
            if not records:
                return Standing()
            return Standing(best=newest(records).name)  # type: ignore[union-attr]  # records is not empty
        monitor, mode = self.monitor, self.mode
        ranked = KeepTopK(len(records), monitor, mode).ranked(records)
        in_order = sorted(ranked, key=recency)  # Lightning's insertion order
        top_k = {r.name: rank_value(r.metrics.get(monitor), mode) for r in in_order}
        if not ranked:
            return Standing(top_k=top_k)
        best = best_of(ranked, monitor, mode)[0]
        k = self.save_top_k
        kth = None
        if k == -1 or len(ranked) >= k:  # Lightning names a k-th only once k are kept
            kth = ranked[-1] if k == -1 else ranked[k - 1]
        return Standing(
            best=best.name,
            best_score=rank_value(best.metrics.get(monitor), mode),
            top_k=top_k,
            kth=None if kth is None else kth.name,
            kth_score=None if kth is None else rank_value(kth.metrics.get(monitor), mode),
        )

    def keeps_all(self) -> bool:
        """Whether retention keeps every checkpoint (``save_top_k=-1``)."""
        return isinstance(self.retention, KeepAll)
