"""Every random stream of the process, captured and restored in a weights-only-safe form.

Python's ``random``, NumPy's legacy global generator, torch's CPU generator and every CUDA
device's generator. DataLoader workers derive their seeds from torch's CPU generator when their
iterator is created, so restoring it also restores the seeds of workers started afterwards.
The captured state holds only tensors, ints, floats, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """A snapshot of every random stream of this process."""
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
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put every random stream back where :func:`capture_rng` found it."""
    py = state.get("python")
    if py is not None:
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    np_state = state.get("numpy")
    if np_state is not None:
        import numpy as np

        np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
