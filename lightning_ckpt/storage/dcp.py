"""DCP's fsspec reader and writer, the one place torch's private ``_fsspec_filesystem`` is reached.

A sharded checkpoint's files are written and read by DCP (``torch.distributed.checkpoint``)
itself, through its ``FsspecWriter`` / ``FsspecReader``: they live in the private module
``torch.distributed.checkpoint._fsspec_filesystem`` and hold an fsspec filesystem, so they belong
to the storage package. :func:`writer` builds DCP's writer for a directory URL; :func:`reader`
builds its reader with the metadata read handed to the caller (who unpickles it safely) and every
file DCP will open checked first: a local FIFO or device among them would hang DCP, so a local
file is opened only when it is regular. ``tests/test_storage.py`` pins the private names used.

Owns: DCP's fsspec-backed I/O objects and how the files DCP reads are opened. Must not: unpickle
anything (:mod:`lightning_ckpt.unpickle` reads the metadata), verify digests or commit anything
(:mod:`lightning_ckpt.sharded` and :mod:`lightning_ckpt.commit`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from lightning_ckpt.storage.facade import Storage
from lightning_ckpt.storage.reads import open_regular

__all__ = ["reader", "writer"]

#: ``read(open_file, path)`` -> DCP ``Metadata``: reads ``.metadata`` at ``path`` with ``open_file``.
MetadataRead = Callable[[Callable[[str], IO[bytes]], str], Any]


def _fsspec_filesystem() -> Any:
    from torch.distributed.checkpoint import _fsspec_filesystem

    return _fsspec_filesystem


def writer(target: str, options: dict[str, Any]) -> Any:
    """DCP's ``FsspecWriter`` for the directory URL ``target``."""
    return _fsspec_filesystem().FsspecWriter(target, **options)


def reader(target: str, options: dict[str, Any], read_metadata: MetadataRead) -> Any:
    """DCP's ``FsspecReader`` for ``target`` whose ``.metadata`` is read by ``read_metadata``.

    DCP swallows an exception raised while reading metadata into an ``AssertionError`` of its
    own; ours is kept on the reader as ``error``, for the caller to raise instead.
    """
    from torch.distributed.checkpoint.metadata import StorageMeta

    local = Storage(target, options).is_local

    class CheckedReader(_fsspec_filesystem().FsspecReader):  # type: ignore[misc]
        error: BaseException | None = None

        def _open(self, path: str) -> IO[bytes]:
            return open_regular(path) if local else self.fs.create_stream(path, "rb")

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = str(self._get_metadata_path(kwargs.get("rank")))
            try:
                metadata = read_metadata(self._open, path)
                if local:  # DCP opens the shard files itself: a FIFO among them would hang it
                    for shard in {info.relative_path for info in metadata.storage_data.values()}:
                        open_regular(f"{path.rsplit('/', 1)[0]}/{shard}").close()
            except BaseException as exc:
                if self.error is None:
                    self.error = exc
                raise
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedReader(target, **options)
