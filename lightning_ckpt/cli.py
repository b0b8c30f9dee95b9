"""``lightning-ckpt``: look at, verify, compare, prune and export checkpoint directories.

A thin layer over :class:`~lightning_ckpt.manager.CheckpointManager` (no Lightning import): each
subcommand is one ``cmd_*`` function that parses nothing, asks the manager, and prints either a
table for people or JSON for scripts (``--json``). Every URL fsspec reaches works, with
``--storage-option key=value`` (repeatable, values parsed as JSON when they parse) passed to every
storage call. Exit codes: 0 success, 1 a check failed (a damaged or uncommitted checkpoint), 2 bad
usage or input (unknown option, unknown URL protocol, missing path, a key that is needed and not
given), each error as one ``error: ...`` line on stderr. Runs saved with a ``Signer`` or an
``Encryptor`` are read with ``--signing-key-file``/``--encryption-key-file PATH`` (or
``--signing-key-env``/``--encryption-key-env NAME``, naming the variable that holds the key):
never a key itself on the command line, where ``ps`` and shell history would show it.
``lightning-ckpt plan`` is the odd one out: arithmetic about save intervals from
:mod:`lightning_ckpt.planning`, no storage at all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lightning_ckpt import planning
from lightning_ckpt._version import __version__
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    KeyMissingError,
    UncommittedCheckpointError,
)
from lightning_ckpt.integrity import Manifest, manifest_name
from lightning_ckpt.layout import check_name
from lightning_ckpt.policies import MODES, KeepBestBy, KeepLatest, KeepUnion, RetentionPolicy, is_last_copy
from lightning_ckpt.security import Encryptor, Signer
from lightning_ckpt.storage import Storage, split_url

if TYPE_CHECKING:
    import torch

    from lightning_ckpt.manager import CheckpointManager, DirectoryScan

# torch (about 2 s) and the manager that needs it are imported by the commands that read
# checkpoints, not at startup: `--help`, `--version` and `plan` answer at once

__all__ = [
    "UsageError",
    "best_names",
    "build_parser",
    "cmd_diff",
    "cmd_export",
    "cmd_inspect",
    "cmd_ls",
    "cmd_plan",
    "cmd_prune",
    "cmd_verify",
    "diff_checkpoints",
    "diff_tensors",
    "human_age",
    "human_size",
    "main",
    "summarize_payload",
    "tensor_summary",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STAR = "★"
LIGHTNING_KEYS = ("epoch", "global_step", "pytorch-lightning_version")
_CHUNK = 8 * 2**20


class UsageError(Exception):
    """Input the CLI itself rejects (exit code 2)."""


# ------------------------------------------------------------------------------- small helpers


def _message(exc: BaseException) -> str:
    """The readable text of an error (OSError subclasses keep it in ``strerror``)."""
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return str(exc)


def _reason(exc: BaseException, manager: CheckpointManager, name: str) -> str:
    """An error message with the checkpoint's full URL shortened to its name."""
    return _message(exc).replace(manager.url_of(name), name)


def human_size(n: int) -> str:
    """``512 B``, ``12.4 KiB``, ``3.1 MiB``, ``1.2 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def human_age(seconds: float) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``4 d ago``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _show(out: Console, renderable: Any) -> None:
    """Print a table without the trailing blanks rich pads its lines with (kinder to pipes and diffs)."""
    with out.capture() as captured:
        out.print(renderable)
    out.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _grid() -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    return grid


# ------------------------------------------------------------------------ opening and scanning


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in [*(args.global_storage_options or []), *(getattr(args, "storage_options", None) or [])]:
        options[key] = value
    return options


def _keys(args: argparse.Namespace) -> tuple[Signer | None, Encryptor | None]:
    """The Signer and Encryptor the key options name (files first, then variables), or None."""
    built: list[Any] = []
    for cls, what in ((Signer, "signing"), (Encryptor, "encryption")):
        files = getattr(args, f"{what}_key_files", None) or []
        names = getattr(args, f"{what}_key_envs", None) or []
        keys = [*(cls.from_file(*files).keys if files else []), *(cls.from_env(*names).keys if names else [])]
        built.append(cls(*keys) if keys else None)
    return built[0], built[1]


def _manager(url: str, args: argparse.Namespace) -> CheckpointManager:
    from lightning_ckpt.manager import CheckpointManager
    from lightning_ckpt.progress import TransferProgress

    signer, encryptor = _keys(args)
    manager = CheckpointManager(url, _storage_options(args), signer=signer, encryptor=encryptor)
    # a bar for long downloads (verify, inspect, diff, export) on a terminal; silent otherwise
    manager.transfer_progress = lambda verb, name: TransferProgress(f"{verb} {name}")
    return manager


def _open_file(url: str, args: argparse.Namespace) -> tuple[CheckpointManager, str]:
    """The manager of a checkpoint file URL's directory, and the file's name."""
    directory, name = split_url(url)
    return _manager(directory, args), name


def _load(manager: CheckpointManager, name: str, manifest: Manifest | None) -> Any:
    """The verified payload of ``name``; an encrypted one without a key says which option to give."""
    info = manifest.extra.get("encryption") if manifest is not None else None
    if info and manager.encryptor is None:
        raise KeyMissingError(
            f"{manager.url_of(name)} is encrypted ({info.get('alg')}, key id {info.get('key_id')}): give its key "
            "with --encryption-key-file PATH or --encryption-key-env NAME"
        )
    if manifest is not None and manifest.sharded:  # every shard read into full tensors, verified first
        from lightning_ckpt.sharded import consolidate

        return consolidate(manager, name)
    return manager.load(name, weights_only=True)


def _open_dir(url: str, args: argparse.Namespace) -> tuple[CheckpointManager, DirectoryScan]:
    """The manager of directory ``url`` and a scan of it; a missing directory is a usage error."""
    manager = _manager(url, args)
    storage = manager.storage
    if storage.fs.isfile(storage.root):
        raise UsageError(f"{manager.url} is a file, not a directory (try `lightning-ckpt inspect`)")
    found = manager.scan()
    if not found.files and not storage.fs.isdir(storage.root):
        raise UsageError(f"no such directory: {manager.url}")
    return manager, found


def _damaged(found: DirectoryScan, manager: CheckpointManager) -> list[tuple[str, str]]:
    """(name, why) for every checkpoint whose manifest exists but cannot be used, by name."""
    damaged = [(name, why.replace(manager.url_of(name), name)) for name, why in found.damaged]
    damaged += [(name, "its payload is missing (a manifest without a checkpoint file)") for name in found.orphaned]
    return sorted(damaged)


def _check(manager: CheckpointManager, name: str) -> str | None:
    """None if ``name`` verifies (size and sha256 streamed), else the reason it does not."""
    try:
        manager.verify(name)
    except (CorruptCheckpointError, IncompatibleCheckpointError, CheckpointNotFoundError) as exc:
        return _reason(exc, manager, name)
    return None


# --------------------------------------------------------------------------- ranking and modes

def _inferred_mode(manifests: Iterable[Manifest]) -> str | None:
    """The mode all ``manifests`` were ranked by (recorded by the callback), if they agree."""
    modes = {m.mode for m in manifests}
    return modes.pop() if len(modes) == 1 else None


def best_names(manifests: Sequence[Manifest], monitor: str | None, mode: str | None) -> set[str]:
    """Names of the best checkpoints (all ties): by ``monitor``, else per each manifest's own monitor."""
    groups: dict[str, list[Manifest]] = defaultdict(list)
    for m in manifests:
        key = monitor or m.monitor
        if key is not None:
            groups[key].append(m)
    names: set[str] = set()
    for key, group in groups.items():
        ranked = KeepBestBy(1, key, mode or _inferred_mode(group) or "min").ranked(group)
        if ranked:
            top = ranked[0].metrics[key]
            tied = [m for m in ranked if m.metrics[key] == top]
            # a last.ckpt copy is not a second best: star it only when its twin is gone
            originals = [m for m in tied if not is_last_copy(m)]
            names |= {m.name for m in (originals or tied)}
    return names


# ----------------------------------------------------------------------------------- ls


def cmd_ls(args: argparse.Namespace, out: Console, err: Console) -> int:
    """A table (or JSON list) of the committed checkpoints in a directory."""
    manager, found = _open_dir(args.url, args)
    best = best_names(found.committed, args.monitor, args.mode)
    problems = {m.name: _check(manager, m.name) for m in found.committed} if args.verify else {}
    now = time.time()
    rows = []
    for m in found.committed:
        monitor = args.monitor or m.monitor
        rows.append({
            "name": m.name,
            "url": manager.url_of(m.name),
            "epoch": m.epoch,
            "global_step": m.global_step,
            "monitor": monitor,
            "score": m.metrics.get(monitor) if monitor else None,
            "best": m.name in best,
            "metrics": m.metrics,
            "size": m.size,
            "created": m.created,
            "age_seconds": round(now - m.created, 3),
            "owner": m.owner,
            "verified": None if not args.verify else problems[m.name] is None,
            "problem": problems.get(m.name),
        })  # fmt: skip
    notes = _directory_notes(found, manager)
    if args.json:
        _print_json(rows)
        for note in notes:
            err.print(Text(note))
    else:
        _print_ls_table(out, manager.url, rows)
        for note in notes:
            out.print(Text(note))
    return EXIT_FAILED if any(problems.values()) else EXIT_OK


def _print_ls_table(out: Console, url: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        out.print(f"no committed checkpoints in {url}")
        return
    table = _table("name", "epoch", "step", "metric", "size", "age", "verified")
    for column in (1, 2, 4, 5):
        table.columns[column].justify = "right"
    for row in rows:
        metric = Text("-")
        if row["monitor"] is not None:
            metric = Text(f"{row['monitor']}={_number(row['score'])}")
            if row["best"]:
                metric.append(f" {STAR}", style="bold yellow")
        verified = Text("-")
        if row["verified"] is True:
            verified = Text("yes", style="green")
        elif row["verified"] is False:
            verified = Text(f"NO: {row['problem']}", style="bold red")
        table.add_row(
            Text(row["name"]),
            "-" if row["epoch"] is None else str(row["epoch"]),
            "-" if row["global_step"] is None else str(row["global_step"]),
            metric,
            human_size(row["size"]),
            human_age(row["age_seconds"]),
            verified,
        )
    _show(out, table)


def _directory_notes(found: DirectoryScan, manager: CheckpointManager) -> list[str]:
    notes, url = [], manager.url
    damaged = _damaged(found, manager)
    if damaged:
        notes.append("unreadable: " + "; ".join(f"{name}: {why}" for name, why in damaged))
    if found.leftovers:
        notes.append(
            f"uncommitted leftovers of interrupted saves (`lightning-ckpt prune {url} --clean` removes them): "
            + ", ".join(found.leftovers)
        )
    if found.unmanaged:
        notes.append("not committed by lightning-ckpt (no manifest): " + ", ".join(found.unmanaged))
    return notes


# -------------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace, out: Console, err: Console) -> int:
    """The manifest and a summary of the payload of one checkpoint file."""
    manager, name = _open_file(args.path, args)
    manifest = _manifest_or_none(manager, name)
    error = missing_key = None
    payload: Any = None
    try:
        payload = _load(manager, name, manifest)
    except KeyMissingError as exc:  # the manifest is still worth showing; the payload needs the key
        missing_key = exc
        if manifest is not None:
            error = _check(manager, name)  # the stored (encrypted) bytes verify without a key
    except (CorruptCheckpointError, IncompatibleCheckpointError) as exc:
        error = _reason(exc, manager, name)
    report = {
        "url": manager.url_of(name),
        "manifest": None if manifest is None else asdict(manifest),
        "verified": manifest is not None and error is None,
        # read_manifest refused any manifest whose signature did not check out
        "signature": "valid" if manager.signer is not None and manifest is not None else None,
        "error": error,
        "payload": None if payload is None else summarize_payload(payload),
    }
    if args.json:
        _print_json(report)
    else:
        _print_inspect(out, report)
    if error:
        return EXIT_FAILED
    if missing_key is not None:
        return _fail(err, _reason(missing_key, manager, name), EXIT_USAGE)
    return EXIT_OK


def _manifest_or_none(manager: CheckpointManager, name: str) -> Manifest | None:
    """The manifest of ``name``; None for a plain checkpoint file without one (loaded unverified)."""
    try:
        return manager.read_manifest(name)
    except UncommittedCheckpointError:
        if manager.is_pending(name):
            raise
        return None


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


def _print_inspect(out: Console, report: dict[str, Any]) -> None:
    out.print(Text(report["url"], style="bold"))
    manifest = report["manifest"]
    grid = _grid()
    if manifest is None:
        grid.add_row("manifest", Text("none: not committed by lightning-ckpt, loaded unverified", style="yellow"))
    else:
        monitor = manifest["monitor"]
        grid.add_row("epoch", str(manifest["epoch"]))
        grid.add_row("step", str(manifest["global_step"]))
        if monitor is not None:
            grid.add_row("monitor", f"{monitor} = {_number(manifest['metrics'].get(monitor))}")
        grid.add_row("metrics", ", ".join(f"{k}={_number(v)}" for k, v in manifest["metrics"].items()) or "-")
        grid.add_row("size", f"{human_size(manifest['size'])} ({manifest['size']} bytes)")
        grid.add_row("sha256", manifest["sha256"])
        grid.add_row("created", f"{_iso(manifest['created'])} ({human_age(time.time() - manifest['created'])})")
        if manifest["owner"]:
            grid.add_row("owner", Text(manifest["owner"]))
        grid.add_row("versions", ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()) or "-")
        grid.add_row("format", f"{manifest['format']} {manifest['format_version']}"
                     + (", weights only" if manifest["weights_only"] else ""))
        if manifest.get("files"):
            shards = [f for f in manifest["files"] if f.endswith(".distcp")]
            grid.add_row("sharded", f"{len(manifest['files'])} files, {len(shards)} shard files (read whole here)")
        encryption = manifest["extra"].get("encryption")
        if encryption:
            grid.add_row("encrypted", f"{encryption.get('alg')}, key id {encryption.get('key_id')}")
        if report["signature"] is not None:
            grid.add_row("signature", Text(f"{report['signature']} (HMAC-SHA256, checked with the given key)",
                                           style="green"))
        if report["error"] is None:
            grid.add_row("verified", Text("yes (size and sha256 match)", style="green"))
    if report["error"] is not None:
        grid.add_row("verified", Text(f"NO: {report['error']}", style="bold red"))
    out.print(Text("manifest", style="bold underline"))
    _show(out, grid)
    if report["payload"] is not None:
        out.print(Text("payload", style="bold underline"))
        _show(out, _payload_grid(report["payload"]))


def _payload_grid(payload: dict[str, Any]) -> Table:
    grid = _grid()
    if "type" in payload:
        grid.add_row("type", payload["type"])
        return grid
    if payload["lightning"]:
        grid.add_row("lightning", ", ".join(f"{k} {v}" for k, v in payload["lightning"].items()))
    if "hyper_parameters" in payload:
        hparams = payload["hyper_parameters"]
        text = ", ".join(f"{k}={v!r}" for k, v in hparams.items()) if isinstance(hparams, dict) else repr(hparams)
        grid.add_row("hyper_parameters", Text(text or "-"))
    weights = payload["state_dict"]
    if weights is None:
        grid.add_row("state_dict", "no tensors")
    else:
        dtypes = ", ".join(f"{d} x{n}" for d, n in weights["dtypes"].items())
        grid.add_row("state_dict", f"{weights['count']} tensors, {weights['elements']:,} values, "
                     f"{human_size(weights['bytes'])}; {dtypes}")
        for t in weights["largest"]:
            grid.add_row("", Text(f"{t['name']}  {t['shape']}  {t['dtype']}  {human_size(t['bytes'])}"))
        left_out = weights["count"] - len(weights["largest"])
        if left_out:
            rest = weights["bytes"] - sum(t["bytes"] for t in weights["largest"])
            grid.add_row("", Text(f"… {left_out} more tensor{'s' if left_out > 1 else ''}, {human_size(rest)}"))
    for i, opt in enumerate(payload.get("optimizer_states", [])):
        grid.add_row(f"optimizer_states[{i}]", Text(_optimizer_line(opt)))
    for i, sched in enumerate(payload.get("lr_schedulers", [])):
        grid.add_row(f"lr_schedulers[{i}]", Text(", ".join(f"{k}={v}" for k, v in sched.items())))
    for key in ("loops", "callbacks", "other_keys"):
        if payload.get(key):
            grid.add_row(key, Text(", ".join(payload[key])))
    return grid


def _optimizer_line(opt: dict[str, Any]) -> str:
    if "type" in opt:
        return opt["type"]
    lrs = ", ".join(_number(lr) if isinstance(lr, (int, float)) else str(lr) for lr in opt["lr"])
    text = f"{opt['param_groups']} param group(s), lr {lrs}; {opt['params']} params"
    if opt["state_keys"]:
        text += f", state for {opt['params_with_state']}: {', '.join(opt['state_keys'])}"
    if opt["step"] is not None:
        text += f"; step {_value(opt['step'])}"
    if opt["group_settings"]:
        text += "; " + ", ".join(f"{k}={v}" for k, v in opt["group_settings"].items())
    return text


# --------------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Verify one checkpoint file or every committed checkpoint of a directory."""
    target = _file_target(args.url, args)
    results: list[tuple[str, str | None]]
    if target is not None:
        manager, name = target
        results = [(name, _check(manager, name))]
    else:
        manager, found = _open_dir(args.url, args)
        results = [(m.name, _check(manager, m.name)) for m in found.committed]
        results += _damaged(found, manager)
        clean = f"`lightning-ckpt prune {manager.url} --clean` removes it"
        results += [(name, f"uncommitted leftover of an interrupted save ({clean})") for name in found.leftovers]
        results += [
            (name, "no manifest (not saved by lightning-ckpt, or its manifest was deleted); cannot be verified")
            for name in found.unmanaged
        ]
        if not results:
            out.print(f"nothing to verify: no checkpoints in {manager.url}")
            return EXIT_FAILED
    for name, problem in results:
        if problem is None:
            out.print(Text.assemble(("ok", "green"), f" {name}"))
        else:
            out.print(Text.assemble(("BAD", "bold red"), f" {name}: {problem}"))
    bad = sum(problem is not None for _, problem in results)
    out.print(f"{len(results) - bad} ok, {bad} bad")
    return EXIT_FAILED if bad else EXIT_OK


def _file_target(url: str, args: argparse.Namespace) -> tuple[CheckpointManager, str] | None:
    """(manager, name) when ``url`` names a checkpoint file, None when it is a directory.

    A file is a name ending in ``.ckpt`` or one with a manifest or a ``.pending`` marker beside it.
    """
    try:
        manager, name = _open_file(url, args)
    except ConfigurationError:
        return None  # "s3://bucket/" and the like: only a directory makes sense
    exists = manager.storage.exists

    def traced() -> bool:
        return exists(manifest_name(name)) or manager.is_pending(name)

    if not name.endswith(".ckpt") and not traced():
        return None  # checked first: exists() of a directory is an error, not False
    if not traced() and not exists(name):  # the traces first: exists() of a directory raises
        raise CheckpointNotFoundError(f"no checkpoint at {manager.url_of(name)}")
    return manager, name


# ----------------------------------------------------------------------------------- diff


@dataclass
class _Side:
    url: str
    manifest: Manifest | None
    payload: Mapping[str, Any]


def _load_side(url: str, args: argparse.Namespace) -> _Side:
    manager, name = _open_file(url, args)
    manifest = _manifest_or_none(manager, name)
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


def _print_diff(out: Console, report: dict[str, Any]) -> None:
    out.print(Text(f"a: {report['a']}\nb: {report['b']}"))
    sections = [("state_dict", report["state_dict"])]
    if "optimizer_states" in report:
        sections.append(("optimizer_states", report["optimizer_states"]))
    for title, section in sections:
        counts = Counter(c["change"] for c in section["changes"])
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "no differences"
        out.print(Text(f"{title}: {section['same']} same, {summary} (atol {report['atol']:g})", style="bold"))
        if section["changes"]:
            table = _table("change", "tensor", "a", "b", "max |a-b|")
            for c in section["changes"]:
                table.add_row(c["change"], Text(c["name"]), _shape(c["a"]), _shape(c["b"]),
                              "-" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.4g}")
            _show(out, table)
    if report["metadata"]:
        out.print(Text("metadata:", style="bold"))
        table = _table("key", "a", "b")
        for m in report["metadata"]:
            table.add_row(Text(m["key"]), Text(_value(m["a"])), Text(_value(m["b"])))
        _show(out, table)
    else:
        out.print(Text("metadata: no differences", style="bold"))


def _shape(desc: dict[str, Any] | None) -> str:
    return "-" if desc is None else f"{desc['shape']} {desc['dtype']}"


def _value(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.6g}" if isinstance(v, float) else str(v)  # 32.0 -> "32", 0.4630085 -> "0.463009"


# ---------------------------------------------------------------------------------- prune


def cmd_prune(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Apply keep-last / keep-best retention (per owner, as the callback does) and clean leftovers."""
    if args.keep_last is None and args.keep_best is None and not args.clean:
        raise UsageError("prune: nothing to do; give --keep-last N, --keep-best K and/or --clean")
    manager, found = _open_dir(args.url, args)
    verb = "would delete" if args.dry_run else "deleted"
    if args.clean:
        removed = found.leftovers if args.dry_run else manager.cleanup()
        for name in removed:
            out.print(Text(f"{'would remove' if args.dry_run else 'removed'} leftover {name}"))
        if not removed:
            out.print("no leftovers to remove")
    if args.keep_last is None and args.keep_best is None:
        return EXIT_OK
    considered = [m for m in found.committed if args.owner is None or m.owner == args.owner]
    policy = _retention(args, considered)
    doomed = manager.prune(policy, owner=args.owner, dry_run=args.dry_run)
    for name in doomed:
        out.print(Text(f"{verb} {name}"))
    kept = [m.name for m in considered if m.name not in doomed]
    out.print(Text(f"{'would keep' if args.dry_run else 'kept'} {len(kept)}: {', '.join(kept) or '-'}"))
    return EXIT_OK


def _retention(args: argparse.Namespace, manifests: Sequence[Manifest]) -> KeepUnion:
    policies: list[RetentionPolicy] = []
    if args.keep_last is not None:
        policies.append(KeepLatest(args.keep_last))
    if args.keep_best is not None:
        monitor = args.monitor
        if monitor is None:
            monitors = {m.monitor for m in manifests}
            if len(monitors) != 1 or None in monitors:
                found = ", ".join(sorted(str(m) for m in monitors)) or "no checkpoints"
                raise UsageError(f"--keep-best needs --monitor: the manifests do not agree on one ({found})")
            monitor = monitors.pop()
        mode = args.mode or _inferred_mode(manifests)
        if mode is None:
            raise UsageError("--keep-best needs --mode min|max: the manifests do not record one")
        policies.append(KeepBestBy(args.keep_best, monitor, mode))
    return KeepUnion(tuple(policies))


# --------------------------------------------------------------------------------- export


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


# ----------------------------------------------------------------------------------- plan


def cmd_plan(args: argparse.Namespace, out: Console, err: Console) -> int:
    """What a saving schedule costs, and the Young/Daly interval when an MTBF is given."""
    mtbf = args.mtbf_hours
    mine = planning.plan(args.train_hours, args.every, args.save_seconds, mtbf)
    optimal = None
    if mtbf is not None:
        interval = planning.young_daly_interval(args.save_seconds, mtbf)
        optimal = planning.plan(args.train_hours, interval, args.save_seconds, mtbf)
    budget = None
    if args.budget is not None:
        budget = planning.interval_for_budget(args.save_seconds, args.budget)
    if args.json:
        _print_json({
            "plan": mine.to_dict(),
            "young_daly": None if optimal is None else optimal.to_dict(),
            "budget_percent": args.budget,
            "interval_for_budget_seconds": budget,
        })  # fmt: skip
        return EXIT_OK
    fd = planning.format_duration
    grid = _grid()
    grid.add_row("training", f"{mine.train_seconds / 3600:g} h ({fd(mine.train_seconds)})")
    grid.add_row("one save", fd(mine.save_seconds))
    grid.add_row("save every", fd(mine.interval_seconds))
    grid.add_row("saves", str(mine.saves))
    grid.add_row("time saving", f"{fd(mine.saving_seconds)} ({mine.saving_seconds:,.0f} s)")
    grid.add_row("overhead", f"{mine.overhead_percent:.2f} % of the training time")
    if optimal is not None and mine.rework_percent is not None and optimal.rework_percent is not None:
        grid.add_row("expected rework", f"{mine.rework_percent:.2f} % (a failure every {fd(optimal.mtbf_seconds or 0)}"
                     " loses half an interval)")
        grid.add_row("total waste", f"{mine.waste_percent:.2f} %")
        grid.add_row("Young/Daly interval", f"{fd(optimal.interval_seconds)} ({optimal.interval_seconds:.0f} s) "
                     "= sqrt(2 x save x MTBF)")
        grid.add_row("  at that interval", f"{optimal.saves} saves, overhead {optimal.overhead_percent:.2f} % + "
                     f"rework {optimal.rework_percent:.2f} % = {optimal.waste_percent:.2f} %")
    if budget is not None:
        grid.add_row(f"for a {args.budget:g} % budget", f"save every {fd(budget)} ({budget:.0f} s) or less often")
        grid.add_row("  while training", f"CheckpointCallback(overhead_budget={args.budget / 100:g}) measures each "
                     "save and keeps to it")
    _show(out, grid)
    return EXIT_OK


# ------------------------------------------------------------------------------ arguments


def _storage_option(text: str) -> tuple[str, Any]:
    """``key=value``; the value is JSON when it parses (``anon=false``, ``client_kwargs={...}``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _duration(default_unit: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return planning.parse_duration(text, default_unit)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("% "))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-ckpt`` argument parser with one subcommand per ``cmd_*`` function."""
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument(
        "--storage-option", dest="storage_options", metavar="KEY=VALUE", action="append", type=_storage_option,
        help="fsspec storage option (repeatable); VALUE is parsed as JSON when it parses",
    )  # fmt: skip
    signing = argparse.ArgumentParser(add_help=False)
    signing.add_argument(
        "--signing-key-file", dest="signing_key_files", metavar="PATH", action="append",
        help="check manifest signatures (HMAC) with the key in PATH; repeatable for rotated keys",
    )  # fmt: skip
    signing.add_argument(
        "--signing-key-env", dest="signing_key_envs", metavar="NAME", action="append",
        help="the same, with the key in environment variable NAME (the name, never the key)",
    )  # fmt: skip
    encryption = argparse.ArgumentParser(add_help=False)
    encryption.add_argument(
        "--encryption-key-file", dest="encryption_key_files", metavar="PATH", action="append",
        help="decrypt payloads (AES-256-GCM) with the key in PATH; repeatable for rotated keys",
    )  # fmt: skip
    encryption.add_argument(
        "--encryption-key-env", dest="encryption_key_envs", metavar="NAME", action="append",
        help="the same, with the key in environment variable NAME (the name, never the key)",
    )  # fmt: skip
    monitor = argparse.ArgumentParser(add_help=False)
    monitor.add_argument("--monitor", help="metric to rank by (default: each manifest's monitor)")
    monitor.add_argument("--mode", choices=MODES, help="min or max (default: from the manifests' owner, else min)")

    parser = argparse.ArgumentParser(
        prog="lightning-ckpt",
        description="Inspect, verify, compare, prune and export lightning-ckpt checkpoints.",
        epilog="exit codes: 0 ok, 1 a check failed (damaged, uncommitted or badly signed checkpoint), "
        "2 bad usage or input (including a missing key)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--storage-option", dest="global_storage_options", metavar="KEY=VALUE",
                        action="append", type=_storage_option, help="fsspec storage option for every URL")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", parents=[storage, signing, monitor], help="list the committed checkpoints of a directory")
    p.add_argument("url", help="checkpoint directory (path or URL)")
    p.add_argument("--json", action="store_true", help="a JSON list for scripts")
    p.add_argument("--verify", action="store_true", help="stream every payload and check size and sha256")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", parents=[storage, signing, encryption], help="show a checkpoint's manifest and contents")
    p.add_argument("path", help="checkpoint file (path or URL)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", parents=[storage, signing], help="verify a checkpoint file or a whole directory")
    p.add_argument("url", help="checkpoint file or directory")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("diff", parents=[storage, signing, encryption], help="compare two checkpoint files")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.add_argument("--atol", type=_tolerance, default=0.0, help="ignore value changes up to this (default 0)")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("prune", parents=[storage, signing, monitor], help="delete checkpoints a retention policy drops")
    p.add_argument("url", help="checkpoint directory")
    p.add_argument("--keep-last", type=_count, metavar="N", help="keep the N newest (per owner)")
    p.add_argument("--keep-best", type=_count, metavar="K", help="keep the K best by --monitor (per owner)")
    p.add_argument("--owner", help="only checkpoints written by this owner (as recorded in the manifests)")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    p.add_argument("--clean", action="store_true", help="also remove leftovers of interrupted saves")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", parents=[storage, signing, encryption], help="export the weights as safetensors or a torch file")
    p.add_argument("path", help="checkpoint file")
    p.add_argument("--format", choices=("safetensors", "torch"), default="safetensors")
    p.add_argument("--output", "-o", required=True, help="output file (path or URL)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="cast floating tensors to this")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="the cost of a saving schedule, and the Young/Daly interval")
    p.add_argument("--save-seconds", type=_duration("s"), required=True, metavar="S", help="one save (e.g. 20, 1m)")
    p.add_argument("--every", type=_duration("s"), required=True, metavar="INTERVAL", help="e.g. 30m, 2h, 900")
    p.add_argument("--train-hours", type=_duration("h"), required=True, metavar="H", help="e.g. 168 or 7d")
    p.add_argument("--mtbf-hours", type=_duration("h"), metavar="M", help="mean time between failures")
    p.add_argument("--budget", type=_percent, metavar="PERCENT", help="the interval that keeps saving within it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    return parser


# ----------------------------------------------------------------------------------- main


def _consoles() -> tuple[Console, Console]:
    """stdout and stderr consoles: colour only on a terminal, at least 200 columns when piped."""
    # soft_wrap: long lines (URLs, reasons) stay whole for grep; tables still fit the width
    out = Console(highlight=False, markup=False, emoji=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True)
    for console in (out, err):
        if not console.is_terminal:  # piped: never fold a name over two lines
            console.width = max(console.width, 200)
    return out, err


def _fail(err: Console, message: str, code: int) -> int:
    err.print(Text(f"error: {message}"))
    return code


def main(argv: list[str] | None = None) -> int:
    """Run ``lightning-ckpt`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    out, err = _consoles()
    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckpointWarning)
        warnings.showwarning = _warning_printer(err)
        try:
            return int(args.func(args, out, err))
        except UsageError as exc:
            return _fail(err, str(exc), EXIT_USAGE)
        except KeyMissingError as exc:  # not a damaged checkpoint: the invocation lacks its key
            return _fail(err, _message(exc), EXIT_USAGE)
        except (CorruptCheckpointError, IncompatibleCheckpointError, UncommittedCheckpointError) as exc:
            return _fail(err, _message(exc), EXIT_FAILED)
        except CheckpointError as exc:
            return _fail(err, _message(exc), EXIT_USAGE)
        except KeyboardInterrupt:
            return _fail(err, "interrupted", 130)
        except BrokenPipeError:  # `lightning-ckpt ls ... | head`: the reader left; say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILED
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a command never ends in a traceback
            # (DCP's CheckpointException is a BaseException); what we did not foresee is a failure
            return _fail(err, f"{type(exc).__name__}: {_message(exc)} (unexpected; please report it)", EXIT_FAILED)


def _warning_printer(err: Console) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        err.print(Text(f"warning: {message}"))

    return show


if __name__ == "__main__":
    sys.exit(main())
