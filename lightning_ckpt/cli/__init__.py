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

The package: :mod:`~lightning_ckpt.cli.parser` (the options), one module per group of commands
(:mod:`~lightning_ckpt.cli.listing` for ``ls``/``inspect``/``verify``, :mod:`~lightning_ckpt.cli.diff`,
:mod:`~lightning_ckpt.cli.prune`, :mod:`~lightning_ckpt.cli.export`, :mod:`~lightning_ckpt.cli.plan`),
:mod:`~lightning_ckpt.cli.opening` (arguments to managers, exit codes) and
:mod:`~lightning_ckpt.cli.render` (everything printed for people). This module owns :func:`main`:
parsing, running one command, and turning every error into an exit code and one line. It must not
import torch or Lightning at module level (tests/test_cli_startup.py counts what ``--help``,
``ls`` and ``plan`` import), nor reach past the manager into storage internals.
"""

from __future__ import annotations

import os
import sys
import warnings

from lightning_ckpt.cli.diff import cmd_diff, diff_checkpoints, diff_tensors
from lightning_ckpt.cli.export import cmd_export
from lightning_ckpt.cli.listing import cmd_inspect, cmd_ls, cmd_verify
from lightning_ckpt.cli.opening import EXIT_FAILED, EXIT_USAGE, UsageError, _message
from lightning_ckpt.cli.parser import build_parser
from lightning_ckpt.cli.plan import cmd_plan
from lightning_ckpt.cli.prune import cmd_prune
from lightning_ckpt.cli.render import _consoles, _fail, _warning_printer, human_age, human_size
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointWarning,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    KeyMissingError,
    UncommittedCheckpointError,
)
from lightning_ckpt.policies import best_names
from lightning_ckpt.summary import summarize_payload, tensor_summary

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
