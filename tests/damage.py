"""Damage a stored checkpoint the way storage and crashes do: a flipped byte, a cut file, a half save."""

from __future__ import annotations

from lightning_ckpt import Storage


def flip_byte(url: str, name: str) -> None:
    """Invert the middle byte of ``name`` (same size, different sha256)."""
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
