"""``lightning-ckpt prune``: the callback's retention applied from the command line, and leftover cleaning.

Owns turning ``--keep-last``/``--keep-best``/``--monitor``/``--mode`` into the same policy objects
the callback uses, and printing what was (or would be) deleted. Deleting is the manager's job: this
module must not delete files itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from lightning_ckpt.cli.opening import EXIT_OK, UsageError, _open_dir
from lightning_ckpt.integrity import Manifest
from lightning_ckpt.policies import KeepBestBy, KeepLatest, KeepUnion, RetentionPolicy, recorded_mode

__all__ = ["cmd_prune"]


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
        mode = args.mode or recorded_mode(manifests)
        if mode is None:
            raise UsageError("--keep-best needs --mode min|max: the manifests do not record one")
        policies.append(KeepBestBy(args.keep_best, monitor, mode))
    return KeepUnion(tuple(policies))
