"""``lightning-ckpt diff``: tensor and metadata differences between two checkpoint files.

Owns the comparison (:func:`diff_checkpoints`, :func:`diff_tensors`: changed beyond a tolerance,
reshaped, retyped, added, removed) and the command around it. It reads payloads only through the
manager (verified) and must not write anything; differences are not failures (exit 0).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console

from lightning_ckpt.cli.opening import EXIT_OK, UsageError, _load, _open_file
from lightning_ckpt.cli.render import _print_diff, _print_json
from lightning_ckpt.integrity import Manifest
from lightning_ckpt.summary import (
    LIGHTNING_KEYS,
    _dtype,
    _flatten,
    _is_tensor,
    _plain,
    _state_dict,
    committed_manifest,
)

if TYPE_CHECKING:
    import torch

__all__ = ["cmd_diff", "diff_checkpoints", "diff_tensors"]


@dataclass
class _Side:
    url: str
    manifest: Manifest | None
    payload: Mapping[str, Any]


def _load_side(url: str, args: argparse.Namespace) -> _Side:
    manager, name = _open_file(url, args)
    manifest = committed_manifest(manager, name)
    payload = _load(manager, name, manifest)
    if not isinstance(payload, Mapping):
        raise UsageError(f"{manager.url_of(name)} holds a {type(payload).__name__}, not a checkpoint dict")
    return _Side(manager.url_of(name), manifest, payload)


def cmd_diff(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Tensor and metadata differences between two checkpoint files (differences are not failures)."""
    a, b = _load_side(args.a, args), _load_side(args.b, args)
    report = diff_checkpoints(a.payload, b.payload, a.manifest, b.manifest, args.atol)
    report = {"a": a.url, "b": b.url, "atol": args.atol, **report}
    if args.json:
        _print_json(report)
    else:
        _print_diff(out, report)
    return EXIT_OK


def diff_checkpoints(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    manifest_a: Manifest | None = None,
    manifest_b: Manifest | None = None,
    atol: float = 0.0,
) -> dict[str, Any]:
    """Differences of ``state_dict`` tensors, optimizer state tensors and metadata."""
    report: dict[str, Any] = {"state_dict": diff_tensors(_state_dict(a) or {}, _state_dict(b) or {}, atol)}
    opt_a, opt_b = _flatten(a.get("optimizer_states", [])), _flatten(b.get("optimizer_states", []))
    tensors_a = {k: v for k, v in opt_a.items() if _is_tensor(v)}
    tensors_b = {k: v for k, v in opt_b.items() if _is_tensor(v)}
    if tensors_a or tensors_b:
        report["optimizer_states"] = diff_tensors(tensors_a, tensors_b, atol)
    meta_a, meta_b = _metadata(a, manifest_a), _metadata(b, manifest_b)
    report["metadata"] = [
        {"key": k, "a": _plain(meta_a.get(k)), "b": _plain(meta_b.get(k))}
        for k in sorted(set(meta_a) | set(meta_b), key=_natural)
        if not _same_value(meta_a.get(k, _MISSING), meta_b.get(k, _MISSING))
    ]
    return report


_MISSING = object()


def _natural(key: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key)]


def _same_value(x: Any, y: Any) -> bool:
    if _is_tensor(x) or _is_tensor(y):
        return (
            _is_tensor(x) and _is_tensor(y)
            and x.shape == y.shape and x.dtype == y.dtype and _max_abs_diff(x, y) == 0
        )  # fmt: skip
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return bool(type(x) is type(y) and x == y)


def _metadata(payload: Mapping[str, Any], manifest: Manifest | None) -> dict[str, Any]:
    """Non-tensor facts worth comparing: Lightning keys, hyperparameters, optimizer/scheduler settings."""
    meta: dict[str, Any] = {k: payload[k] for k in LIGHTNING_KEYS if k in payload}
    for key in ("hyper_parameters", "optimizer_states", "lr_schedulers"):
        if key in payload:
            # optimizer tensors are compared as tensors; small ones elsewhere count as settings
            small = key != "optimizer_states"
            leaves = _flatten(payload[key], key)
            meta.update({k: v for k, v in leaves.items()
                         if not _is_tensor(v) or (small and v.numel() == 1)})
    if manifest is not None:
        meta.update({f"metrics.{k}": v for k, v in manifest.metrics.items()})
    return meta


def diff_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], atol: float = 0.0) -> dict[str, Any]:
    """Changed (beyond ``atol``), reshaped or retyped, added and removed tensors; the count of same ones."""
    changes: list[dict[str, Any]] = []
    same = 0
    for name in sorted(set(a) | set(b), key=_natural):
        x, y = a.get(name), b.get(name)
        entry = {"name": name, "a": _describe(x), "b": _describe(y), "max_abs_diff": None}
        if x is None:
            changes.append({**entry, "change": "added"})
        elif y is None:
            changes.append({**entry, "change": "removed"})
        elif x.shape != y.shape:
            changes.append({**entry, "change": "shape"})
        else:
            diff = _max_abs_diff(x, y)
            if x.dtype != y.dtype:
                changes.append({**entry, "change": "dtype", "max_abs_diff": diff})
            elif diff > atol:
                changes.append({**entry, "change": "values", "max_abs_diff": diff})
            else:
                same += 1
    return {"same": same, "changes": changes}


def _describe(t: torch.Tensor | None) -> dict[str, Any] | None:
    return None if t is None else {"shape": list(t.shape), "dtype": _dtype(t)}


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| computed in float64 (complex128 for complex); equal NaNs and infinities count as 0."""
    import torch

    if a.numel() == 0:
        return 0.0
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    x, y = a.detach().cpu().to(wide), b.detach().cpu().to(wide)
    equal = (x == y) | (torch.isnan(x) & torch.isnan(y))
    d = torch.where(equal, torch.zeros((), dtype=torch.float64), (x - y).abs().to(torch.float64))
    return float(torch.nan_to_num(d, nan=math.inf).max())
