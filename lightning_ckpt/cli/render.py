"""How ``lightning-ckpt`` shows things: human sizes and ages, rich tables and grids, JSON, consoles.

Owns every byte the CLI prints for people (``ls`` tables, ``inspect`` grids, ``diff`` tables) and
the consoles it prints them on (plain text when piped, no trailing blanks). It must not open
storage or load checkpoints: each ``print_*`` function takes the plain report a command built.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["STAR", "human_age", "human_size"]

STAR = "★"


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
        grid.add_row("digest", f"{manifest['digest_algorithm']} {manifest['digest']}")
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
            grid.add_row("verified", Text(f"yes (size and {manifest['digest_algorithm']} digest match)", style="green"))
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


def _warning_printer(err: Console) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        err.print(Text(f"warning: {message}"))

    return show
