"""Tamper evidence (HMAC-signed manifests) and encryption at rest (AES-256-GCM, chunked)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

from lightning_ckpt import (
    CheckpointManager,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    KeyMissingError,
    TamperedCheckpointError,
)
from lightning_ckpt.security import MAGIC, Encryptor, Signer, key_id

K1, K2 = b"1" * 32, b"2" * 32


def state(n: int = 5000) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(float(n)), "b": torch.ones(3)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- signing ------------------------------------------------------------------------------------


def test_sign_and_verify_roundtrip(tmp_path: Path) -> None:
    m = CheckpointManager(str(tmp_path), signer=Signer(K1))
    m.save(state(), "a.ckpt", epoch=3, global_step=7)
    raw = json.loads((tmp_path / "a.ckpt.manifest.json").read_bytes())
    assert raw["signature"]["key_id"] == key_id(K1) and raw["signature"]["alg"] == "HMAC-SHA256"
    assert m.verify("a.ckpt").epoch == 3
    assert same(m.load("a.ckpt"), state())
    assert [x.name for x in m.manifests()] == ["a.ckpt"]
    # signed checkpoints stay readable by a manager without a signer (signing is opt-in)
    assert same(CheckpointManager(str(tmp_path)).load("a.ckpt"), state())


def test_a_modified_payload_is_refused(tmp_path: Path) -> None:
    m = CheckpointManager(str(tmp_path), signer=Signer(K1))
    m.save(state(), "a.ckpt")
    data = bytearray((tmp_path / "a.ckpt").read_bytes())
    data[-100] ^= 1
    (tmp_path / "a.ckpt").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="blake3 digest"):
        m.load("a.ckpt")


def test_a_modified_manifest_is_refused(tmp_path: Path) -> None:
    m = CheckpointManager(str(tmp_path), signer=Signer(K1))
    m.save(state(), "a.ckpt", epoch=1)
    path = tmp_path / "a.ckpt.manifest.json"
    raw = json.loads(path.read_bytes())
    raw["epoch"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(TamperedCheckpointError, match="does not match") as info:
        m.load("a.ckpt")
    assert isinstance(info.value, CorruptCheckpointError) and isinstance(info.value, ValueError)
    with pytest.warns(CheckpointWarning, match="tampered"):
        assert m.manifests() == []


def test_a_payload_swapped_with_its_manifest_rehashed_is_refused(tmp_path: Path) -> None:
    # an attacker replaces the payload and updates size/digest (and its algorithm) but cannot re-sign
    m = CheckpointManager(str(tmp_path), signer=Signer(K1))
    m.save(state(), "a.ckpt")
    CheckpointManager(str(tmp_path / "evil")).save({"w": torch.zeros(3)}, "a.ckpt")
    (tmp_path / "a.ckpt").write_bytes((tmp_path / "evil" / "a.ckpt").read_bytes())
    evil = json.loads((tmp_path / "evil" / "a.ckpt.manifest.json").read_bytes())
    raw = json.loads((tmp_path / "a.ckpt.manifest.json").read_bytes())
    raw.update(size=evil["size"], digest=evil["digest"], digest_algorithm=evil["digest_algorithm"])
    (tmp_path / "a.ckpt.manifest.json").write_text(json.dumps(raw))
    with pytest.raises(TamperedCheckpointError):
        m.load("a.ckpt")


def test_rotated_keys(tmp_path: Path) -> None:
    CheckpointManager(str(tmp_path), signer=Signer(K1)).save(state(), "old.ckpt")
    rotated = CheckpointManager(str(tmp_path), signer=Signer(K2, K1))  # new key signs, old verifies
    rotated.save(state(), "new.ckpt")
    assert json.loads((tmp_path / "new.ckpt.manifest.json").read_bytes())["signature"]["key_id"] == key_id(K2)
    assert [x.name for x in rotated.manifests()] == ["old.ckpt", "new.ckpt"]
    rotated.load("old.ckpt")
    retired = CheckpointManager(str(tmp_path), signer=Signer(K2))  # the old key retired
    with pytest.raises(TamperedCheckpointError, match=key_id(K1)):
        retired.load("old.ckpt")
    retired.load("new.ckpt")


def test_an_unsigned_checkpoint_is_refused_when_a_signer_is_set(tmp_path: Path) -> None:
    CheckpointManager(str(tmp_path)).save(state(), "a.ckpt")
    m = CheckpointManager(str(tmp_path), signer=Signer(K1))
    with pytest.raises(TamperedCheckpointError, match="not signed"):
        m.load("a.ckpt")
    with pytest.raises(TamperedCheckpointError):
        m.verify("a.ckpt")
    # every checkpoint there is refused for want of a key: "last" refuses loudly (issue 15), never
    # "no checkpoint yet" (a fresh start would overwrite them)
    with pytest.warns(CheckpointWarning, match="not signed"), pytest.raises(KeyMissingError, match="unsigned"):
        m.latest()
    torch.save(state(), tmp_path / "plain.ckpt")  # no manifest at all
    with pytest.raises(TamperedCheckpointError, match="no lightning-ckpt manifest"):
        m.load("plain.ckpt")


def test_a_copy_is_signed_too(tmp_path: Path) -> None:
    m = CheckpointManager(str(tmp_path), signer=Signer(K1))
    m.save(state(), "a.ckpt", global_step=1)
    m.copy("a.ckpt", "last.ckpt")
    assert same(m.load("last.ckpt"), state())


def test_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LCKPT_TEST_KEY", K1.hex())
    (tmp_path / "key").write_bytes(K1.hex().encode() + b"\n")
    assert Signer.from_env("LCKPT_TEST_KEY").key_id == Signer.from_file(tmp_path / "key").key_id == key_id(K1)
    assert Encryptor.from_env("LCKPT_TEST_KEY").key_id == key_id(K1)
    monkeypatch.delenv("LCKPT_TEST_KEY")
    with pytest.raises(ConfigurationError, match="LCKPT_TEST_KEY"):
        Signer.from_env("LCKPT_TEST_KEY")
    with pytest.raises(ConfigurationError, match="32 bytes"):
        Encryptor(b"short key of 17 b")
    with pytest.raises(ConfigurationError, match="cannot read key file"):
        Signer.from_file(tmp_path / "nope")
    assert K1.hex() not in repr(Signer(K1)) and "1111" not in repr(Encryptor(K1))


# -- encryption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 10, 300, 256 * 4, 5000])
def test_encryption_roundtrip(tmp_path: Path, n: int) -> None:
    enc = Encryptor(K1, chunk=1024)  # small chunks: many of them, exact multiples included
    m = CheckpointManager(str(tmp_path), encryptor=enc)
    m.save(state(n), "a.ckpt", global_step=1)
    raw = json.loads((tmp_path / "a.ckpt.manifest.json").read_bytes())
    assert raw["extra"]["encryption"] == {"alg": "AES-256-GCM", "key_id": key_id(K1), "chunk": 1024}
    assert raw["size"] == os.path.getsize(tmp_path / "a.ckpt")  # the ciphertext's size and sha256
    assert CheckpointManager(str(tmp_path)).verify("a.ckpt")  # verifying needs no key
    assert same(m.load("a.ckpt"), state(n))
    assert state(n)["w"].numpy().tobytes()[:64] not in (tmp_path / "a.ckpt").read_bytes() or n == 0


@pytest.mark.parametrize("piece", [1, 7, 1024 + 16, 4096, 10**6])
def test_streaming_decryption_matches_whole_decryption(tmp_path: Path, piece: int) -> None:
    enc = Encryptor(K1, chunk=1024)
    m = CheckpointManager(str(tmp_path), encryptor=enc)
    m.save(state(3000), "a.ckpt", global_step=1)
    info = m.read_manifest("a.ckpt").extra["encryption"]
    data = (tmp_path / "a.ckpt").read_bytes()
    out = bytearray()
    dec = enc.decryptor(info, "a.ckpt", len(data), out.extend)
    for start in range(0, len(data), piece):
        dec.write(data[start : start + piece])
    dec.close()
    assert out == enc.decrypt(data, info, "a.ckpt")
    truncated = enc.decryptor(info, "a.ckpt", len(data), out.extend)
    truncated.write(data[:-1])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        truncated.close()
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 1
    with pytest.raises(CorruptCheckpointError, match="authenticate"):
        enc.decryptor(info, "a.ckpt", len(data), out.extend).write(damaged)


def test_stock_torch_load_cannot_read_an_encrypted_file(tmp_path: Path) -> None:
    CheckpointManager(str(tmp_path), encryptor=Encryptor(K1)).save(state(), "a.ckpt")
    assert (tmp_path / "a.ckpt").read_bytes().startswith(MAGIC)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises, it cannot read it
        torch.load(tmp_path / "a.ckpt", weights_only=True)
    with pytest.raises(Exception):  # noqa: B017
        torch.load(io.BytesIO((tmp_path / "a.ckpt").read_bytes()), weights_only=False)


def test_loading_without_the_key(tmp_path: Path) -> None:
    CheckpointManager(str(tmp_path), encryptor=Encryptor(K1)).save(state(), "a.ckpt")
    with pytest.raises(KeyMissingError, match="encrypted.*encryptor=") as info:
        CheckpointManager(str(tmp_path)).load("a.ckpt")
    assert isinstance(info.value, IncompatibleCheckpointError) and isinstance(info.value, ValueError)
    with pytest.raises(KeyMissingError, match=key_id(K1)):
        CheckpointManager(str(tmp_path), encryptor=Encryptor(K2)).load("a.ckpt")


def test_rotated_encryption_keys(tmp_path: Path) -> None:
    CheckpointManager(str(tmp_path), encryptor=Encryptor(K1)).save(state(), "old.ckpt")
    m = CheckpointManager(str(tmp_path), encryptor=Encryptor(K2, K1))
    m.save(state(7), "new.ckpt")
    assert same(m.load("old.ckpt"), state()) and same(m.load("new.ckpt"), state(7))
    assert json.loads((tmp_path / "new.ckpt.manifest.json").read_bytes())["extra"]["encryption"]["key_id"] == key_id(K2)


def tamper(tmp_path: Path, edit) -> CheckpointManager:
    """Apply ``edit`` to the ciphertext and re-hash the manifest, so only GCM can notice."""
    from lightning_ckpt.digest import hash_chunks

    m = CheckpointManager(str(tmp_path), encryptor=Encryptor(K1, chunk=1024))
    m.save(state(), "a.ckpt")
    data = edit((tmp_path / "a.ckpt").read_bytes())
    (tmp_path / "a.ckpt").write_bytes(data)
    path = tmp_path / "a.ckpt.manifest.json"
    raw = json.loads(path.read_bytes())
    raw.update(size=len(data), digest=hash_chunks(raw["digest_algorithm"], [data])[1])
    path.write_text(json.dumps(raw))
    return m


HEAD, CT = len(MAGIC) + 8, 1024 + 16


def test_reordered_chunks_are_refused(tmp_path: Path) -> None:
    m = tamper(tmp_path, lambda d: d[:HEAD] + d[HEAD + CT : HEAD + 2 * CT] + d[HEAD : HEAD + CT] + d[HEAD + 2 * CT :])
    with pytest.raises(CorruptCheckpointError, match="chunk 0 does not authenticate"):
        m.load("a.ckpt")


def test_truncated_ciphertext_is_refused(tmp_path: Path) -> None:
    m = tamper(tmp_path, lambda d: d[: HEAD + 3 * CT])  # whole chunks dropped from the end
    with pytest.raises(CorruptCheckpointError, match="chunk 2 does not authenticate"):
        m.load("a.ckpt")
    m = tamper(tmp_path / "x", lambda d: d[: HEAD + 5])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        m.load("a.ckpt")


def test_a_flipped_ciphertext_byte_is_refused(tmp_path: Path) -> None:
    m = tamper(tmp_path, lambda d: d[:-30] + bytes([d[-30] ^ 1]) + d[-29:])
    with pytest.raises(CorruptCheckpointError, match="does not authenticate"):
        m.load("a.ckpt")


def test_signed_and_encrypted_together(tmp_path: Path) -> None:
    m = CheckpointManager(str(tmp_path), signer=Signer(K1), encryptor=Encryptor(K2))
    m.save(state(), "a.ckpt", global_step=1)
    assert m.latest(keep=True).name == "a.ckpt"
    assert same(m.load("a.ckpt"), state())
    raw = json.loads((tmp_path / "a.ckpt.manifest.json").read_bytes())
    raw["extra"]["encryption"]["chunk"] = 1024  # the encryption record is covered by the signature
    (tmp_path / "a.ckpt.manifest.json").write_text(json.dumps(raw))
    with pytest.raises(TamperedCheckpointError):
        m.load("a.ckpt")


def test_background_saves_are_signed_and_encrypted(tmp_path: Path) -> None:
    from lightning_ckpt.async_saver import AsyncSaver

    m = CheckpointManager(str(tmp_path), signer=Signer(K1), encryptor=Encryptor(K2, chunk=4096))
    saver = AsyncSaver(m)
    saver.save(state(), "a.ckpt", global_step=1).wait()
    saver.close()
    assert (tmp_path / "a.ckpt").read_bytes().startswith(MAGIC)
    assert same(m.load("a.ckpt"), state())


def test_the_callback_signs_encrypts_and_resumes(tmp_path) -> None:
    from helpers import fit

    from lightning_ckpt import CheckpointCallback
    from lightning_ckpt.security import Encryptor, Signer

    keys = {"signer": Signer(b"s" * 32), "encryptor": Encryptor(b"e" * 32)}
    cb = CheckpointCallback(dirpath=str(tmp_path), save_last=True, **keys)
    fit(cb, max_epochs=1)
    with pytest.raises(Exception):  # noqa: B017,PT011 - stock torch.load cannot read ciphertext
        torch.load(tmp_path / "last.ckpt", weights_only=True)
    cb2 = CheckpointCallback(dirpath=str(tmp_path), save_last=True, **keys)
    trainer, _ = fit(cb2, max_epochs=2, ckpt_path="last")
    assert cb2.resumed_from.endswith("last.ckpt") and trainer.global_step == 16
