"""Every random stream of the process, captured and restored in a weights-only-safe form.

Python's ``random``, NumPy's legacy global generator, torch's CPU generator and every CUDA
device's generator. DataLoader workers derive their seeds from torch's CPU generator when their
iterator is created, so restoring it also restores the seeds of workers started afterwards.
The captured state holds only tensors, ints, floats, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``. CUDA states saved on a GPU machine are skipped, with a note in
the log, where this process has no CUDA (a GPU checkpoint resumed on a CPU-only machine).

Owns: capture and restore of the streams. Must not: decide when they are restored (the callback does).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

__all__ = ["capture_rng", "restore_rng"]

log = logging.getLogger("lightning_ckpt")


def capture_rng(plain: bool = False) -> dict[str, Any]:
    """A snapshot of every random stream of this process.

    ``plain=True`` gives lists instead of tensors, for states that travel between processes
    inside structures that are compared element-wise (torchdata's worker states).
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
        keys = np.asarray(keys, dtype=np.int64)
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    if plain:
        state = _to_plain(state)
    return state


def _to_plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)


def restore_rng(state: dict[str, Any]) -> None:
    """Put every random stream back where :func:`capture_rng` found it."""
    py = state.get("python")
    if py is not None:
        internal = py["state"].tolist() if isinstance(py["state"], torch.Tensor) else py["state"]
        random.setstate((py["version"], tuple(int(v) for v in internal), py["gauss"]))
    if "torch" in state:
        torch.set_rng_state(_tensor(state["torch"], torch.uint8))
    np_state = state.get("numpy")
    if np_state is not None:
        import numpy as np

        keys = np.asarray(_tensor(np_state["keys"], torch.int64).numpy(), dtype=np.uint32)
        np.random.set_state((np_state["kind"], keys, np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
    cuda = state.get("cuda")
    if not cuda:
        return
    if not torch.cuda.is_available():
        log.info("lightning-ckpt: the checkpoint holds the random states of %d CUDA device(s), but CUDA is not "
                 "available here: those are not restored (the CPU, Python and NumPy ones are)", len(cuda))
        return
    here = torch.cuda.device_count()
    if len(cuda) != here:
        log.info("lightning-ckpt: the checkpoint holds the random states of %d CUDA device(s), this process sees "
                 "%d: restoring the first %d", len(cuda), here, min(len(cuda), here))
    torch.cuda.set_rng_state_all([_tensor(c, torch.uint8) for c in cuda[:here]])
