"""``lightning-ckpt plan``: what a saving schedule costs, and the Young/Daly interval.

Arithmetic from :mod:`lightning_ckpt.planning` shown as a grid or JSON; it must not touch storage
or import torch.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from lightning_ckpt import planning
from lightning_ckpt.cli.opening import EXIT_OK
from lightning_ckpt.cli.render import _grid, _print_json, _show

__all__ = ["cmd_plan"]


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
