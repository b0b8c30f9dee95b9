"""``lightning-ckpt export``: a checkpoint as one standalone file, through :func:`lightning_ckpt.exporting.export`.

Owns the command only: the key check that names the CLI's key options, the call to the API, and
the one line that says what was written. Reading, casting, refusing committed outputs and writing
are the API's; this module must not write files itself.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.text import Text

from lightning_ckpt.cli.opening import EXIT_OK, _open_file, _require_key, _storage_options
from lightning_ckpt.cli.render import human_size
from lightning_ckpt.exporting import export
from lightning_ckpt.summary import committed_manifest

__all__ = ["cmd_export"]


def cmd_export(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Write the weights of a checkpoint as safetensors or a plain torch state dict, or the whole checkpoint."""
    manager, name = _open_file(args.path, args)
    _require_key(manager, name, committed_manifest(manager, name))
    done = export(name, args.output, format=args.format, dtype=args.dtype, storage_options=_storage_options(args),
                  manager=manager)
    what = "of weights" if done.format != "ckpt" else "of weights in the whole checkpoint"
    out.print(Text(f"wrote {done.url}: {done.tensors} tensor{'s' if done.tensors != 1 else ''}, "
                   f"{human_size(done.bytes)} {what} ({done.format}{', ' + done.dtype if done.dtype else ''})"))
    return EXIT_OK
