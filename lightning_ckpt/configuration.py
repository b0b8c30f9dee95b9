"""The callback's constructor arguments, checked and turned into policy objects.

ModelCheckpoint's familiar keywords (``every_n_epochs``, ``every_n_train_steps``,
``train_time_interval``, ``save_top_k``, ``monitor``, ``mode``) are shortcuts for the policy
objects of :mod:`lightning_ckpt.policies`; ``trigger=`` and ``retention=`` take those objects
directly. Passing a policy together with a shortcut that says something else is a
:class:`~lightning_ckpt.errors.ConfigurationError`, raised at construction with the reason.

Owns: validation of the arguments and the translation keywords -> policies. Must not: keep
state, import Lightning, or know how the callback uses the policies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lightning_ckpt import policies
from lightning_ckpt.errors import ConfigurationError
from lightning_ckpt.naming import validate_template

__all__ = [
    "SAVE_LAST_MODES",
    "Keeping",
    "Schedule",
    "check_arguments",
    "incremental_of",
    "keeping",
    "schedule",
]

#: what ``save_last`` accepts: Lightning's values plus ``"copy"`` (two independent files)
SAVE_LAST_MODES = (None, True, False, "link", "copy")


def check_arguments(
    *, mode: str, save_last: Any, filename: str | None, storage_options: Any, when_busy: str, preemption: Any,
    preemption_type: type,
) -> None:
    """Reject what no policy translation covers, with the reason."""
    if mode not in policies.MODES:
        raise ConfigurationError(f"mode={mode!r} must be one of {policies.MODES}")
    if save_last not in SAVE_LAST_MODES:
        raise ConfigurationError(f"save_last={save_last!r} must be one of {SAVE_LAST_MODES}")
    if filename is not None:
        validate_template(filename)
    if storage_options is not None and not isinstance(storage_options, dict):
        raise ConfigurationError(f"storage_options must be a dict, got {type(storage_options).__name__}")
    if when_busy not in ("wait", "skip"):
        raise ConfigurationError(f"when_busy={when_busy!r} must be 'wait' or 'skip'")
    if preemption is not None and not isinstance(preemption, (bool, preemption_type)):
        raise ConfigurationError("preemption must be True, False, None or a Preemption(...)")


def incremental_of(value: Any) -> Any:
    """``incremental=``: an :class:`~lightning_ckpt.incremental.Incremental` (``True``: the defaults) or None."""
    from lightning_ckpt.incremental import Incremental

    if not isinstance(value, (bool, Incremental)):
        raise ConfigurationError(f"incremental={value!r} must be True, False or an Incremental(...)")
    return (Incremental() if value is True else value) or None


@dataclass(frozen=True)
class Schedule:
    """When saves are due: the trigger, and the ModelCheckpoint keywords it stands for (its state key)."""

    trigger: policies.SaveTrigger | None
    budget: policies.OverheadBudget | None
    every_n_epochs: int
    every_n_train_steps: int
    train_time_interval: timedelta | None
    #: whether being due depends on the wall clock (every rank then follows rank 0's decision)
    clocked: bool

    def key_fields(self) -> dict[str, Any]:
        """What joins the callback's state key beyond ModelCheckpoint's fields: a budget, a trigger of ours
        no keyword stands for (by its repr, or its class where the repr holds an address: the key must
        be the same in the process that resumes)."""
        fields: dict[str, Any] = {} if self.budget is None else {"overhead_budget": self.budget.budget}
        if not isinstance(self.trigger, _KEYWORD_TRIGGERS) and self.trigger is not None:
            fields["trigger"] = _stable_name(self.trigger)
        return fields


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _stable_name(trigger: Any) -> str:
    text = repr(trigger)
    if not _ADDRESS.search(text):
        return text
    if isinstance(trigger, policies.AnyOf):
        return f"AnyOf({', '.join(_stable_name(t) for t in trigger.triggers)})"
    return str(type(trigger).__qualname__)


_KEYWORD_TRIGGERS = (policies.EveryNSteps, policies.EveryNEpochs, policies.EveryInterval, policies.OverheadBudget)


def schedule(
    every_n_epochs: int | None,
    every_n_train_steps: int | None,
    train_time_interval: timedelta | None,
    overhead_budget: float | policies.OverheadBudget | None,
    trigger: policies.SaveTrigger | None = None,
) -> Schedule:
    """The save trigger from the keywords, or from ``trigger=`` (then no trigger keyword may be given)."""
    for arg, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ConfigurationError(f"{arg}={value!r} must be a non-negative integer")
    if train_time_interval is not None and not isinstance(train_time_interval, timedelta):
        raise ConfigurationError("train_time_interval must be a datetime.timedelta")
    if trigger is not None:
        given = [name for name, value in (("every_n_epochs", every_n_epochs),
                                          ("every_n_train_steps", every_n_train_steps),
                                          ("train_time_interval", train_time_interval),
                                          ("overhead_budget", overhead_budget)) if value is not None]
        if given:
            raise ConfigurationError(f"trigger={trigger!r} and {' and '.join(given)} both say when to save: "
                                     "pass the policy or the keyword, not both")
        return _from_trigger(trigger)
    budget = overhead_budget if isinstance(overhead_budget, policies.OverheadBudget) or overhead_budget is None \
        else policies.OverheadBudget(overhead_budget)
    chosen = [
        name
        for name, on in (
            ("every_n_epochs", bool(every_n_epochs)),
            ("every_n_train_steps", bool(every_n_train_steps)),
            ("train_time_interval", train_time_interval is not None),
            ("overhead_budget", budget is not None),
        )
        if on
    ]
    if len(chosen) > 1:
        raise ConfigurationError(f"{' and '.join(chosen)} are mutually exclusive: choose one save trigger")
    if every_n_epochs is None:  # as Lightning: 1 only when no other trigger was given at all
        no_other = every_n_train_steps is None and train_time_interval is None and budget is None
        every_n_epochs = 1 if no_other else 0
    chosen_trigger: policies.SaveTrigger | None = budget
    if chosen_trigger is None and every_n_train_steps:
        chosen_trigger = policies.EveryNSteps(every_n_train_steps)
    elif chosen_trigger is None and train_time_interval is not None:
        chosen_trigger = policies.EveryInterval(train_time_interval.total_seconds())
    elif chosen_trigger is None and every_n_epochs:
        chosen_trigger = policies.EveryNEpochs(every_n_epochs)
    return Schedule(chosen_trigger, budget, every_n_epochs, every_n_train_steps or 0, train_time_interval,
                    clocked=train_time_interval is not None or budget is not None)


def _from_trigger(trigger: policies.SaveTrigger) -> Schedule:
    if isinstance(trigger, type) or not (callable(getattr(trigger, "due_on_step", None))
                                         and callable(getattr(trigger, "due_on_epoch", None))):
        raise ConfigurationError(f"trigger={trigger!r} is not a save trigger: it needs due_on_step(step, now, "
                                 "last_save_time) and due_on_epoch(epoch) (see lightning_ckpt.policies)")
    if isinstance(trigger, policies.OverheadBudget):
        return Schedule(trigger, trigger, 0, 0, None, clocked=True)
    if isinstance(trigger, policies.EveryNSteps):
        return Schedule(trigger, None, 0, trigger.n, None, clocked=False)
    if isinstance(trigger, policies.EveryNEpochs):
        return Schedule(trigger, None, trigger.n, 0, None, clocked=False)
    if isinstance(trigger, policies.EveryInterval):
        return Schedule(trigger, None, 0, 0, timedelta(seconds=trigger.seconds), clocked=True)
    # AnyOf or a user's own: every rank follows rank 0's decision, in case it reads the clock
    return Schedule(trigger, _budget_in(trigger), 0, 0, None, clocked=True)


def _budget_in(trigger: policies.SaveTrigger) -> policies.OverheadBudget | None:
    """An :class:`~lightning_ckpt.policies.OverheadBudget` inside ``AnyOf`` still needs each save's cost recorded."""
    if isinstance(trigger, policies.AnyOf):
        budgets = [t for t in trigger.triggers if isinstance(t, policies.OverheadBudget)]
        return budgets[0] if budgets else None
    return None


@dataclass(frozen=True)
class Keeping:
    """What to keep: the retention policy and the ModelCheckpoint keywords it stands for."""

    retention: policies.RetentionPolicy
    monitor: str | None
    mode: str
    save_top_k: int


def keeping(save_top_k: int, monitor: str | None, mode: str, retention: policies.RetentionPolicy | None = None) -> Keeping:
    """The retention policy from ``save_top_k``/``monitor``/``mode``, or from ``retention=``.

    With ``retention=``, ``save_top_k``, ``monitor`` and ``mode`` may stay at their defaults or
    repeat what the policy says; anything else contradicts it.
    """
    if retention is None:
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigurationError(f"save_top_k={save_top_k!r} must be an integer >= -1")
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ConfigurationError(
                f"save_top_k={save_top_k} with monitor=None has no quantity to rank by: "
                "pass monitor=... or use save_top_k in (-1, 0, 1)"
            )
        if save_top_k == -1:
            policy: policies.RetentionPolicy = policies.KeepAll()
        elif monitor is None:
            policy = policies.KeepLatest(save_top_k)
        else:
            policy = policies.KeepTopK(save_top_k, monitor, mode)
        return Keeping(policy, monitor, mode, save_top_k)
    if isinstance(retention, type) or not callable(getattr(retention, "keep", None)):
        raise ConfigurationError(f"retention={retention!r} is not a retention policy: it needs keep(checkpoints) "
                                 "(see lightning_ckpt.policies)")

    def agree(arg: str, given: Any, default: Any, implied: Any) -> None:
        if given != default and given != implied:
            raise ConfigurationError(f"retention={retention!r} and {arg}={given!r} disagree: pass the policy "
                                     "alone (or the keywords alone)")

    if isinstance(retention, policies.KeepTopK):
        agree("save_top_k", save_top_k, 1, retention.k)
        agree("monitor", monitor, None, retention.monitor)
        agree("mode", mode, "min", retention.mode)
        return Keeping(retention, retention.monitor, retention.mode, retention.k)
    if isinstance(retention, policies.KeepLatest):
        agree("save_top_k", save_top_k, 1, retention.n)
        return Keeping(retention, monitor, mode, retention.n)
    if isinstance(retention, policies.KeepAll):
        agree("save_top_k", save_top_k, 1, -1)
        return Keeping(retention, monitor, mode, -1)
    # a union or a user's own policy: every checkpoint it keeps counts as Lightning's top k
    agree("save_top_k", save_top_k, 1, -1)
    return Keeping(retention, monitor, mode, -1)
