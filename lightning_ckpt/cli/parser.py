"""The ``lightning-ckpt`` argument parser: every command's options, and the types that check them.

Owns the command-line surface (names, help texts, argument types such as ``KEY=VALUE`` storage
options and durations) and which ``cmd_*`` function each command runs. It must not run commands or
open storage.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from lightning_ckpt import planning
from lightning_ckpt._version import __version__
from lightning_ckpt.cli.diff import cmd_diff
from lightning_ckpt.cli.export import cmd_export
from lightning_ckpt.cli.listing import cmd_inspect, cmd_ls, cmd_verify
from lightning_ckpt.cli.plan import cmd_plan
from lightning_ckpt.cli.prune import cmd_prune
from lightning_ckpt.exporting import DTYPES, FORMATS
from lightning_ckpt.policies import MODES

__all__ = ["build_parser"]


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


def _key_options(what: str, purpose: str) -> argparse.ArgumentParser:
    """``--WHAT-key-file PATH`` and ``--WHAT-key-env NAME`` (repeatable): never the key itself."""
    keys = argparse.ArgumentParser(add_help=False)
    keys.add_argument(f"--{what}-key-file", dest=f"{what}_key_files", metavar="PATH", action="append",
                      help=f"{purpose} with the key in PATH; repeatable for rotated keys")
    keys.add_argument(f"--{what}-key-env", dest=f"{what}_key_envs", metavar="NAME", action="append",
                      help="the same, with the key in environment variable NAME (the name, never the key)")
    return keys


def _command(sub: Any, name: str, func: Callable[..., int], parents: Sequence[argparse.ArgumentParser] = (),
             help: str = "") -> argparse.ArgumentParser:
    """The subparser of command ``name``, which runs ``func(args, out, err)``."""
    command: argparse.ArgumentParser = sub.add_parser(name, parents=list(parents), help=help)
    command.set_defaults(func=func)
    return command


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-ckpt`` argument parser with one subcommand per ``cmd_*`` function."""
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument(
        "--storage-option", dest="storage_options", metavar="KEY=VALUE", action="append", type=_storage_option,
        help="fsspec storage option (repeatable); VALUE is parsed as JSON when it parses",
    )  # fmt: skip
    signing = _key_options("signing", "check manifest signatures (HMAC)")
    encryption = _key_options("encryption", "decrypt payloads (AES-256-GCM)")
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

    p = _command(sub, "ls", cmd_ls, parents=[storage, signing, monitor], help="list the committed checkpoints of a directory")
    p.add_argument("url", help="checkpoint directory (path or URL)")
    p.add_argument("--json", action="store_true", help="a JSON list for scripts")
    p.add_argument("--verify", action="store_true", help="stream every payload and check size and digest")

    p = _command(sub, "inspect", cmd_inspect, parents=[storage, signing, encryption], help="show a checkpoint's manifest and contents")
    p.add_argument("path", help="checkpoint file (path or URL)")
    p.add_argument("--json", action="store_true")

    p = _command(sub, "verify", cmd_verify, parents=[storage, signing], help="verify a checkpoint file or a whole directory")
    p.add_argument("url", help="checkpoint file or directory")

    p = _command(sub, "diff", cmd_diff, parents=[storage, signing, encryption], help="compare two checkpoint files")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.add_argument("--atol", type=_tolerance, default=0.0, help="ignore value changes up to this (default 0)")

    p = _command(sub, "prune", cmd_prune, parents=[storage, signing, monitor], help="delete checkpoints a retention policy drops")
    p.add_argument("url", help="checkpoint directory")
    p.add_argument("--keep-last", type=_count, metavar="N", help="keep the N newest (per owner)")
    p.add_argument("--keep-best", type=_count, metavar="K", help="keep the K best by --monitor (per owner)")
    p.add_argument("--owner", help="only checkpoints written by this owner (as recorded in the manifests)")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    p.add_argument("--clean", action="store_true", help="also remove leftovers of interrupted saves")

    p = _command(sub, "export", cmd_export, parents=[storage, signing, encryption], help="export the weights (safetensors, torch) or the whole checkpoint (ckpt) as one file")
    p.add_argument("path", help="checkpoint file")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors or torch: the weights; ckpt: the whole checkpoint as one plain file")
    p.add_argument("--output", "-o", required=True, help="output file (path or URL)")
    p.add_argument("--dtype", choices=DTYPES, help="cast floating tensors to this (weights formats)")

    p = _command(sub, "plan", cmd_plan, help="the cost of a saving schedule, and the Young/Daly interval")
    p.add_argument("--save-seconds", type=_duration("s"), required=True, metavar="S", help="one save (e.g. 20, 1m)")
    p.add_argument("--every", type=_duration("s"), required=True, metavar="INTERVAL", help="e.g. 30m, 2h, 900")
    p.add_argument("--train-hours", type=_duration("h"), required=True, metavar="H", help="e.g. 168 or 7d")
    p.add_argument("--mtbf-hours", type=_duration("h"), metavar="M", help="mean time between failures")
    p.add_argument("--budget", type=_percent, metavar="PERCENT", help="the interval that keeps saving within it")
    p.add_argument("--json", action="store_true")
    return parser
