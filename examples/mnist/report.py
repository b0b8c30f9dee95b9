"""What a run did with its checkpoints, printed for the person who started it.

``ResumeReport`` is a callback that says, when training starts, whether the run resumed and
from which checkpoint, epoch and global step; ``checkpoint_summary`` describes, after ``fit``,
where the checkpoints went and which are the best and the last. Both find the checkpoint
callback by the attributes that Lightning's ``ModelCheckpoint`` and
``lightning_ckpt.CheckpointCallback`` share, so the example reports the same way whichever is
configured.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["PREFIX", "ResumeReport", "checkpoint_callbacks", "checkpoint_summary", "resumed_from"]

#: Starts every line the example prints, to tell them apart from Lightning's own messages.
PREFIX = "[mnist]"


class ResumeReport(Callback):
    """Print, as training starts, the checkpoint the run resumed from, or that it started fresh.

    The line is printed when the first epoch of this run starts: by then Lightning has restored
    the loops, so the epoch and global step are those the run continues from, and the checkpoint
    callbacks have run their own ``on_train_start`` (Lightning calls them last), so
    ``lightning_ckpt`` has recorded the URL it resumed from. The values are also kept as
    ``resumed_from``, ``start_epoch`` and ``start_step``.
    """

    def __init__(self) -> None:
        self.resumed_from: str | None = None
        self.start_epoch = 0
        self.start_step = 0
        self._reported = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Get ready to report once more: a trainer may be fitted again."""
        self._reported = False

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record and print, at the first epoch of this run only, where the run starts."""
        if self._reported:
            return
        self._reported = True
        self.resumed_from = resumed_from(trainer)
        self.start_epoch = trainer.current_epoch
        self.start_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        if self.resumed_from is None:
            print(f"{PREFIX} started fresh: no checkpoint to resume from", flush=True)
        else:
            print(
                f"{PREFIX} resumed from {self.resumed_from}: "
                f"continuing with epoch {self.start_epoch} at global step {self.start_step}",
                flush=True,
            )


def resumed_from(trainer: Trainer) -> str | None:
    """The checkpoint this run resumed from, or ``None`` when it started fresh.

    ``lightning_ckpt`` may hand Lightning a local copy of a remote checkpoint, so the URL its
    callback records (``resumed_from``) is preferred to ``trainer.ckpt_path``.
    """
    for callback in checkpoint_callbacks(trainer):
        url = getattr(callback, "resumed_from", None)
        if url:
            return str(url)
    return str(trainer.ckpt_path) if trainer.ckpt_path else None


def checkpoint_callbacks(trainer: Trainer) -> list[Any]:
    """The trainer's checkpoint callbacks that keep ``ModelCheckpoint``'s bookkeeping attributes."""
    return [
        cb for cb in trainer.checkpoint_callbacks if hasattr(cb, "last_model_path") and hasattr(cb, "dirpath")
    ]


def checkpoint_summary(trainer: Trainer) -> str:
    """Lines saying where checkpoints went, the best and last ones, and what the run resumed from."""
    lines = []
    callbacks = checkpoint_callbacks(trainer)
    if not callbacks:
        lines.append(f"{PREFIX} no checkpoint callback was configured: nothing was saved")
    for callback in callbacks:
        best = callback.best_model_path or "(none)"
        score = getattr(callback, "best_model_score", None)
        monitor = getattr(callback, "monitor", None)
        if score is not None and monitor:
            best += f" ({monitor}={float(score):.4f})"
        lines += [
            f"{PREFIX} checkpoints went to: {callback.dirpath}",
            f"{PREFIX} best checkpoint:     {best}",
            f"{PREFIX} last checkpoint:     {callback.last_model_path or '(none)'}",
        ]
    lines.append(f"{PREFIX} resumed from:        {resumed_from(trainer) or 'nothing (started fresh)'}")
    lines.append(f"{PREFIX} {_progress(trainer.current_epoch)}, global step {trainer.global_step}")
    return "\n".join(lines)


def _progress(epochs_done: int) -> str:
    """Where training stands, in the 0-based epoch numbers of Lightning's logs and file names."""
    if epochs_done < 1:
        return "stopped before the end of epoch 0"
    return f"stopped after epoch {epochs_done - 1} ({epochs_done} epoch{'s' if epochs_done > 1 else ''} done)"
