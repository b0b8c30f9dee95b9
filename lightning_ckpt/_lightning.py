"""Every use of a private Lightning attribute or function, each behind one named function.

Lightning offers no public way to do several things this package must do: dump the Trainer's
checkpoint without writing it, find the train loader and its fetcher, tell whether validation
follows the current batch, keep Lightning's SIGTERM notifier from ending a run that preempts
itself, tell a sharded strategy from one that saves through its ``CheckpointIO``. Each such use
is a function here, so a Lightning upgrade is checked in one module (tests/test_lightning_internals.py
has one test per internal). Where an internal has moved or been renamed these functions raise
:class:`~lightning_ckpt.errors.CheckpointError` naming the installed Lightning version -- never a
silent default that would quietly disable exact resume or route saves around our IO.

Owns: the names of Lightning's private attributes and functions. Must not: decide anything
(when to save, what to keep) -- callers do; import any other lightning_ckpt module but ``errors``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning
import lightning.pytorch as pl
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

from lightning_ckpt.errors import CheckpointError

__all__ = [
    "LIGHTNING_VERSION",
    "accumulating",
    "bypasses_checkpoint_io",
    "checkpoint_io",
    "dump_checkpoint",
    "epoch_ends",
    "is_sharded",
    "load_full_into_sharded",
    "recreate_iterator_at_epoch_start",
    "require_last_checkpoint_hook",
    "restart_iterator_at_its_epoch",
    "saves_through_checkpoint_io",
    "signal_handlers_to_restore",
    "silence_sigterm_notifier",
    "train_loader",
    "unsilence_sigterm_notifier",
    "val_check_time_interval",
    "validation_follows",
    "validation_has_run",
    "wrap_train_loader",
]

LIGHTNING_VERSION: str = lightning.__version__


def _moved(what: str) -> CheckpointError:
    return CheckpointError(
        f"lightning-ckpt relies on Lightning's internal {what}, which Lightning {LIGHTNING_VERSION} does not have "
        "(moved or renamed): this lightning-ckpt version does not support that Lightning version"
    )


def _get(obj: Any, name: str, where: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _moved(f"{where}.{name}") from None


def _set(obj: Any, name: str, value: Any, where: str) -> None:
    _get(obj, name, where)  # only replace what exists: a renamed flag would be set to no effect
    setattr(obj, name, value)


# -- strategy and CheckpointIO -------------------------------------------------------------------


def checkpoint_io(strategy: Strategy) -> Any:
    """The strategy's ``CheckpointIO`` plugin as set (``None`` before one is), without creating Lightning's default."""
    return _get(strategy, "_checkpoint_io", "Strategy")


def dump_checkpoint(trainer: pl.Trainer, weights_only: bool) -> dict[str, Any]:
    """The Trainer's full checkpoint (as ``trainer.save_checkpoint`` would write it), on every rank.

    Runs every ``on_save_checkpoint`` hook; may be a collective (strategies gather state here).
    """
    connector = _get(trainer, "_checkpoint_connector", "Trainer")
    return _get(connector, "dump_checkpoint", "_CheckpointConnector")(weights_only)


def saves_through_checkpoint_io(strategy: Strategy) -> bool:
    """Whether ``strategy.save_checkpoint`` is Lightning's base one: rank 0 hands the dict to its ``CheckpointIO``.

    For such strategies (single device, DDP, ...) the callback may hand the dumped checkpoint to
    our IO itself; one that overrides it (XLA, DeepSpeed, FSDP, a user's own) gets its own path.
    """
    return type(strategy).save_checkpoint is Strategy.save_checkpoint


def is_sharded(strategy: Strategy) -> bool:
    """Whether ``strategy`` saves sharded (DCP) checkpoints itself, bypassing ``CheckpointIO``.

    Lightning's ``ModelParallelStrategy`` (FSDP2, tensor parallel) by default, and ``FSDPStrategy``
    with ``state_dict_type="sharded"``. A strategy of neither family (or a user's that copies the
    attribute) is judged by the same attribute where it has it.
    """
    if isinstance(strategy, ModelParallelStrategy):
        return bool(_get(strategy, "_save_distributed_checkpoint", "ModelParallelStrategy"))
    if isinstance(strategy, FSDPStrategy):
        return _get(strategy, "_state_dict_type", "FSDPStrategy") == "sharded"
    return bool(getattr(strategy, "_save_distributed_checkpoint", False))


def bypasses_checkpoint_io(strategy: Strategy) -> bool:
    """Whether ``strategy`` saves and loads checkpoints itself instead of through its ``CheckpointIO``.

    Sharded strategies (:func:`is_sharded`), and ``ModelParallelStrategy`` also when it gathers a
    full state dict (``save_distributed_checkpoint=False``): it refuses ``storage_options`` and
    reads checkpoints through local ``Path``s.
    """
    return is_sharded(strategy) or isinstance(strategy, ModelParallelStrategy) or hasattr(
        strategy, "_save_distributed_checkpoint"
    )


def load_full_into_sharded(checkpoint: dict[str, Any], module: Any, optimizers: Any, strict: bool) -> None:
    """Load a single-file checkpoint's weights and optimizer states into a sharded model, as Lightning does.

    Pops ``state_dict`` and ``optimizer_states`` from ``checkpoint``.
    """
    from lightning.fabric.strategies import model_parallel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    load_raw = _get(model_parallel, "_load_raw_module_state", "lightning.fabric.strategies.model_parallel")
    rekey = _get(model_parallel, "_rekey_optimizer_state_if_needed", "lightning.fabric.strategies.model_parallel")
    load_raw(checkpoint.pop("state_dict"), module, strict=strict)
    options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
    for index, optimizer in enumerate(optimizers):
        state = rekey(checkpoint["optimizer_states"][index], module)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)
    checkpoint.pop("optimizer_states", None)


# -- ModelCheckpoint -----------------------------------------------------------------------------


def require_last_checkpoint_hook() -> None:
    """Fail unless Lightning still asks a ``ModelCheckpoint`` for ``ckpt_path="last"`` by ``_find_last_checkpoints``.

    The callback overrides that hook; were it renamed, ``"last"`` would silently never resume.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    _get(ModelCheckpoint, "_find_last_checkpoints", "ModelCheckpoint")


# -- the fit loop ----------------------------------------------------------------------------------


def train_loader(trainer: pl.Trainer) -> Any:
    """The fit loop's ``CombinedLoader`` of train loaders (``None`` before Lightning built it)."""
    return _get(trainer.fit_loop, "_combined_loader", "_FitLoop")


def _fetcher(trainer: pl.Trainer) -> Any:
    return _get(trainer.fit_loop, "_data_fetcher", "_FitLoop")


def validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning runs validation right after the current training batch."""
    fetcher = _fetcher(trainer)
    if fetcher is None:
        return False
    should_check = _get(trainer.fit_loop.epoch_loop, "_should_check_val_fx", "_TrainingEpochLoop")
    return bool(should_check(fetcher))


def epoch_ends(trainer: pl.Trainer) -> bool:
    """Whether the training batch that just ended was its epoch's last."""
    return bool(_get(trainer.fit_loop.epoch_loop, "_num_ready_batches_reached", "_TrainingEpochLoop")())


def accumulating(trainer: pl.Trainer) -> bool:
    """Whether the batch that just ended only accumulated gradients (no optimizer step yet)."""
    return bool(_get(trainer.fit_loop.epoch_loop, "_should_accumulate", "_TrainingEpochLoop")())


def validation_has_run(trainer: pl.Trainer) -> bool:
    """Whether the fit's validation loop has run at least once."""
    return bool(_get(trainer.fit_loop.epoch_loop.val_loop, "_has_run", "_EvaluationLoop"))


def val_check_time_interval(trainer: pl.Trainer) -> Any:
    """Lightning's time-based ``val_check_interval`` (``None`` when validation is not timed).

    Read as Lightning's own fit loop reads it (the attribute exists only once a timed interval was set).
    """
    return getattr(trainer, "_val_check_time_interval", None)


def recreate_iterator_at_epoch_start(trainer: pl.Trainer) -> None:
    """Have Lightning create the train iterator at the next epoch start, as in an uninterrupted run.

    Lightning (2.4-2.6) skips that ``iter()`` on the first epoch after a resume (``is_resuming``),
    reusing the iterator it created before the random streams were restored.
    """
    _set(trainer.fit_loop, "_resuming_from_checkpoint", False, "_FitLoop")


def restart_iterator_at_its_epoch(trainer: pl.Trainer, states: list[dict[str, Any]] | None) -> None:
    """Mid-epoch, with a sampler that shuffles by epoch (``DistributedSampler``): recreate the iterator.

    Lightning creates the resumed iterator (torchdata's samplers then draw the permutation at
    once) before it calls ``set_epoch`` with the resumed epoch, so the rest of the epoch would
    come from epoch 0's permutation. Set the epoch first, load the saved position again and let
    the fetcher create the iterator anew -- before the random streams are restored, as Lightning
    did.
    """
    loop = trainer.fit_loop
    combined, fetcher = train_loader(trainer), _fetcher(trainer)
    if not states or combined is None or fetcher is None or not loop.restarted_mid_epoch:
        return
    if any(state.get("_iterator_finished", False) for state in states if isinstance(state, dict)):
        return
    samplers = [s for dl in combined.flattened
                for s in (getattr(dl, "sampler", None), getattr(getattr(dl, "batch_sampler", None), "sampler", None))]
    if not any(callable(getattr(s, "set_epoch", None)) for s in samplers):
        return
    from lightning.fabric.utilities import data

    set_sampler_epoch = _get(data, "_set_sampler_epoch", "lightning.fabric.utilities.data")
    for dl in combined.flattened:
        set_sampler_epoch(dl, loop.epoch_progress.current.processed)
    _get(combined, "_load_state_dicts", "CombinedLoader")(states)
    iter(fetcher)


def wrap_train_loader(trainer: pl.Trainer, wrap: Callable[[Any], Any]) -> None:
    """Have Lightning build the train loader as ``wrap(loader)`` from now on (idempotent).

    Lightning asks ``fit_loop._data_source`` for the loader each time it (re)loads it, inside its
    own argument-capturing context, so the wrapped loader can still be re-instantiated for
    distributed samplers.
    """
    source = _get(trainer.fit_loop, "_data_source", "_FitLoop")
    if getattr(source, "_lightning_ckpt_wrapped", False):  # our own marker
        return
    original = _get(source, "dataloader", "_DataLoaderSource")
    source.dataloader = lambda: wrap(original())
    source._lightning_ckpt_wrapped = True


# -- the signal connector --------------------------------------------------------------------------


def _lightning_sigterm_ignored(signum: int, frame: Any) -> None:
    """Stands in for Lightning's SIGTERM notifier while the callback handles preemption.

    Lightning's would mark the run to stop at its next check (exiting with status 0 and no
    checkpoint), forward the signal to the other ranks, and run a collective inside the handler.
    """


def _connector(trainer: pl.Trainer) -> Any:
    return _get(trainer, "_signal_connector", "Trainer")


def silence_sigterm_notifier(trainer: pl.Trainer) -> None:
    """Turn off Lightning's SIGTERM notifier (it keeps calling the handler it found: ours)."""
    _set(_connector(trainer), "_sigterm_notifier_fn", _lightning_sigterm_ignored, "_SignalConnector")


def unsilence_sigterm_notifier(trainer: pl.Trainer) -> None:
    """Undo :func:`silence_sigterm_notifier` (a no-op where it was not silenced)."""
    connector = _connector(trainer)
    if "_sigterm_notifier_fn" in vars(connector):
        del connector._sigterm_notifier_fn


def signal_handlers_to_restore(trainer: pl.Trainer) -> dict[Any, Any]:
    """The handlers Lightning restores at its teardown (the ones it found when training started); mutable."""
    handlers = _get(_connector(trainer), "_original_handlers", "_SignalConnector")
    if not isinstance(handlers, dict):
        raise _moved("_SignalConnector._original_handlers (no longer a dict)")
    return handlers
