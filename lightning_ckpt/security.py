"""Tamper evidence and encryption at rest, both off by default.

:class:`Signer` signs each manifest with HMAC-SHA256 over its canonical JSON (sorted keys, no
whitespace, the ``signature`` field left out). The manifest already holds the payload's size and
sha256, so a valid signature covers the payload too: change one byte of either and the checkpoint
is refused with :class:`~lightning_ckpt.errors.TamperedCheckpointError`.

:class:`Encryptor` encrypts the payload with AES-256-GCM in fixed-size chunks while it streams
to storage (nothing is held in memory whole). Each chunk has its own 96-bit nonce (a random
64-bit prefix per file + a 32-bit chunk counter) and authenticates, as associated data, the
file's prefix, the chunk index and whether it is the last chunk, so reordered, dropped,
duplicated or truncated chunks are refused. The manifest records the *ciphertext*'s size and
sha256 (so ``verify`` works without the key) and ``extra["encryption"]`` = ``{"alg", "key_id",
"chunk"}``. An encrypted checkpoint is not readable by stock ``torch.load``.

Keys come from what the user names explicitly — an environment variable's *name*
(``from_env("LCKPT_KEY")``), a key file (``from_file(path)``) or bytes; a key is 32 raw bytes or
64 hex digits (a file may end in a newline). There is no default key and no implicit lookup.
Several keys can be given: the first signs/encrypts, all of them verify/decrypt (key rotation).
A key is known by its id, the first 8 hex digits of sha256(key), recorded in the manifest.

This module owns keys, signatures and the cipher; it must not read storage or parse manifests
(:func:`lightning_ckpt.integrity.parse_manifest` calls :meth:`Signer.check` and
:meth:`Encryptor.check_encrypted`; :mod:`lightning_ckpt.payload` decrypts through :meth:`Encryptor.decryptor`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable, Mapping
from typing import IO, Any

from lightning_ckpt.errors import (
    ConfigurationError,
    CorruptCheckpointError,
    KeyMissingError,
    TamperedCheckpointError,
)

__all__ = ["DecryptingWriter", "EncryptingWriter", "Encryptor", "Signer", "canonical", "decrypt", "key_id"]

ALG_HMAC = "HMAC-SHA256"
ALG_AES = "AES-256-GCM"
MAGIC = b"LCKPTENC1"
#: plaintext bytes per encrypted chunk
DEFAULT_CHUNK = 4 * 2**20
_TAG = 16
_PREFIX = 8


def key_id(key: bytes) -> str:
    """The public name of a key: the first 8 hex digits of its sha256."""
    return hashlib.sha256(key).hexdigest()[:8]


def _parse_key(raw: bytes | str, where: str, length: int | None) -> bytes:
    if isinstance(raw, str):
        raw = raw.encode()
    text = raw.strip()
    try:
        if len(text) == 64 and all(c in b"0123456789abcdefABCDEF" for c in text):
            key = bytes.fromhex(text.decode())
        else:
            key = bytes(raw)
    except ValueError as exc:  # pragma: no cover - guarded by the check above
        raise ConfigurationError(f"the key from {where} is not valid hex: {exc}") from exc
    if length is not None and len(key) != length:
        raise ConfigurationError(f"the key from {where} must be {length} bytes (or {2 * length} hex digits), "
                                 f"got {len(key)} bytes")
    if len(key) < 16:
        raise ConfigurationError(f"the key from {where} is too short ({len(key)} bytes; use at least 32)")
    return key


class _Keyring:
    """An ordered set of keys: the first one is current, all are accepted for reading."""

    length: int | None = None

    def __init__(self, *keys: bytes) -> None:
        if not keys:
            raise ConfigurationError(f"{type(self).__name__} needs at least one key")
        self.keys = [_parse_key(k, "the arguments", self.length) for k in keys]
        self._by_id = {key_id(k): k for k in self.keys}

    @classmethod
    def from_env(cls, *names: str) -> Any:
        """Keys from the environment variables *named* here (the first is the current key)."""
        keys = []
        for name in names:
            value = os.environ.get(name)
            if not value:
                raise ConfigurationError(f"environment variable {name} (named as a lightning-ckpt key) is not set")
            keys.append(_parse_key(value, f"${name}", cls.length))
        return cls(*keys)

    @classmethod
    def from_file(cls, *paths: str | os.PathLike[str]) -> Any:
        """Keys from files holding 32 raw bytes or 64 hex digits (the first is the current key)."""
        keys = []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise ConfigurationError(f"cannot read key file {os.fspath(path)!r}: {exc}") from exc
            keys.append(_parse_key(data, os.fspath(path), cls.length))
        return cls(*keys)

    @property
    def key_id(self) -> str:
        """The id of the current key (the one that signs or encrypts)."""
        return key_id(self.keys[0])

    @property
    def key_ids(self) -> list[str]:
        """Ids of every accepted key."""
        return list(self._by_id)

    def key_for(self, kid: str | None) -> bytes | None:
        return self._by_id.get(kid) if kid else None

    def __repr__(self) -> str:  # never the keys themselves
        return f"{type(self).__name__}(key_ids={self.key_ids})"


def _refusal(message: str, seen: str) -> TamperedCheckpointError:
    """A checkpoint refused for want of a configured key rather than for a bad signature:
    ``key_seen`` is the key id it carries, or ``"unsigned"`` / ``"unencrypted"``. A run whose
    every checkpoint is refused so is a wrong configuration, not damage (see
    :meth:`~lightning_ckpt.manager.CheckpointManager.latest`)."""
    exc = TamperedCheckpointError(message)
    exc.key_seen = seen  # type: ignore[attr-defined]
    return exc


# -- signing ----------------------------------------------------------------------------------


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: the manifest without its signature, sorted, compact JSON."""
    body = {k: v for k, v in fields.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


class Signer(_Keyring):
    """HMAC-SHA256 manifest signatures; ``Signer(new_key, old_key)`` signs with the first.

    Build with ``Signer(b"...32 bytes...")``, ``Signer.from_env("LCKPT_KEY", "LCKPT_OLD_KEY")`` or
    ``Signer.from_file(path)``. Keys of any length of at least 16 bytes are accepted (32 advised).
    """

    def sign(self, fields: Mapping[str, Any]) -> dict[str, str]:
        """The ``signature`` field for a manifest's ``fields``."""
        mac = hmac.new(self.keys[0], canonical(fields), hashlib.sha256).hexdigest()
        return {"alg": ALG_HMAC, "key_id": self.key_id, "mac": mac}

    def check(self, fields: Mapping[str, Any], where: str) -> None:
        """Raise :class:`TamperedCheckpointError` unless ``fields["signature"]`` is valid."""
        sig = fields.get("signature")
        if not isinstance(sig, dict) or not sig.get("mac"):
            raise _refusal(f"{where} is not signed, but a signer is configured (refusing it)", "unsigned")
        if not all(isinstance(sig.get(k), str) for k in ("alg", "key_id", "mac")):
            raise TamperedCheckpointError(f"{where} has a malformed signature")
        if sig.get("alg") != ALG_HMAC:
            raise TamperedCheckpointError(f"{where} has an unknown signature algorithm {sig.get('alg')!r}")
        key = self.key_for(sig.get("key_id"))
        if key is None:
            raise _refusal(
                f"{where} is signed with key {sig.get('key_id')!r}, not one of the configured keys "
                f"{self.key_ids} (add the old key to the Signer to accept it)",
                str(sig.get("key_id")),
            )
        expected = hmac.new(key, canonical(fields), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, str(sig["mac"])):
            raise TamperedCheckpointError(f"the signature of {where} does not match its manifest (tampered)")


# -- encryption -------------------------------------------------------------------------------


def _aesgcm(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError("encryption needs the `cryptography` package: pip install cryptography") from exc
    return AESGCM(key)


def _aad(prefix: bytes, index: int, final: bool) -> bytes:
    return MAGIC + prefix + struct.pack(">IB", index, int(final))


class Encryptor(_Keyring):
    """AES-256-GCM encryption of payloads, chunk by chunk; ``Encryptor(new_key, old_key)``.

    Keys are exactly 32 bytes (or 64 hex digits). ``chunk`` is the plaintext size per chunk.
    """

    length = 32

    def __init__(self, *keys: bytes, chunk: int = DEFAULT_CHUNK, allow_plaintext: bool = False) -> None:
        super().__init__(*keys)
        if not 1024 <= chunk <= 2**30:
            raise ConfigurationError(f"Encryptor(chunk={chunk}) must be between 1 KiB and 1 GiB")
        self.chunk = chunk
        #: accept unencrypted checkpoints on read (turning encryption on for an existing run);
        #: off, an unencrypted one is refused: anyone who can write the directory could plant it
        self.allow_plaintext = bool(allow_plaintext)

    @classmethod
    def from_env(cls, *names: str, chunk: int = DEFAULT_CHUNK, allow_plaintext: bool = False) -> Encryptor:
        enc = super().from_env(*names)
        enc.chunk, enc.allow_plaintext = chunk, bool(allow_plaintext)
        return enc  # type: ignore[no-any-return]

    @classmethod
    def from_file(
        cls, *paths: str | os.PathLike[str], chunk: int = DEFAULT_CHUNK, allow_plaintext: bool = False
    ) -> Encryptor:
        enc = super().from_file(*paths)
        enc.chunk, enc.allow_plaintext = chunk, bool(allow_plaintext)
        return enc  # type: ignore[no-any-return]

    def check_encrypted(self, info: Any, where: str) -> None:
        """Refuse an unencrypted checkpoint (``info`` is its manifest's ``extra["encryption"]``)
        unless ``allow_plaintext``: an attacker who swaps in plaintext and drops the record must
        not get it loaded as if it were ours."""
        if not info and not self.allow_plaintext:
            raise _refusal(
                f"{where} is not encrypted, but an encryptor is configured (refusing it; pass "
                "Encryptor(..., allow_plaintext=True) to accept unencrypted checkpoints)",
                "unencrypted",
            )

    def describe(self) -> dict[str, Any]:
        """What the manifest records (never the key)."""
        return {"alg": ALG_AES, "key_id": self.key_id, "chunk": self.chunk}

    def writer(self, sink: IO[bytes]) -> EncryptingWriter:
        """A write-only stream that encrypts into ``sink``; ``close()`` writes the last chunk."""
        return EncryptingWriter(sink, self.keys[0], self.chunk)

    def decrypt(self, data: bytes | bytearray | memoryview, info: Mapping[str, Any], where: str) -> bytearray:
        """The plaintext of a whole encrypted payload (a second buffer; chunks are authenticated)."""
        key, chunk = self._key_and_chunk(info, where)
        return decrypt(data, key, chunk, where)

    def decryptor(
        self, info: Mapping[str, Any], where: str, total: int, sink: Callable[[bytes], Any]
    ) -> DecryptingWriter:
        """A write-only stream taking the ``total`` bytes of an encrypted payload in any pieces and
        handing each authenticated plaintext chunk to ``sink``; at most one chunk is buffered."""
        key, chunk = self._key_and_chunk(info, where)
        return DecryptingWriter(sink, key, chunk, total, where)

    def _key_and_chunk(self, info: Mapping[str, Any], where: str) -> tuple[bytes, int]:
        if info.get("alg") != ALG_AES:
            raise CorruptCheckpointError(f"{where} uses an unknown encryption {info.get('alg')!r}")
        key = self.key_for(info.get("key_id"))
        if key is None:
            raise KeyMissingError(
                f"{where} is encrypted with key {info.get('key_id')!r}, not one of the configured keys {self.key_ids}"
            )
        chunk = info.get("chunk")
        if not isinstance(chunk, int) or chunk < 1:
            raise CorruptCheckpointError(f"{where}: the manifest's encryption record has no valid chunk size")
        return key, chunk


class EncryptingWriter:
    """Buffers at most one chunk of plaintext; writes ``MAGIC | prefix | chunk (ct+tag) ...``."""

    def __init__(self, sink: IO[bytes], key: bytes, chunk: int) -> None:
        self._sink = sink
        self._aes = _aesgcm(key)
        self._chunk = chunk
        self._prefix = os.urandom(_PREFIX)
        self._buf = bytearray()
        self._index = 0
        self._closed = False
        sink.write(MAGIC + self._prefix)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < view.nbytes:
            take = min(self._chunk - len(self._buf), view.nbytes - pos)
            self._buf += view[pos : pos + take]
            pos += take
            # a full chunk is held back until more data shows it is not the last one
            if len(self._buf) == self._chunk and pos < view.nbytes:
                self._emit(final=False)
        return view.nbytes

    def _emit(self, final: bool) -> None:
        if self._index >= 2**32 - 1:
            raise ValueError("payload too large for one encrypted stream")
        nonce = self._prefix + struct.pack(">I", self._index)
        self._sink.write(self._aes.encrypt(nonce, bytes(self._buf), _aad(self._prefix, self._index, final)))
        self._index += 1
        self._buf = bytearray()

    def flush(self) -> None:
        """Data stays buffered until a chunk is full (a chunk is encrypted whole)."""

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Encrypt and write the final chunk (always written, possibly empty)."""
        if not self._closed:
            self._closed = True
            self._emit(final=True)


class DecryptingWriter:
    """The inverse of :class:`EncryptingWriter`, streaming: ``write`` ciphertext, get plaintext.

    The ciphertext's ``total`` size must be known (the manifest records it): it tells which chunk
    is the last, and the last chunk's authentication refuses a truncated or extended stream.
    """

    def __init__(self, sink: Callable[[bytes], Any], key: bytes, chunk: int, total: int, where: str) -> None:
        from cryptography.exceptions import InvalidTag

        self._invalid_tag = InvalidTag
        self._sink = sink
        self._aes = _aesgcm(key)
        self._chunk = chunk
        self._total = total
        self._where = where
        self._buf = bytearray()
        self._prefix: bytes | None = None
        self._pos = 0  # ciphertext bytes consumed
        self._index = 0
        self._finished = False
        if total < len(MAGIC) + _PREFIX + _TAG:
            raise CorruptCheckpointError(f"{where} is not a lightning-ckpt encrypted payload (or is truncated)")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self._finished and view.nbytes:
            raise CorruptCheckpointError(f"{self._where}: data after the last encrypted chunk")
        self._buf += view
        self._drain()
        return view.nbytes

    def _drain(self) -> None:
        head = len(MAGIC) + _PREFIX
        if self._prefix is None:
            if len(self._buf) < head:
                return
            if bytes(self._buf[: len(MAGIC)]) != MAGIC:
                raise CorruptCheckpointError(f"{self._where} is not a lightning-ckpt encrypted payload")
            self._prefix = bytes(self._buf[len(MAGIC) : head])
            del self._buf[:head]
            self._pos = head
        while not self._finished:
            remaining = self._total - self._pos
            if remaining < _TAG:
                raise CorruptCheckpointError(f"{self._where}: encrypted payload truncated at chunk {self._index}")
            final = remaining <= self._chunk + _TAG
            size = remaining if final else self._chunk + _TAG
            if len(self._buf) < size:
                return
            nonce = self._prefix + struct.pack(">I", self._index)
            try:
                plain = self._aes.decrypt(nonce, bytes(self._buf[:size]), _aad(self._prefix, self._index, final))
            except self._invalid_tag:
                raise CorruptCheckpointError(
                    f"{self._where}: encrypted chunk {self._index} does not authenticate (damaged, reordered or "
                    "truncated)"
                ) from None
            del self._buf[:size]
            self._pos += size
            self._index += 1
            self._finished = final
            self._sink(plain)
        if self._buf:
            raise CorruptCheckpointError(f"{self._where}: data after the last encrypted chunk")

    def close(self) -> None:
        """Raise unless the whole stream, up to its authenticated last chunk, was written."""
        if not self._finished:
            raise CorruptCheckpointError(f"{self._where}: encrypted payload truncated at chunk {self._index}")


def decrypt(data: bytes | bytearray | memoryview, key: bytes, chunk: int, where: str) -> bytearray:
    """Decrypt a whole stream written by :class:`EncryptingWriter` with chunk size ``chunk``."""
    from cryptography.exceptions import InvalidTag

    view = memoryview(data).cast("B")
    head = len(MAGIC) + _PREFIX
    if view.nbytes < head + _TAG or bytes(view[: len(MAGIC)]) != MAGIC:
        raise CorruptCheckpointError(f"{where} is not a lightning-ckpt encrypted payload (or is truncated)")
    prefix = bytes(view[len(MAGIC) : head])
    aes = _aesgcm(key)
    out = bytearray()
    pos, index = head, 0
    while True:
        remaining = view.nbytes - pos
        if remaining < _TAG:
            raise CorruptCheckpointError(f"{where}: encrypted payload truncated at chunk {index}")
        # every chunk but the last holds exactly `chunk` bytes of plaintext
        final = remaining <= chunk + _TAG
        size = remaining if final else chunk + _TAG
        try:
            out += aes.decrypt(prefix + struct.pack(">I", index), bytes(view[pos : pos + size]),
                               _aad(prefix, index, final))
        except InvalidTag:
            raise CorruptCheckpointError(
                f"{where}: encrypted chunk {index} does not authenticate (damaged, reordered or truncated)"
            ) from None
        pos += size
        index += 1
        if final:
            return out
