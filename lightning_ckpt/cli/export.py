"""``lightning-ckpt export``: a checkpoint's weights as one safetensors or torch file.

Owns the command: loading the verified payload, casting, and writing the output file; it refuses
to overwrite a committed checkpoint or any file of the commit protocol. It must not write anywhere
but the output file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from lightning_ckpt.cli.opening import (
    EXIT_OK,
    UsageError,
    _load,
    _manifest_or_none,
    _open_file,
    _storage_options,
)
from lightning_ckpt.cli.render import human_size
from lightning_ckpt.errors import ConfigurationError
from lightning_ckpt.integrity import Manifest, manifest_name
from lightning_ckpt.layout import check_name
from lightning_ckpt.storage import Storage, split_url
from lightning_ckpt.summary import _plain, _state_dict

if TYPE_CHECKING:
    import torch

_CHUNK = 8 * 2**20


def cmd_export(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Write the weights of a checkpoint as safetensors (or a plain torch state dict)."""
    import torch

    manager, name = _open_file(args.path, args)
    manifest = _manifest_or_none(manager, name)
    payload = _load(manager, name, manifest)
    weights = _state_dict(payload) if isinstance(payload, Mapping) else None
    if weights is None:
        raise UsageError(f"{manager.url_of(name)} holds no tensors to export")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tensors = _for_export(weights, dtype)
    out_dir, out_name = split_url(args.output)
    target = Storage(out_dir, _storage_options(args))
    _refuse_committed_output(target, out_name)
    if args.format == "torch":
        with target.open_write(out_name) as f:
            torch.save(tensors, f)
    else:
        _write_safetensors(target, out_name, tensors, _export_metadata(payload, manifest, manager.url_of(name)))
    size = sum(t.nbytes for t in tensors.values())
    out.print(Text(f"wrote {target.url_of(out_name)}: {len(tensors)} tensor{'s' if len(tensors) != 1 else ''}, {human_size(size)} of weights"
                   f" ({args.format}{', ' + args.dtype if args.dtype else ''})"))
    return EXIT_OK


def _refuse_committed_output(target: Storage, out_name: str) -> None:
    """Never let ``-o`` overwrite a committed checkpoint, its manifest or any file of our protocol."""
    try:
        check_name(out_name)
    except ConfigurationError:
        raise UsageError(f"refusing to write {target.url_of(out_name)}: the name is one of lightning-ckpt's own "
                         "files (a manifest, a marker or a checkpoint version)") from None
    if target.exists(manifest_name(out_name)):
        raise UsageError(f"refusing to write {target.url_of(out_name)}: it is a committed checkpoint "
                         f"({manifest_name(out_name)} is beside it); choose another output path")


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
        meta["sha256"] = manifest.sha256
    return meta


def _write_safetensors(target: Storage, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:  # pragma: no cover - a declared dependency
        raise UsageError("--format safetensors needs the safetensors package: pip install safetensors") from None
    with tempfile.TemporaryDirectory(prefix="lightning-ckpt-export-") as tmp:
        local = os.path.join(tmp, "weights.safetensors")
        save_file(tensors, local, metadata=meta)
        with open(local, "rb") as src, target.open_write(name) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
