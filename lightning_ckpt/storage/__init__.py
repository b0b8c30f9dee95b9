"""Storage: the only package that talks to fsspec.

:class:`Storage` (:mod:`.facade`) is what the rest of lightning_ckpt uses: one directory URL with
crash-safe writes and honest errors. Underneath, :mod:`.retry` owns retries and error
translation, :mod:`.uploads` the object-store writers, :mod:`.reads` opening and streaming, :mod:`.sources`
fetching a payload into an open, checked file, and
:mod:`.base` the shared names. Nothing outside this package imports fsspec or reaches the
filesystem object itself.
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
