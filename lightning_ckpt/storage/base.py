"""The storage package's shared vocabulary: file names, listings, progress callbacks.

Owns :class:`FileInfo`, :func:`split_url`, the ``Progress`` callback type and :data:`TEMP_MARK`.
Must not do any I/O or import fsspec: every other storage module builds on these names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lightning_ckpt import layout
from lightning_ckpt.errors import ConfigurationError

__all__ = ["FileInfo", "split_url"]

#: ``progress(bytes_done, bytes_total_or_None)``, called at block granularity during a transfer.
Progress = Callable[[int, "int | None"], None]

#: Every temporary file this package creates contains this mark (and its writer), so leftovers
#: are provably ours; checkpoint names may not contain it (:func:`lightning_ckpt.layout.check_name`).
TEMP_MARK = layout.TEMP_MARK

#: block size of streamed reads and generic fsspec writes
CHUNK = 8 * 2**20


@dataclass(frozen=True)
class FileInfo:
    """One entry of a directory listing (name relative to the storage root)."""

    name: str
    size: int
    #: modification time where the backend reports one cheaply (local disks), else None
    mtime: float | None = None


def split_url(url: str) -> tuple[str, str]:
    """Split a file URL into (directory URL, file name)."""
    given, url = str(url), str(url).rstrip("/")
    head, _, name = url.rpartition("/")
    if not name or not head and given.startswith(name + "//"):  # "memory://": a store's root, not a file "memory:"
        raise ConfigurationError(f"{given!r} does not name a file")
    if not head:
        head = "."
    elif head.endswith((":/", ":")):  # "memory://x" -> ("memory://", "x")
        head = url[: len(url) - len(name)]
    return head, name
