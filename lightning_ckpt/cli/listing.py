"""``lightning-ckpt ls``, ``inspect`` and ``verify``: what a directory or a file holds, and whether it verifies.

Owns the three read-only commands: each builds a plain report from the manager (and, for
``inspect``, :mod:`lightning_ckpt.summary`) and hands it to :mod:`lightning_ckpt.cli.render` or
prints JSON. They must not modify anything in storage.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from lightning_ckpt import summary
from lightning_ckpt.cli.opening import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    _check,
    _damaged,
    _file_target,
    _load,
    _open_dir,
    _open_file,
    _reason,
)
from lightning_ckpt.cli.render import _fail, _print_inspect, _print_json, _print_ls_table
from lightning_ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError, KeyMissingError
from lightning_ckpt.policies import best_names

if TYPE_CHECKING:
    from lightning_ckpt.manager import CheckpointManager, DirectoryScan

__all__ = ["cmd_inspect", "cmd_ls", "cmd_verify"]


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
            "digest_algorithm": m.digest_algorithm,
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


def cmd_inspect(args: argparse.Namespace, out: Console, err: Console) -> int:
    """The manifest and a summary of the payload of one checkpoint file."""
    manager, name = _open_file(args.path, args)
    manifest = summary.committed_manifest(manager, name)
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
    report = summary.report(manager, name, manifest, payload, error)
    if args.json:
        _print_json(report)
    else:
        _print_inspect(out, report)
    if error:
        return EXIT_FAILED
    if missing_key is not None:
        return _fail(err, _reason(missing_key, manager, name), EXIT_USAGE)
    return EXIT_OK


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
