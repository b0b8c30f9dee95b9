"""Every pickle this package reads, read so that it cannot run code.

Two kinds of pickle reach us from storage. A payload (``torch.save``'s zip archive) is loaded by
``torch.load(weights_only=True)``; when torch refuses one, :func:`refused_global` decides *why*
by scanning the archive's pickles with an unpickler that constructs nothing -- so an object that
would run code is an :class:`~lightning_ckpt.errors.UnsafeCheckpointError` whatever torch's
message says, and a merely damaged pickle stays a
:class:`~lightning_ckpt.errors.CorruptCheckpointError`. A sharded checkpoint's ``.metadata`` is
DCP's index, a plain pickle that DCP's own reader unpickles with any global; :func:`dcp_reader`
returns DCP's reader (built by :mod:`lightning_ckpt.storage.dcp`) with that one read replaced by :func:`load_dcp_metadata`, an
unpickler that resolves only an allow-list of DCP's metadata classes and torch's dtypes, and
whose index may name only plain file names of the checkpoint's own directory. DCP stores every
non-tensor value (an optimizer's ``param_groups``, any object) as a ``torch.save`` blob that its
load planners read with ``torch.load(weights_only=False)``; :func:`dcp_planner` returns a planner
that loads them weights-only instead.

(``torch.distributed``'s object collectives also unpickle, but only what the job's own ranks
sent over its own process group; nothing from storage travels through them.)

Owns: every unpickling of bytes from storage and its allow-lists. Must not: check digests or
signatures (:mod:`lightning_ckpt.integrity` does) or decide what to do with the objects it returns.
"""

from __future__ import annotations

import pickle
import zipfile
from typing import IO, Any

from lightning_ckpt.errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["dcp_planner", "dcp_reader", "load_dcp_metadata", "refused_global"]

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_EXTRA = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}


def _dcp_global(module: str, name: str) -> Any:
    """The object an allowed DCP metadata global names, or ``None`` (refused)."""
    import torch

    if module == _METADATA_MODULE and not name.startswith("__"):
        import torch.distributed.checkpoint.metadata as metadata

        value = getattr(metadata, name, None)
        # the module's own classes (dataclasses and the memory-format enum), nothing it imports
        return value if isinstance(value, type) and value.__module__ == _METADATA_MODULE else None
    if module == "torch":
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
    if (module, name) in _DCP_EXTRA:
        import importlib

        return getattr(importlib.import_module(module), name, None)
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        value = _dcp_global(module, name)
        if value is None:
            raise _Refused(f"{module}.{name}")
        return value


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list (the unpickling stops before anything is called)."""


def load_dcp_metadata(stream: IO[bytes], where: str) -> Any:
    """DCP's ``Metadata`` from ``stream``, resolving only DCP's metadata classes and torch dtypes."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(stream).load()
    except _Refused as exc:
        raise UnsafeCheckpointError(
            f"{where} names {exc}, which is not a DCP metadata class: refusing to unpickle it (code could run)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure of a pickle is a damaged file
        raise CorruptCheckpointError(f"{where} is not DCP metadata: {type(exc).__name__}: {exc}") from None
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(f"{where} is not DCP metadata (it holds a {type(metadata).__name__})")
    return metadata


def _check_storage_data(metadata: Any, where: str, files: Any) -> None:
    """Every file DCP's index points into is a plain name in the checkpoint's directory (one of
    ``files`` when known), at a sane offset: never ``/etc/...``, ``../..``, a URL or a hidden file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise CorruptCheckpointError(f"{where} has no index of its shard files")
    for info in storage.values():
        if not isinstance(info, _StorageInfo):
            raise CorruptCheckpointError(f"{where} indexes a {type(info).__name__}, not a shard location")
        path, offset, length = info.relative_path, info.offset, info.length
        if (not isinstance(path, str) or not path or "/" in path or "\\" in path or ":" in path
                or path.startswith(".") or (files is not None and path not in files)):
            raise CorruptCheckpointError(f"{where} points into {path!r}, not a shard file of this checkpoint")
        for value in (offset, length):
            if type(value) is not int or not 0 <= value < 1 << 62:
                raise CorruptCheckpointError(f"{where} has a shard offset or length of {value!r}")
    _check_tensor_sizes(metadata, where, files)
    # where each item goes in the state dict: keys and list indices (a huge index would pad a list)
    planner_data = getattr(metadata, "planner_data", None)
    if planner_data is not None:
        if not isinstance(planner_data, dict):
            raise CorruptCheckpointError(f"{where} has a junk state-dict layout")
        for keys in planner_data.values():
            if not isinstance(keys, (tuple, list)) or not all(
                    isinstance(k, str) or (type(k) is int and 0 <= k < 1 << 20) for k in keys):
                raise CorruptCheckpointError(f"{where} has a junk state-dict layout")


def _check_tensor_sizes(metadata: Any, where: str, files: Any) -> None:
    """Every tensor is covered by its chunks, and together they fit in the checkpoint's files: a
    forged index claiming a 100 GiB tensor would otherwise be allocated (and exported) whole."""
    import math

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise CorruptCheckpointError(f"{where} has no index of its items")
    total = 0
    for fqn, md in entries.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        try:
            size = tuple(md.size)
            itemsize = md.properties.dtype.itemsize
            chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]
            ok = all(type(n) is int and n >= 0 for n in size) and all(
                len(o) == len(z) == len(size) and all(type(a) is int and type(b) is int and a >= 0 and b >= 0
                                                      and a + b <= n for a, b, n in zip(o, z, size))
                for o, z in chunks)
        except (AttributeError, TypeError) as exc:
            raise CorruptCheckpointError(f"{where} has a junk entry for {fqn!r}: {exc}") from None
        numel = math.prod(size)
        if not ok or sum(math.prod(z) for _, z in chunks) != numel:
            raise CorruptCheckpointError(f"{where}: the chunks of {fqn!r} do not cover its size {list(size)}")
        total += numel * itemsize
    if files is not None:
        stored = sum(int(info["size"]) for info in files.values())
        if total > stored:
            raise CorruptCheckpointError(
                f"{where} claims {total} bytes of tensors, more than the {stored} bytes of its files")


def dcp_reader(target: str, options: dict[str, Any], files: Any = None) -> Any:
    """DCP's reader for ``target`` (:func:`lightning_ckpt.storage.dcp.reader`) whose ``.metadata``
    is read by :func:`load_dcp_metadata` and must describe only ``files`` (when given).

    A metadata error is kept on the reader as ``error`` (DCP would swallow it), for the caller.
    """
    from lightning_ckpt.storage import dcp

    def read(open_file: Any, path: str) -> Any:
        with open_file(path) as f:
            metadata = load_dcp_metadata(f, f"{target}/.metadata")
        _check_storage_data(metadata, f"{target}/.metadata", files)
        return metadata

    return dcp.reader(target, options, read)


def dcp_planner(target: str, everything: bool = False) -> Any:
    """A DCP load planner (the default one, or with ``everything`` the one that loads every item
    into an empty state dict) whose non-tensor blobs are loaded weights-only: a blob that would
    run code is an :class:`UnsafeCheckpointError` (kept on the planner as ``error``, as DCP wraps
    what a planner raises), never executed."""
    import io as _io

    import torch
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    base = _EmptyStateDictLoadPlanner if everything else DefaultLoadPlanner

    class WeightsOnlyPlanner(base):  # type: ignore[misc, valid-type]
        error: BaseException | None = None

        def load_bytes(self, read_item: Any, value: IO[bytes]) -> None:
            where = f"{target} (item {read_item.dest_index.fqn!r})"
            try:
                data = value.read()
                try:
                    obj = torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
                except Exception as exc:
                    refused = refused_global(_io.BytesIO(data))
                    if refused is not None:
                        raise UnsafeCheckpointError(
                            f"{where} holds objects that weights-only loading refuses (global {refused})") from None
                    raise CorruptCheckpointError(f"{where} is not readable: {type(exc).__name__}: {exc}") from None
                # what DefaultLoadPlanner.load_bytes does with the object, minus its torch.load
                if self.flatten_state_dict:
                    set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
                else:
                    self.state_dict[read_item.dest_index.fqn] = obj
            except BaseException as exc:
                if self.error is None:
                    self.error = exc
                raise

    return WeightsOnlyPlanner()


# -- payloads: why did weights-only loading refuse? -------------------------------------------


class _Stub:
    """Stands in for every object while scanning: accepts anything, constructs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Scanner(pickle.Unpickler):
    def __init__(self, file: IO[bytes], allowed: frozenset[str] | None) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if self._allowed is None or full not in self._allowed:
            raise _Refused(full)
        return _Stub

    def persistent_load(self, pid: Any) -> Any:
        return _Stub()


def _weights_only_globals() -> frozenset[str] | None:
    """The globals torch's weights-only unpickler accepts (``None`` if torch no longer says)."""
    try:
        from torch import _weights_only_unpickler as wo

        return frozenset(wo._get_allowed_globals()) | frozenset(wo._get_user_allowed_globals())
    except (ImportError, AttributeError, TypeError):  # a private API: fall back to "refuse all"
        return None


def refused_global(file: IO[bytes]) -> str | None:
    """The first global in the pickles of payload ``file`` that weights-only loading refuses.

    ``None`` when every global is allowed (a refusal then means damage, not danger). Scans every
    ``*.pkl`` of a zip archive, or the pickles of the legacy format, without building anything.
    """
    allowed = _weights_only_globals()
    try:
        file.seek(0)
        streams: list[IO[bytes]] = []
        if zipfile.is_zipfile(file):
            file.seek(0)
            archive = zipfile.ZipFile(file)
            streams = [archive.open(info) for info in archive.infolist() if info.filename.endswith(".pkl")]
        else:
            file.seek(0)
            streams = [file]
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    for stream in streams:
        for _ in range(8):  # the legacy format is a few pickles in a row
            try:
                _Scanner(stream, allowed).load()
            except _Refused as exc:
                return str(exc)
            except Exception:  # noqa: BLE001 - damage ends this stream's scan
                break
            if stream is not file:
                break
    return None

