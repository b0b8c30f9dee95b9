"""Small checkpoints to test with, and the ways storage and crashes damage them.

:func:`small_payload` is a Lightning-shaped checkpoint dict (weights, an optimizer with state, a
scheduler, hyperparameters) small enough for any test; the ``saved`` fixture (tests/conftest.py)
commits one. :func:`flip_byte`, :func:`truncate` and :func:`leave_pending` damage a stored one.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_ckpt import Storage


def small_payload(step: int = 8) -> dict[str, Any]:
    """What ``Trainer.save_checkpoint`` writes, in miniature: 2 weight tensors (15 float32 values)."""
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "epoch": 1, "global_step": step, "pytorch-lightning_version": "2.6.6",
        "state_dict": {"net.weight": w, "net.bias": torch.zeros(3)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3, 4)}},
                              "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
        "lr_schedulers": [{"step_size": 3, "last_epoch": 1, "_last_lr": [0.1]}],
        "hyper_parameters": {"hidden": 4},
    }  # fmt: skip


def flip_byte(url: str, name: str) -> None:
    """Invert the middle byte of ``name`` (same size, different digest)."""
    storage = Storage(url)
    data = bytearray(storage.read_bytes(name))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(name, bytes(data))


def truncate(url: str, name: str) -> None:
    """Keep the first 100 bytes of ``name``."""
    storage = Storage(url)
    storage.write_bytes(name, storage.read_bytes(name)[:100])


def leave_pending(url: str, name: str = "epoch=9-step=80.ckpt") -> None:
    """What a save killed between payload and manifest leaves behind."""
    storage = Storage(url)
    storage.write_bytes(name + ".pending", b'{"name": "x", "started": 0}')
    storage.write_bytes(name, b"half a checkpoint")
