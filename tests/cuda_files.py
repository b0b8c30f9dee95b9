"""Checkpoint files as a GPU machine writes them, made on a machine without one.

``torch.save`` records, for every storage, the location string that
``torch.serialization.location_tag`` returns (``"cuda:0"`` for a tensor on the first GPU) in the
persistent id ``("storage", <dtype>Storage, key, location, numel)`` inside ``data.pkl``; the bytes
of a CUDA storage are copied to the host and written exactly as a CPU storage's are. So a file
saved while :func:`saved_on_cuda` makes ``location_tag`` answer ``"cuda:0"`` is, record for
record, the file a GPU box writes for tensors on ``cuda:0``: loading it here without a
``map_location`` fails with torch's own "Attempting to deserialize object on a CUDA device".

By default every storage is tagged, the harder case: a GPU box keeps a few tensors on the CPU
(random states, Adam's ``step``), and a loader that copes with all of them on CUDA copes with those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.serialization


@contextlib.contextmanager
def saved_on_cuda(device: str = "cuda:0", select: Callable[[Any], bool] | None = None) -> Iterator[None]:
    """While active, ``torch.save`` records storages (those ``select`` accepts) as on ``device``."""
    original = torch.serialization.location_tag

    def location_tag(storage: Any) -> str:
        return device if select is None or select(storage) else original(storage)

    torch.serialization.location_tag = location_tag
    try:
        yield
    finally:
        torch.serialization.location_tag = original


def storage_locations(path: Any) -> dict[str, str]:
    """``{key path: recorded location}`` for every tensor of the ``torch.save`` file at ``path``."""
    seen: dict[int, str] = {}

    def record(storage: Any, location: str) -> Any:
        seen[storage.data_ptr()] = location
        return storage

    obj = torch.load(path, map_location=record, weights_only=True)
    return {key: seen[t.untyped_storage().data_ptr()] for key, t in _tensors(obj, "")}


def _tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}/{i}")


def all_tensors(value: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a nested checkpoint, with its key path."""
    return list(_tensors(value, ""))
