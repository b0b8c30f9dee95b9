"""What exact resume needs from PyTorch alone: stateful data loaders and structure checks.

A plain ``DataLoader`` cannot say where it is inside an epoch, so a mid-epoch resume would start
the epoch's data over (or on a new shuffle). :func:`make_stateful` rebuilds it as torchdata's
``StatefulDataLoader`` with identical arguments: same sampler semantics, same batches, and a
``state_dict()`` that Lightning stores in its loop state and restores before iterating, so the
resumed run continues with the next batch of the same permutation (workers included) without
recomputing the consumed ones. :func:`model_mismatch` and :func:`optimizer_mismatch` name what
differs between a checkpoint and the objects it is about to be loaded into.

Owns: loader conversion and structure checks. Must not: import Lightning or read storage.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from lightning_ckpt.rng import capture_rng, restore_rng

__all__ = ["ResumableRandomSampler", "WorkerRandomState", "adapt_optimizer_states", "is_stateful", "loader_generators",
           "make_stateful", "model_mismatch", "optimizer_mismatch"]

_PASSTHROUGH = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                "multiprocessing_context", "generator", "persistent_workers", "pin_memory_device", "in_order")


def is_stateful(loader: Any) -> bool:
    """Whether ``loader`` can report and restore its position (Lightning's ``_Stateful``)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def loader_generators(combined: Any) -> list[torch.Generator]:
    """The distinct ``torch.Generator``s the train loaders draw from, in a stable order.

    ``DataLoader(generator=g)`` draws each iterator's worker seed from ``g`` and shuffles with it;
    a sampler or batch sampler may hold its own. None of them is a process-wide stream, so exact
    resume stores them beside :func:`~lightning_ckpt.rng.capture_rng`'s.
    """
    found: list[torch.Generator] = []
    for loader in getattr(combined, "flattened", None) or []:
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found


def make_stateful(loaders: Any) -> Any:
    """Plain ``DataLoader``s (also inside lists, tuples, dicts) rebuilt as ``StatefulDataLoader``s.

    Anything that is already stateful, a ``DataLoader`` subclass (it may carry behaviour we would
    lose), or over an ``IterableDataset`` (its position lives in the dataset) is returned as is.
    """
    if isinstance(loaders, Mapping):
        return type(loaders)({k: make_stateful(v) for k, v in loaders.items()})  # type: ignore[call-arg]
    if isinstance(loaders, (list, tuple)):
        return type(loaders)(make_stateful(v) for v in loaders)
    if type(loaders) is not DataLoader or isinstance(loaders.dataset, IterableDataset):
        return loaders
    kwargs: dict[str, Any] = {k: getattr(loaders, k) for k in _PASSTHROUGH if hasattr(loaders, k)}
    dataset = loaders.dataset
    if loaders.num_workers > 0:
        kwargs["prefetch_factor"] = loaders.prefetch_factor
        if not is_stateful(dataset):
            dataset = WorkerRandomState(dataset)
    if loaders.batch_size is None:  # a user-supplied batch_sampler
        kwargs["batch_sampler"] = loaders.batch_sampler
    else:
        kwargs.update(batch_size=loaders.batch_size, drop_last=loaders.drop_last)
        sampler = loaders.sampler
        if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
            # torchdata's own RandomSampler would shuffle differently from torch's: keep torch's order
            kwargs["sampler"] = ResumableRandomSampler(sampler.data_source, generator=sampler.generator)
        elif type(sampler) is not SequentialSampler:
            kwargs["sampler"] = sampler
    return stateful_loader_class()(dataset, **kwargs)


@functools.cache
def stateful_loader_class() -> type:
    """torchdata's ``StatefulDataLoader``, quiet about a deprecated torch call its constructor makes.

    Its ``__init__`` calls ``torch.set_vital``, which torch deprecated with a warning on every
    call; the call is torchdata's, not the user's, so this subclass (same name, same signature)
    filters exactly that warning -- also when Lightning re-instantiates the loader, e.g. with a
    ``DistributedSampler``. Create it before Lightning requests the loader (the callback's
    ``setup``), so Lightning records its arguments like any ``DataLoader`` subclass's.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    @functools.wraps(StatefulDataLoader.__init__)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            StatefulDataLoader.__init__(self, *args, **kwargs)

    return type("StatefulDataLoader", (StatefulDataLoader,), {
        "__init__": __init__, "__module__": __name__, "__doc__": stateful_loader_class.__doc__})


class WorkerRandomState(Dataset):
    """A map-style dataset whose loader workers' random streams travel with the loader's state.

    torchdata snapshots a stateful dataset's ``state_dict()`` inside each worker, batch by batch,
    and restores it in the worker after seeding it: so augmentations drawn in workers continue
    where they stopped instead of restarting from the worker seed.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng(plain=True)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("rng"):
            restore_rng(state["rng"])


class ResumableRandomSampler(RandomSampler):
    """torch's ``RandomSampler`` (same permutation for the same RNG state) that can resume.

    Like torch's, each epoch's permutation is seeded when iteration starts, from ``generator`` or
    the global torch RNG; ``state_dict()`` records that seed and how many indices were handed out,
    so after ``load_state_dict()`` the next iteration continues the same permutation.
    """

    def __init__(self, data_source: Any, generator: torch.Generator | None = None) -> None:
        super().__init__(data_source, generator=generator)
        self._epoch_state: torch.Tensor | int | None = None
        self._yielded = 0
        self._resume: tuple[torch.Tensor | int, int] | None = None

    def __iter__(self) -> Any:
        n = len(self.data_source)
        if self._resume is not None:
            start_state, skip = self._resume
            self._resume = None
        else:
            # exactly what torch's RandomSampler draws: a seed from the global RNG, or nothing
            # (the permutation then comes straight from the user's generator)
            start_state = (self.generator.get_state() if self.generator is not None
                           else int(torch.empty((), dtype=torch.int64).random_().item()))
            skip = 0
        if isinstance(start_state, torch.Tensor):
            assert self.generator is not None
            self.generator.set_state(start_state)
            generator = self.generator
        else:
            generator = torch.Generator().manual_seed(start_state)
        self._epoch_state, self._yielded = start_state, skip
        for index in torch.randperm(n, generator=generator).tolist()[skip:]:
            self._yielded += 1
            yield index

    def state_dict(self) -> dict[str, Any]:
        return {"start": self._epoch_state, "yielded": self._yielded}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        start, yielded = state.get("start"), int(state.get("yielded", 0))
        if start is not None and 0 <= yielded < len(self.data_source):
            self._resume = (start, yielded)


def model_mismatch(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, Any], strict: bool = True
) -> list[str]:
    """Human-readable differences between a model's state_dict and a checkpoint's."""
    problems = []
    if strict:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        if missing:
            problems.append(f"missing from the checkpoint: {_few(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_few(unexpected)}")
    for key in sorted(set(expected) & set(found)):
        have, got = expected[key], found[key]
        if isinstance(have, torch.Tensor) and isinstance(got, torch.Tensor) and have.shape != got.shape:
            problems.append(f"{key}: checkpoint {tuple(got.shape)}, model {tuple(have.shape)}")
    return problems


def optimizer_mismatch(
    optimizers: Sequence[torch.optim.Optimizer],
    states: Sequence[Mapping[str, Any]],
    names: Mapping[int, str] | None = None,
) -> list[str]:
    """Differences between live optimizers and the optimizer states of a checkpoint.

    ``names`` maps ``id(parameter)`` to its module path, for readable messages.
    """
    names = names or {}
    if len(optimizers) != len(states):
        return [f"the checkpoint has {len(states)} optimizer(s), the model configures {len(optimizers)}"]
    problems = []
    for i, (opt, state) in enumerate(zip(optimizers, states)):
        groups = state.get("param_groups", [])
        if len(groups) != len(opt.param_groups):
            problems.append(f"optimizer {i}: checkpoint has {len(groups)} parameter groups, "
                            f"the optimizer {len(opt.param_groups)}")
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        ids = [pid for g in groups for pid in g.get("params", [])]
        for j, (g_ckpt, g_live) in enumerate(zip(groups, opt.param_groups)):
            if len(g_ckpt.get("params", [])) != len(g_live["params"]):
                problems.append(f"optimizer {i}, group {j}: checkpoint has {len(g_ckpt.get('params', []))} "
                                f"parameters, the optimizer {len(g_live['params'])}")
        if problems:
            continue
        per_param = state.get("state", {})
        for pid, param in zip(ids, params):
            for key, value in per_param.get(pid, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    label = names.get(id(param), f"parameter {pid}")
                    problems.append(f"optimizer {i}, {label} {key}: checkpoint {tuple(value.shape)}, "
                                    f"parameter {tuple(param.shape)}")
    return problems


def adapt_optimizer_states(optimizers: Sequence[torch.optim.Optimizer], states: Sequence[Mapping[str, Any]]
                           ) -> list[str]:
    """Make optimizer states saved on a GPU loadable by ``optimizers`` on the CPU, in place.

    ``capturable=True`` (CUDA graphs) is saved in each parameter group, and torch's
    ``load_state_dict`` puts it back over the live optimizer's setting; its ``step`` then refuses
    CPU parameters. Where the live group has CPU parameters and ``capturable=False``, the saved
    group takes the live setting. Returns a note for each change.
    """
    notes = []
    for i, (opt, state) in enumerate(zip(optimizers, states)):
        for j, (saved, live) in enumerate(zip(state.get("param_groups", []), opt.param_groups)):
            if isinstance(saved, dict) and saved.get("capturable") and not live.get("capturable", False) and any(
                p.device.type == "cpu" for p in live["params"]
            ):
                saved["capturable"] = False
                notes.append(f"optimizer {i}, group {j} was saved with capturable=True (on a GPU); its parameters "
                             "are on the CPU here, so it resumes with capturable=False, as configured")
    return notes


def _few(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
