"""Payload decoding: turning verified bytes into objects.

Owns ``torch.load`` under the weights-only allow-list (memory-mapped where the source is a file
we may map), decryption of an encrypted payload into memory, the checks of ``map_location``
against the devices this machine has, and the wording of why a payload does not load (unsafe,
corrupt, or a device that is missing).

It must not read storage, parse manifests or decide what is verified: callers hand it a source
that has already been checked against its manifest (see :mod:`lightning_ckpt.manager`), and it
never unpickles anything beyond the weights-only allow-list unless the caller asked for
``weights_only=False``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lightning_ckpt.errors import (
    CheckpointError,
    ConfigurationError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    KeyMissingError,
    UnsafeCheckpointError,
)
from lightning_ckpt.storage.sources import Source, hash_file, memory_file
from lightning_ckpt.unpickle import refused_global

if TYPE_CHECKING:
    from lightning_ckpt.integrity import Manifest
    from lightning_ckpt.security import Encryptor

__all__ = ["MapLocation", "calls_caller_code", "check_device", "deserialize"]

MapLocation = Any  # whatever torch.load accepts


def deserialize(
    url: str,
    manifest: Manifest | None,
    source: Source,
    map_location: MapLocation,
    weights_only: bool,
    encryptor: Encryptor | None,
    translate: Callable[[BaseException], Exception],
) -> Any:
    """The objects in verified ``source`` (closed on return); decrypted first when ``manifest``
    says it is encrypted. ``translate`` turns an OS error reading ``source`` into our own.

    A source whose digest is still being checked (``source.pending``) is deserialized meanwhile
    only by the weights-only unpickler, and nothing is returned before the check passed; a full
    unpickle (``weights_only=False``) or a decryption waits for the check first (the rule in
    :mod:`lightning_ckpt.digest`). A failed load of a damaged payload reports the damage.
    """
    try:
        if not source.size:
            raise CorruptCheckpointError(f"{url} is empty")
        info = manifest.extra.get("encryption") if manifest is not None else None
        if not weights_only or info:
            source.check()
        if not info:
            try:
                out = _torch_load(url, source, map_location, weights_only)
            except BaseException:
                source.check()  # damage, if that is why torch failed, is the error to report
                raise
            source.check()
            return out
        plain = _decrypt(url, info, source, encryptor, translate)
        try:
            return _torch_load(url, plain, map_location, weights_only)
        finally:
            plain.close()
    finally:
        source.close()


def _decrypt(url: str, info: Mapping[str, Any], source: Source, encryptor: Encryptor | None,
             translate: Callable[[BaseException], Exception]) -> Source:
    """Decrypt the verified ciphertext chunk by chunk into memory (plaintext never touches a
    disk): on Linux into a memfd that the tensors then map, so ~1x the checkpoint."""
    if encryptor is None:
        raise KeyMissingError(
            f"{url} is encrypted ({info.get('alg')}, key id {info.get('key_id')}); "
            "pass encryptor=Encryptor(...) with its key to load it"
        )
    plain = Source(file=memory_file())
    try:
        decryptor = encryptor.decryptor(info, url, source.size, plain.file.write)
        source.file.seek(0)
        hash_file(source.file, None, source.size, None, translate, sink=decryptor.write)
        decryptor.close()
        source.close()
        plain.size = plain.file.tell()
        plain.file.flush()
        plain.path = plain.fd_path()
    except BaseException:
        plain.close()
        raise
    return plain


def _torch_load(url: str, source: Source, map_location: MapLocation, weights_only: bool) -> Any:
    """``torch.load`` a verified source, memory-mapped where it is a file we may map.

    Mapping (``mmap=True``) keeps a single copy: tensors read their bytes from the page cache (a
    local checkpoint) or from the memfd (decrypted plaintext) only when touched. A local file is
    mapped through its open descriptor, i.e. exactly the inode that was hashed; one changed in
    place since is refused. A download spool is read, not mapped, so it is freed right away
    instead of staying allocated on the spool disk for as long as any loaded tensor lives.
    """
    import torch

    try:
        target = source.fd_path() if source.path is not None else None
        if target is not None or source.path is not None:
            try:
                mapped: str = target or source.path  # type: ignore[assignment]  # one of them is set
                out = torch.load(mapped, map_location=map_location, weights_only=weights_only, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # only an old (non-zip) format cannot be mapped
                    raise
                source.file.seek(0)
                out = torch.load(source.file, map_location=map_location, weights_only=weights_only)
            if source.changed(by_descriptor=target is not None):
                raise CorruptCheckpointError(f"{url} changed while it was being loaded; load it again")
            return out
        # a spool: by its /proc/self/fd path where there is one, so torch reads straight into the
        # tensors (through a Python file object every record is read into bytes, then copied)
        spool_path = source.fd_path()
        source.file.seek(0)
        return torch.load(spool_path or source.file, map_location=map_location, weights_only=weights_only)
    except Exception as exc:
        if isinstance(exc, _CallerMapLocationError):  # the caller's own code failed: its error, as it was
            if _DEVICE_MISSING.search(str(exc.error)):
                raise _device_error(url, map_location, exc.error) from exc.error
            raise exc.error from None
        if isinstance(exc, (CheckpointError, MemoryError)):
            raise
        # torch versions differ in what they wrap into an UnpicklingError: by the words, any type
        if _DEVICE_MISSING.search(str(exc)):
            raise _device_error(url, map_location, exc) from exc
        # why torch refused is decided by scanning the pickles ourselves, not by its wording
        refused = refused_global(source.file) if weights_only else None
        if refused is not None:
            raise UnsafeCheckpointError(
                f"{url} holds objects that weights-only loading refuses (global {refused}). "
                "If you trust the file, load it with weights_only=False."
            ) from exc
        raise CorruptCheckpointError(_unreadable(url, source, exc)) from exc


_ZIP_HEAD, _ZIP_END = b"PK\x03\x04", b"PK\x05\x06"
#: what torch.save wrote before torch 1.6 (no zip): a pickled magic number first
_LEGACY_HEAD = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _unreadable(url: str, source: Source, exc: BaseException) -> str:
    """Why ``url`` cannot be loaded, saying what the file is instead of only torch's last words."""
    detail = str(exc).strip()
    if "WeightsUnpickler error:" in detail:  # the one useful line of torch's weights-only boilerplate
        detail = detail.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n", 1)[0]
    detail = detail.splitlines()[0] if detail else ""
    detail = f"{type(exc).__name__}: {detail[:157] + '...' if len(detail) > 160 else detail}".rstrip(": ")
    try:
        source.file.seek(0)
        head = source.file.read(64)
        end = source.file.seek(0, io.SEEK_END)
        source.file.seek(max(0, end - 65_558))  # a zip's end record sits in its last 64 KiB + 22 B
        tail = source.file.read()
    except (OSError, ValueError):
        head = tail = b""
    if head.startswith(_ZIP_HEAD):
        if _ZIP_END not in tail:
            what = "a zip archive cut short (its central directory is missing): truncated"
        else:
            what = "a zip archive, but not a readable torch checkpoint"
    elif head.startswith(_LEGACY_HEAD):
        what = "a torch file in the pre-1.6 format, damaged or truncated"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = "a plain pickle, not a torch checkpoint"
    else:
        what = f"not a torch checkpoint (neither a zip archive nor a pickle; it starts with {head[:16]!r})"
    return f"{url} is not a readable checkpoint: {what} ({detail})"


def _device_error(url: str, map_location: MapLocation, exc: Exception) -> DeviceUnavailableError:
    return DeviceUnavailableError(
        f"{url} cannot be loaded with map_location={map_location!r} on this machine: {exc} (lightning-ckpt "
        "loads onto the CPU by default; pass map_location='cpu' or a mapping of the saved devices)"
    )


class _CallerMapLocationError(Exception):
    """Carries what a caller's ``map_location`` callable raised past torch and our translation."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _CallerMapLocation:
    """A caller's ``map_location`` callable whose errors stay the caller's (never "corrupt checkpoint")."""

    def __init__(self, fn: Callable[[Any, str], Any]) -> None:
        self.fn = fn

    def __call__(self, storage: Any, location: str) -> Any:
        try:
            return self.fn(storage, location)
        except Exception as exc:
            raise _CallerMapLocationError(exc) from exc

    def __repr__(self) -> str:
        return repr(self.fn)


#: torch.serialization's words for a storage whose device (saved, or from map_location) is not here
_DEVICE_MISSING = re.compile(
    r"Attempting to deserialize object on|device module is not registered|don't know how to restore data location"
    r"|Storage device not recognized|Torch not compiled with \w+ enabled"
)


def calls_caller_code(map_location: MapLocation) -> bool:
    """Whether ``map_location`` (as :func:`check_device` returned it) is the caller's own function,
    which torch hands every storage it loads: such a load must not overlap with the digest check."""
    return isinstance(map_location, _CallerMapLocation)


def check_device(map_location: MapLocation, url: str) -> MapLocation:
    """``map_location`` for ``torch.load`` (bytes as text: torch's own bytes path is broken);
    one that is no device, or names a device this machine lacks, is refused before anything is read."""
    import torch

    if map_location is None or isinstance(map_location, Mapping):
        return map_location  # torch says which saved location has no device (see _DEVICE_MISSING)
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        return _CallerMapLocation(map_location)
    if isinstance(map_location, bytes):  # torch.load takes bytes too
        map_location = map_location.decode("ascii", "replace")
    if not isinstance(map_location, (str, torch.device)):
        raise ConfigurationError(
            f"map_location={map_location!r} is not a device, a mapping of locations or a callable (see torch.load)"
        )
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError) as exc:
        raise ConfigurationError(f"map_location={map_location!r} is not a device: {exc}") from exc
    module = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
    if module is None:
        return map_location
    available = getattr(module, "is_available", None)
    if callable(available) and not available():
        raise DeviceUnavailableError(
            f"cannot load {url} onto {str(device)!r}: torch.{device.type}.is_available() is False on this "
            "machine; pass map_location='cpu' (the default) to load it here"
        )
    count = getattr(module, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise DeviceUnavailableError(
            f"cannot load {url} onto {str(device)!r}: this machine has {count()} {device.type.upper()} "
            "device(s); pass map_location to one that exists"
        )
    return map_location
