"""``export``: a checkpoint materialised as one standalone file (safetensors, a torch state dict, or a whole .ckpt).

Owns :func:`export` (the API behind ``lightning-ckpt export``): read a checkpoint's verified
payload through the manager (a sharded one consolidated), optionally cast its floating tensors,
and write one ordinary file that needs no lightning-ckpt to read. It refuses to write over a
committed checkpoint or any file of the commit protocol (a manifest, a marker, a version), so an
export can never damage a run. It must not write anything but the output file, must not touch
storage internals (the output goes through :class:`~lightning_ckpt.storage.Storage`), and must not
import torch at module level.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_ckpt.errors import ConfigurationError
from lightning_ckpt.integrity import manifest_name
from lightning_ckpt.layout import check_name
from lightning_ckpt.summary import _plain, _state_dict, committed_manifest, load_payload, open_checkpoint

if TYPE_CHECKING:
    import torch

    from lightning_ckpt.integrity import Manifest
    from lightning_ckpt.manager import CheckpointManager
    from lightning_ckpt.security import Encryptor, Signer
    from lightning_ckpt.storage import Storage

__all__ = ["DTYPES", "FORMATS", "ExportResult", "export"]

#: ``safetensors``: the weights (``state_dict``) with epoch/step/source metadata; ``torch``: the
#: weights as a plain ``torch.save`` dict; ``ckpt``: the whole checkpoint dict (weights, optimizer,
#: loops...) as one ordinary ``.ckpt`` file that ``torch.load``/``Trainer.fit(ckpt_path=...)`` read
FORMATS = ("safetensors", "torch", "ckpt")
#: what ``dtype=`` casts floating tensors to (the weights formats only)
DTYPES = ("float16", "bfloat16", "float32")
_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: the output URL, its format, and the tensors it holds."""

    url: str
    format: str
    tensors: int
    #: bytes of tensor data in the ``state_dict`` written (after any cast)
    bytes: int
    dtype: str | None = None


def export(
    source: str,
    output: str,
    *,
    format: str = "safetensors",
    dtype: str | None = None,
    storage_options: dict[str, Any] | None = None,
    signer: Signer | None = None,
    encryptor: Encryptor | None = None,
    manager: CheckpointManager | None = None,
) -> ExportResult:
    """Write the checkpoint at ``source`` to ``output`` as one standalone file; see :data:`FORMATS`.

    ``source`` is a checkpoint file URL (``storage_options``, ``signer`` and ``encryptor`` as for
    :class:`~lightning_ckpt.manager.CheckpointManager`), or a checkpoint name in ``manager``'s
    directory when ``manager`` is given. Its payload is verified and loaded weights-only first (a
    sharded checkpoint: every shard, consolidated on the CPU). ``output`` is any path or fsspec
    URL (written with ``storage_options``), all or nothing. ``dtype`` (one of :data:`DTYPES`)
    casts floating tensors of the weights formats.

    Raises :class:`~lightning_ckpt.errors.ConfigurationError` for an unknown format or dtype, a
    checkpoint that holds no tensors, or an ``output`` that is a committed checkpoint or a file of
    lightning-ckpt's commit protocol (never overwritten); the manager's errors for a checkpoint that
    is missing, does not verify, or needs a key that is not given.
    """
    if format not in FORMATS:
        raise ConfigurationError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype is not None and (dtype not in DTYPES or format == "ckpt"):
        raise ConfigurationError(f"dtype must be one of {', '.join(DTYPES)} and only with a weights format "
                                 f"(safetensors, torch), got dtype={dtype!r} with format={format!r}")
    if not output or output.endswith("/"):  # "out/", "s3://bucket/", "memory://": no file named
        raise ConfigurationError(f"output must name a file, not a directory: {output!r}")
    import torch

    from lightning_ckpt.manager import CheckpointManager
    from lightning_ckpt.storage import split_url

    manager, name = open_checkpoint(source, manager, storage_options, signer, encryptor)
    manifest = committed_manifest(manager, name)
    payload = load_payload(manager, name, manifest)
    weights = _state_dict(payload) if isinstance(payload, Mapping) else None
    if weights is None:
        raise ConfigurationError(f"{manager.url_of(name)} holds no tensors to export")
    out_dir, out_name = split_url(output)
    target = _writable_target(CheckpointManager(out_dir, storage_options), out_name)
    if format == "ckpt":
        with target.open_write(out_name) as f:
            torch.save(payload, f)
    else:
        weights = _for_export(weights, getattr(torch, dtype) if dtype else None)
        if format == "torch":
            with target.open_write(out_name) as f:
                torch.save(weights, f)
        else:
            _write_safetensors(target, out_name, weights, _export_metadata(payload, manifest, manager.url_of(name)))
    return ExportResult(target.url_of(out_name), format, len(weights), sum(t.nbytes for t in weights.values()), dtype)


def _writable_target(directory: CheckpointManager, out_name: str) -> Storage:
    """The storage to write ``out_name`` in, unless that would overwrite a committed checkpoint,
    a save of ours in progress (or interrupted), or any other file of the commit protocol."""
    where = directory.url_of(out_name)
    try:
        check_name(out_name)
    except ConfigurationError:
        raise ConfigurationError(f"refusing to write {where}: the name is one of lightning-ckpt's own files "
                                 "(a manifest, a marker or a checkpoint version)") from None
    if directory.storage.exists(manifest_name(out_name)):
        raise ConfigurationError(f"refusing to write {where}: it is a committed checkpoint "
                                 f"({manifest_name(out_name)} is beside it); choose another output path")
    if directory.is_pending(out_name):
        raise ConfigurationError(f"refusing to write {where}: a save of it is in progress or was interrupted "
                                 "(its marker is beside it); choose another output path")
    return directory.storage


def _for_export(weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype``; every tensor contiguous and owning its memory.

    safetensors refuses tensors that share storage (tied weights) or view part of a larger one.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in weights.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)  # a fresh tensor
        else:
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() != t.nbytes or not t.is_contiguous():
                t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _export_metadata(payload: Any, manifest: Manifest | None, source: str) -> dict[str, str]:
    meta = {"format": "pt", "source": source}
    for key in ("epoch", "global_step"):
        value = payload.get(key) if isinstance(payload, Mapping) else None
        if value is None and manifest is not None:
            value = getattr(manifest, key)
        if value is not None:
            meta[key] = str(_plain(value))
    if manifest is not None:
        meta["digest"] = f"{manifest.digest_algorithm}:{manifest.digest}"
    return meta


def _write_safetensors(target: Storage, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigurationError("the safetensors format needs the safetensors package: pip install safetensors") from None
    with tempfile.TemporaryDirectory(prefix="lightning-ckpt-export-") as tmp:
        local = os.path.join(tmp, "weights.safetensors")
        save_file(tensors, local, metadata=meta)
        with open(local, "rb") as src, target.open_write(name) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
