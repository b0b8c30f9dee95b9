"""Choosing a save's file name: Lightning's templates and ``-vN`` versions, never a file we did not write.

Part of :class:`~lightning_ckpt.callback.CheckpointCallback` (a mixin). Rank 0 looks at storage
and every rank uses its answer. The templates themselves are :mod:`lightning_ckpt.naming`'s.

Owns: which names are taken and by whom. Must not: write or delete anything except a templated
``last`` file of our own history that a newer one replaced.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_ckpt import _lightning
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointWarning,
)
from lightning_ckpt.integrity import manifest_name
from lightning_ckpt.layout import History
from lightning_ckpt.naming import EXTENSION, LAST_NAME, format_checkpoint_name, versioned_name
from lightning_ckpt.policies import is_last_copy
from lightning_ckpt.storage import split_url

__all__: list[str] = []  # a part of CheckpointCallback: nothing to import from here

class _SaveNamesMixin:
    """File names of saves (see the module docstring); state lives on the callback."""

    def _unique_name(self, trainer: pl.Trainer, candidates: dict[str, float], replaceable: str | None) -> str:
        """The templated name, with Lightning's ``-vN`` when a file of that name exists already.

        As Lightning, the file this save pushes out of the top k (``replaceable``) is reused, and
        ``enable_version_counter=False`` reuses any name -- but never a file we did not write, and
        never a last.ckpt.
        """
        base = format_checkpoint_name(self.filename, candidates, self.auto_insert_metric_name, suffix="",
                                      join=self.CHECKPOINT_JOIN_CHAR, equals=self.CHECKPOINT_EQUALS_CHAR)
        if not self._enable_version_counter:
            return self._versioned(trainer, base, self._foreign)
        return self._versioned(trainer, base, lambda n: n != replaceable and self._taken(n))

    def _versioned(self, trainer: pl.Trainer, base: str, taken: Callable[[str], bool]) -> str:
        """Rank 0 looks at storage; every rank uses its answer."""
        name = None
        if trainer.is_global_zero:
            name = versioned_name(base, taken, start=self.STARTING_VERSION, join=self.CHECKPOINT_JOIN_CHAR)
        return trainer.strategy.broadcast(name)

    def _taken(self, name: str) -> bool:
        if name == LAST_NAME + EXTENSION or any(e.record.name == name for e in self._pending):
            return True
        return self.manager.storage.exists(name) or self.manager.storage.exists(manifest_name(name))

    def _foreign(self, name: str) -> bool:
        """A file we may not replace: not committed by us, or a last.ckpt."""
        if name == LAST_NAME + EXTENSION:
            return True
        if not self.manager.storage.exists(name):
            return False
        try:
            return is_last_copy(self.manager.read_manifest(name))
        except CheckpointError:
            return True

    @property
    def _guard(self) -> History | None:
        """The history saves are checked against; with ``enable_version_counter=False`` none: as
        Lightning, the user asked for names to be reused, so this callback's own checkpoints of an
        earlier run are replaced (never a file we did not write, nor another callback's)."""
        return self.history if self._enable_version_counter else None

    def _free_name(self, trainer: pl.Trainer, name: str, owner: str) -> str:
        """``name``, or ``name-vN`` where ``name`` holds a file this save may not replace (rank 0 decides)."""
        free = (self.manager.free_name(name, owner, self._guard, sharded=_lightning.is_sharded(trainer.strategy))
                if trainer.is_global_zero else None)
        free = trainer.strategy.broadcast(free) or name
        if free != name and name not in self._versioned_names:
            self._versioned_names.add(name)
            rank_zero_warn(f"lightning-ckpt: {self.manager.url_of(name)} holds a checkpoint of another run or callback "
                           f"(or a file we did not write), which is kept; saving as {free}", category=CheckpointWarning)
        return free

    def _last_name(self, trainer: pl.Trainer, candidates: dict[str, float]) -> str:
        """``last.ckpt`` (``CHECKPOINT_NAME_LAST`` may be a template), versioned as Lightning when
        another callback's or another run's file already has that name."""
        base = format_checkpoint_name(self.CHECKPOINT_NAME_LAST, candidates, self.auto_insert_metric_name, suffix="",
                                      join=self.CHECKPOINT_JOIN_CHAR, equals=self.CHECKPOINT_EQUALS_CHAR)
        name = base + EXTENSION
        if not self._enable_version_counter:
            return name
        mine = {split_url(self.last_model_path)[1] if self.last_model_path else None,
                # ours too while a background save of it has not committed yet
                self._last_waiting[0] if self._last_waiting else None}
        return self._versioned(trainer, base, lambda n: n not in mine and self._last_taken(n))

    def _last_taken(self, name: str) -> bool:
        """As Lightning: a file ``name`` exists (another callback's, or another run's that this one
        did not resume) -- never replaced: ours takes ``last-v1.ckpt``."""
        return self.manager.storage.exists(name) or self._persisting(name)

    def _drop_previous_last(self, previous: str) -> None:
        """A templated ``CHECKPOINT_NAME_LAST`` made a new last file: delete our previous one."""
        directory, name = split_url(previous)
        if not self._same_dir(directory):
            return
        try:
            manifest = self.manager.read_manifest(name)
            # only our own history's: a last.ckpt of the run this one forked from stays
            if manifest.owner == self._last_owner and self.history.contains(manifest):
                self.manager.delete(name)
        except CheckpointError:
            pass  # not ours, or already gone: never touched

    @property
    def _last_owner(self) -> str:
        return self.owner + "/last"
