"""Turning command-line arguments into managers and checked checkpoints, for every command.

Owns: the exit codes and :class:`UsageError`, storage options and keys from the arguments, opening a
directory or a file as a :class:`~lightning_ckpt.manager.CheckpointManager`, loading a verified
payload, and the one-line reasons a checkpoint fails verification. It must not print (commands and
:mod:`lightning_ckpt.cli.render` do) and must not import torch or the manager at module level
(``--help`` and ``plan`` answer without them).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lightning_ckpt.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    KeyMissingError,
)
from lightning_ckpt.integrity import Manifest, manifest_name
from lightning_ckpt.security import Encryptor, Signer
from lightning_ckpt.storage import split_url
from lightning_ckpt.summary import load_payload

if TYPE_CHECKING:
    from lightning_ckpt.manager import CheckpointManager, DirectoryScan

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Input the CLI itself rejects (exit code 2)."""


def _message(exc: BaseException) -> str:
    """The readable text of an error (OSError subclasses keep it in ``strerror``)."""
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return str(exc)


def _reason(exc: BaseException, manager: CheckpointManager, name: str) -> str:
    """An error message with the checkpoint's full URL shortened to its name."""
    return _message(exc).replace(manager.url_of(name), name)


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


def _require_key(manager: CheckpointManager, name: str, manifest: Manifest | None) -> None:
    """An encrypted checkpoint without a key: say which option gives it (before any download)."""
    info = manifest.extra.get("encryption") if manifest is not None else None
    if info and manager.encryptor is None:
        raise KeyMissingError(
            f"{manager.url_of(name)} is encrypted ({info.get('alg')}, key id {info.get('key_id')}): give its key "
            "with --encryption-key-file PATH or --encryption-key-env NAME"
        )


def _load(manager: CheckpointManager, name: str, manifest: Manifest | None) -> Any:
    """The verified payload of ``name``; an encrypted one without a key says which option to give."""
    _require_key(manager, name, manifest)
    return load_payload(manager, name, manifest)


def _open_dir(url: str, args: argparse.Namespace) -> tuple[CheckpointManager, DirectoryScan]:
    """The manager of directory ``url`` and a scan of it; a missing directory is a usage error."""
    manager = _manager(url, args)
    kind = manager.storage.kind()
    if kind == "file":
        raise UsageError(f"{manager.url} is a file, not a directory (try `lightning-ckpt inspect`)")
    found = manager.scan()
    if not found.files and kind is None:
        raise UsageError(f"no such directory: {manager.url}")
    return manager, found


def _damaged(found: DirectoryScan, manager: CheckpointManager) -> list[tuple[str, str]]:
    """(name, why) for every checkpoint whose manifest exists but cannot be used, by name."""
    damaged = [(name, why.replace(manager.url_of(name), name)) for name, why in found.damaged]
    damaged += [(name, "its payload is missing (a manifest without a checkpoint file)") for name in found.orphaned]
    return sorted(damaged)


def _check(manager: CheckpointManager, name: str) -> str | None:
    """None if ``name`` verifies (size and digest streamed), else the reason it does not."""
    try:
        manager.verify(name)
    except (CorruptCheckpointError, IncompatibleCheckpointError, CheckpointNotFoundError) as exc:
        return _reason(exc, manager, name)
    return None


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
