"""Storage: the only package that talks to fsspec.

:class:`Storage` (:mod:`.facade`) is what the rest of lightning_ckpt uses: one directory URL with
crash-safe writes, honest errors, and :meth:`Storage.fetch`, which hands the manager a payload
opened (local) or spooled (remote) and checked against an expected size and digest. Underneath:

- :mod:`.backends` -- the :class:`~.backends.Backend` protocol, chosen once per ``Storage`` by
  :func:`~.backends.choose`; local disks and generic fsspec filesystems;
- :mod:`.objectstores` -- S3, GCS and Azure Blob (ranged downloads, our uploads, leftovers);
- :mod:`.retry` -- retries and error translation, for every call;
- :mod:`.uploads` -- the S3/Azure parallel writers and the stream wrappers of every write;
- :mod:`.reads` -- opening regular files only, block and ranged reads;
- :mod:`.sources` -- fetching into an open, checked :class:`~.sources.Source`; memfds, spools;
- :mod:`.dcp` -- DCP's fsspec reader and writer for sharded checkpoints (torch's private module);
- :mod:`.base` -- the shared names (``FileInfo``, ``split_url``, ``Progress``).

Owns: every use of fsspec. Nothing outside this package imports fsspec or reaches the filesystem
object itself; code inside it must not know the commit protocol (it takes only the temporary
names from :mod:`lightning_ckpt.layout`) or what a checkpoint contains.
"""

from __future__ import annotations

from lightning_ckpt.storage.base import TEMP_MARK, FileInfo, Progress, split_url
from lightning_ckpt.storage.facade import Storage
from lightning_ckpt.storage.reads import RANGE_SIZE, open_regular
from lightning_ckpt.storage.retry import RetryPolicy, is_transient
from lightning_ckpt.storage.sources import Expected, Hasher, Source
from lightning_ckpt.storage.uploads import (
    GCS_CHUNK,
    PART_GROWTH_EVERY,
    PART_SIZE,
    PARTS_IN_FLIGHT,
    S3_MAX_PART,
    S3_MAX_PARTS,
    S3_MIN_PART,
    part_size,
)

__all__ = [
    "GCS_CHUNK",
    "PARTS_IN_FLIGHT",
    "PART_GROWTH_EVERY",
    "PART_SIZE",
    "RANGE_SIZE",
    "S3_MAX_PART",
    "S3_MAX_PARTS",
    "S3_MIN_PART",
    "TEMP_MARK",
    "Expected",
    "FileInfo",
    "Hasher",
    "Progress",
    "RetryPolicy",
    "Source",
    "Storage",
    "is_transient",
    "open_regular",
    "part_size",
    "split_url",
]
