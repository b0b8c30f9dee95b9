"""What a checkpoint holds, as plain data: :func:`contents`, Lightning metadata, tensors, optimizer and scheduler state.

Owns :func:`contents` (the API behind ``lightning-ckpt inspect``), reading one checkpoint's verified
payload whole (:func:`load_payload`: one file, or every shard of a sharded one consolidated), and
the walk over that payload: flattening nested state into dotted keys, describing tensors,
optimizer and scheduler state, making values JSON-friendly. Shared by ``lightning-ckpt inspect``,
``diff`` and ``export`` and by :mod:`lightning_ckpt.exporting`. It reads only through
:class:`~lightning_ckpt.manager.CheckpointManager` (verified, weights-only) and must not touch
storage itself, write anything, or import torch at module level: a payload's tensors are
recognised through ``sys.modules``, so ``import lightning_ckpt.summary`` stays cheap.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from lightning_ckpt.errors import IncompatibleCheckpointError

if TYPE_CHECKING:
    import torch

    from lightning_ckpt.integrity import Manifest
    from lightning_ckpt.manager import CheckpointManager
    from lightning_ckpt.security import Encryptor, Signer

__all__ = [
    "LIGHTNING_KEYS",
    "committed_manifest",
    "contents",
    "load_payload",
    "open_checkpoint",
    "report",
    "summarize_payload",
    "tensor_summary",
]


LIGHTNING_KEYS = ("epoch", "global_step", "pytorch-lightning_version")


def _is_tensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.Tensor`` (if torch was never imported, nothing is one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _plain(value: Any) -> Any:
    """``value`` made JSON-friendly: tensors to numbers or a short description, the rest to str."""
    if _is_tensor(value):
        return value.item() if value.numel() == 1 else f"tensor{list(value.shape)} {_dtype(value)}"
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested dicts and lists under dotted keys (``state.0.exp_avg``)."""
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        if _is_tensor(obj) and obj.layout != sys.modules["torch"].strided:
            # sparse or quantized: no dense size to show or bytes to export (and densifying a forged
            # one could allocate any amount): one error line, not torch's dispatcher dump
            raise IncompatibleCheckpointError(
                f"{prefix} is a {str(obj.layout).removeprefix('torch.')} tensor; inspect, diff and export "
                "handle dense (strided) tensors only")
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def summarize_payload(payload: Any) -> dict[str, Any]:
    """What a checkpoint dict holds: Lightning metadata, tensors, optimizer and scheduler state."""
    if not isinstance(payload, Mapping):
        return {"type": type(payload).__name__}
    summary: dict[str, Any] = {"lightning": {k: _plain(payload[k]) for k in LIGHTNING_KEYS if k in payload}}
    if "hyper_parameters" in payload:
        summary["hyper_parameters"] = _plain(payload["hyper_parameters"])
    weights = _state_dict(payload)
    summary["state_dict"] = None if weights is None else tensor_summary(weights)
    if isinstance(payload.get("optimizer_states"), list):
        summary["optimizer_states"] = [_optimizer_summary(o) for o in payload["optimizer_states"]]
    if isinstance(payload.get("lr_schedulers"), list):
        summary["lr_schedulers"] = [_scheduler_summary(s) for s in payload["lr_schedulers"]]
    for key in ("loops", "callbacks"):
        if isinstance(payload.get(key), Mapping):
            summary[key] = [str(k) for k in payload[key]]
    known = {*LIGHTNING_KEYS, "hyper_parameters", "state_dict", "optimizer_states", "lr_schedulers", "loops",
             "callbacks"}  # fmt: skip
    if weights is not None and "state_dict" not in payload:
        known |= set(payload)
    summary["other_keys"] = sorted(str(k) for k in payload if k not in known)
    return summary


def _state_dict(payload: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The tensors of ``state_dict`` (a Lightning checkpoint), else of the dict itself; None if none."""
    source = payload["state_dict"] if isinstance(payload.get("state_dict"), Mapping) else payload
    tensors = {k: v for k, v in _flatten(source).items() if _is_tensor(v)}
    return tensors or None


def tensor_summary(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Count, dtypes, total elements and bytes, and the 5 largest tensors."""
    largest = sorted(tensors.items(), key=lambda kv: kv[1].nbytes, reverse=True)[:5]
    return {
        "count": len(tensors),
        "elements": sum(t.numel() for t in tensors.values()),
        "bytes": sum(t.nbytes for t in tensors.values()),
        "dtypes": dict(Counter(_dtype(t) for t in tensors.values()).most_common()),
        "largest": [
            {"name": k, "shape": list(t.shape), "dtype": _dtype(t), "bytes": t.nbytes} for k, t in largest
        ],
    }


def _optimizer_summary(state: Any) -> dict[str, Any]:
    if not isinstance(state, Mapping):
        return {"type": type(state).__name__}
    # any structure at all may arrive here (a weights-only payload of someone else's making)
    raw_groups, raw_state = state.get("param_groups"), state.get("state")
    groups = [g for g in raw_groups if isinstance(g, Mapping)] if isinstance(raw_groups, (list, tuple)) else []
    per_param = [s for s in raw_state.values() if isinstance(s, Mapping)] if isinstance(raw_state, Mapping) else []
    steps = {json.dumps(_plain(s["step"]), sort_keys=True, default=str) for s in per_param if "step" in s}
    settings = {  # the interesting ones: switched-off flags (False, None) are left out
        str(k): _plain(v) for k, v in (groups[0] if groups else {}).items()
        if k not in ("params", "lr") and v is not None and v is not False
    }  # fmt: skip
    return {
        "param_groups": len(groups),
        "lr": [_plain(g.get("lr")) for g in groups],
        "params": sum(len(p) for g in groups if isinstance(p := g.get("params", []), (list, tuple))),
        "params_with_state": len(per_param),
        "state_keys": sorted({str(k) for s in per_param for k in s}),
        "step": ((json.loads(steps.pop()) if len(steps) == 1 else sorted(json.loads(x) for x in steps)
                  if all(isinstance(json.loads(x), (int, float)) for x in steps) else sorted(steps))
                 if steps else None),
        "group_settings": settings,
    }


def _scheduler_summary(state: Any) -> dict[str, Any]:
    """Public settings and counters; of the private ones only ``_last_lr`` (as ``last_lr``) matters."""
    if not isinstance(state, Mapping):
        return {"type": type(state).__name__}
    summary = {str(k): _plain(v) for k, v in state.items() if not str(k).startswith("_") and not isinstance(v, Mapping)}
    if "_last_lr" in state:
        summary["last_lr"] = _plain(state["_last_lr"])
    return summary


# ------------------------------------------------------------------ one checkpoint, whole


def open_checkpoint(
    source: str,
    manager: CheckpointManager | None = None,
    storage_options: dict[str, Any] | None = None,
    signer: Signer | None = None,
    encryptor: Encryptor | None = None,
) -> tuple[CheckpointManager, str]:
    """(manager, name) of a checkpoint: ``source`` is a name in ``manager``'s directory when a
    manager is given, else a file URL whose directory gets a manager with these options and keys."""
    if manager is not None:
        return manager, source
    from lightning_ckpt.manager import CheckpointManager
    from lightning_ckpt.storage import split_url

    directory, name = split_url(source)
    return CheckpointManager(directory, storage_options, signer=signer, encryptor=encryptor), name


def committed_manifest(manager: CheckpointManager, name: str) -> Manifest | None:
    """The manifest of ``name``; None for a plain checkpoint file without one (loaded unverified).

    An interrupted save of ours (a ``.pending`` marker) is not such a file: it raises
    :class:`~lightning_ckpt.errors.UncommittedCheckpointError`.
    """
    return manager.manifest_or_none(name)


def load_payload(manager: CheckpointManager, name: str, manifest: Manifest | None) -> Any:
    """The verified, weights-only payload of ``name``: one file loaded, or a sharded one consolidated."""
    if manifest is not None and manifest.sharded:  # every shard read into full tensors, verified first
        from lightning_ckpt.sharded import consolidate

        return consolidate(manager, name)
    return manager.load(name, weights_only=True)


def report(
    manager: CheckpointManager, name: str, manifest: Manifest | None, payload: Any, error: str | None = None
) -> dict[str, Any]:
    """The ``inspect`` report: URL, manifest, verification, signature, error, payload summary."""
    return {
        "url": manager.url_of(name),
        "manifest": None if manifest is None else asdict(manifest),
        "verified": manifest is not None and error is None,
        # read_manifest refused any manifest whose signature did not check out
        "signature": "valid" if manager.signer is not None and manifest is not None else None,
        "error": error,
        "payload": None if payload is None else summarize_payload(payload),
    }


def contents(
    source: str,
    *,
    storage_options: dict[str, Any] | None = None,
    signer: Signer | None = None,
    encryptor: Encryptor | None = None,
    manager: CheckpointManager | None = None,
) -> dict[str, Any]:
    """What the checkpoint at ``source`` holds, as a plain (JSON-ready) dict: what
    ``lightning-ckpt inspect --json`` prints.

    Keys: ``url``; ``manifest`` (its fields, or None for a plain file saved without lightning-ckpt,
    read unverified with a warning); ``verified``; ``signature`` (``"valid"`` under a ``signer``);
    ``error`` (always None here: a checkpoint that does not verify raises
    :class:`~lightning_ckpt.errors.CorruptCheckpointError`, an encrypted one without its key
    :class:`~lightning_ckpt.errors.KeyMissingError`); ``payload``: ``lightning`` (epoch, step,
    version), ``hyper_parameters``, ``state_dict`` (count, elements, bytes, dtypes, the 5 largest
    tensors), ``optimizer_states`` (param groups, lr, state keys, step), ``lr_schedulers``,
    ``loops``, ``callbacks`` and ``other_keys``.

    ``source`` is a checkpoint file URL (any fsspec URL; ``storage_options``, ``signer`` and
    ``encryptor`` as for :class:`~lightning_ckpt.manager.CheckpointManager`), or a checkpoint
    name in ``manager``'s directory when ``manager`` is given. The payload is verified and
    loaded weights-only (a sharded checkpoint: every shard, consolidated on the CPU).
    """
    manager, name = open_checkpoint(source, manager, storage_options, signer, encryptor)
    manifest = committed_manifest(manager, name)
    return report(manager, name, manifest, load_payload(manager, name, manifest))
