"""The manager's commit protocol, verification and retention, over every backend."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from backends import backend  # noqa: F401

from lightning_ckpt import (
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    KeepLatest,
    KeepTopK,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
)
from lightning_ckpt.integrity import Manifest, manifest_name
from lightning_ckpt.manager import PENDING_SUFFIX


def state(v: float = 1.0) -> dict:
    return {"w": torch.full((16,), v), "step": torch.tensor(3), "epoch": 1}


def save(mgr: CheckpointManager, name: str, step: int, loss: float | None = None, owner: str = "me") -> Manifest:
    metrics = {} if loss is None else {"val_loss": loss}
    return mgr.save(state(step), name, global_step=step, epoch=step, metrics=metrics, monitor="val_loss",
                    owner=owner).manifest


def test_save_commits_payload_then_manifest(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    result = mgr.save(state(), "a.ckpt", epoch=1, global_step=10, metrics={"val_loss": 0.5}, monitor="val_loss")
    files = {f.name for f in mgr.storage.list()}
    assert files == {"a.ckpt", "a.ckpt.manifest.json"}
    m = result.manifest
    assert (m.size, m.epoch, m.global_step, m.score) == (mgr.storage.info("a.ckpt").size, 1, 10, 0.5)
    assert {"lightning_ckpt", "torch", "python"} <= set(m.versions)
    assert result.url == mgr.url_of("a.ckpt") and result.throughput > 0
    loaded = mgr.load("a.ckpt")
    assert torch.equal(loaded["w"], state()["w"]) and loaded["epoch"] == 1


def test_listing_sees_only_committed(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "good.ckpt", 1)
    mgr.storage.write_bytes("half.ckpt", b"partial payload")  # a save that died before its manifest
    mgr.storage.write_bytes("half.ckpt" + PENDING_SUFFIX, b"{}")
    mgr.storage.write_bytes("notes.txt", b"mine")  # not ours
    assert [m.name for m in mgr.manifests()] == ["good.ckpt"]
    assert mgr.latest().name == "good.ckpt"
    with pytest.raises(UncommittedCheckpointError):
        mgr.load("half.ckpt")


def test_scan_sorts_every_file_and_changes_nothing(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "b.ckpt", 2)
    save(mgr, "a.ckpt", 1)
    mgr.storage.write_bytes("half.ckpt", b"partial")
    mgr.storage.write_bytes("half.ckpt" + PENDING_SUFFIX, b"{}")
    mgr.storage.write_bytes("bad.ckpt", b"x")
    mgr.storage.write_bytes("bad.ckpt.manifest.json", b"{not json")
    mgr.storage.write_bytes("gone.ckpt.manifest.json", mgr.storage.read_bytes("a.ckpt.manifest.json"))
    mgr.storage.write_bytes("foreign.ckpt", b"someone else's")
    before = {f.name for f in mgr.storage.list()}
    found = mgr.scan()
    assert {f.name for f in mgr.storage.list()} == before
    assert [m.name for m in found.committed] == ["a.ckpt", "b.ckpt"]  # oldest first
    assert [n for n, _ in found.damaged] == ["bad.ckpt"] and "not valid JSON" in found.damaged[0][1]
    assert found.orphaned == ["gone.ckpt"]
    assert found.leftovers == ["half.ckpt", "half.ckpt.pending"] == sorted(mgr.cleanup())
    assert found.unmanaged == ["foreign.ckpt"] and found.files == len(before)
    # manifests() is the committed part, warning about what it skips
    with pytest.warns(CheckpointWarning, match="bad.ckpt"):
        assert [m.name for m in mgr.manifests()] == ["a.ckpt", "b.ckpt"]


def test_cleanup_removes_only_our_leftovers(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "good.ckpt", 1)
    mgr.storage.write_bytes("half.ckpt", b"partial")
    mgr.storage.write_bytes("half.ckpt" + PENDING_SUFFIX, b"{}")
    mgr.storage.write_bytes("good.ckpt" + PENDING_SUFFIX, b"{}")  # crash after commit, before unmark
    mgr.storage.write_bytes("foreign.ckpt", b"someone else's")
    mgr.storage.write_bytes("notes.txt", b"mine")
    removed = mgr.cleanup()
    assert set(removed) == {"half.ckpt", "half.ckpt.pending", "good.ckpt.pending"}
    names = {f.name for f in mgr.storage.list()}
    assert names == {"good.ckpt", "good.ckpt.manifest.json", "foreign.ckpt", "notes.txt"}
    assert mgr.cleanup() == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "empty"])
def test_damaged_payload_is_refused_by_name(backend, damage: str) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "a.ckpt", 1)
    data = bytearray(mgr.storage.read_bytes("a.ckpt"))
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "extend":
        data += b"junk"
    else:
        data = bytearray()
    mgr.storage.write_bytes("a.ckpt", bytes(data))
    with pytest.raises(CorruptCheckpointError, match="a.ckpt"):
        mgr.load("a.ckpt")
    with pytest.raises(CorruptCheckpointError):
        mgr.verify("a.ckpt")
    assert mgr.storage.exists("a.ckpt")  # nothing deleted on the error path


def test_latest_skips_damaged_with_warning(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "old.ckpt", 1)
    save(mgr, "new.ckpt", 2)
    mgr.storage.write_bytes("new.ckpt", b"garbage")
    with pytest.warns(CheckpointWarning, match="new.ckpt"):
        assert mgr.latest().name == "old.ckpt"
    mgr.storage.write_bytes("old.ckpt", b"garbage")
    with pytest.warns(CheckpointWarning):
        assert mgr.latest() is None


def test_corrupt_and_newer_manifests(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "a.ckpt", 1)
    save(mgr, "b.ckpt", 2)
    mgr.storage.write_bytes(manifest_name("a.ckpt"), b"{not json")
    raw = mgr.storage.read_bytes(manifest_name("b.ckpt")).replace(b'"format_version": 4', b'"format_version": 99')
    mgr.storage.write_bytes(manifest_name("b.ckpt"), raw)
    with pytest.raises(CorruptCheckpointError, match="JSON"):
        mgr.load("a.ckpt")
    with pytest.raises(IncompatibleCheckpointError, match="upgrade"):
        mgr.load("b.ckpt")
    with pytest.warns(CheckpointWarning):
        assert mgr.manifests() == []


def test_missing_checkpoint(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        mgr.load("nope.ckpt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(mgr.url_of("nope.ckpt"), options)
    assert mgr.latest() is None and mgr.manifests() == []


def test_weights_only_refuses_code(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    mgr.save({"x": Evil()}, "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        mgr.load("evil.ckpt")


def test_plain_torch_file_without_manifest_loads_with_warning(tmp_path) -> None:
    torch.save(state(), tmp_path / "plain.ckpt")
    mgr = CheckpointManager(str(tmp_path))
    with pytest.warns(CheckpointWarning, match="unverified"):
        assert mgr.load("plain.ckpt")["epoch"] == 1
    (tmp_path / "junk.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError):
        mgr.load("junk.ckpt")


def test_overwrite_replaces_committed_checkpoint(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "last.ckpt", 1)
    save(mgr, "last.ckpt", 2)
    assert [m.global_step for m in mgr.manifests()] == [2]
    assert torch.equal(mgr.load("last.ckpt")["w"], state(2)["w"])


def test_copy_commits_identical_bytes(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    a = save(mgr, "a.ckpt", 1)
    b = mgr.copy("a.ckpt", "last.ckpt", owner="me/last").manifest
    assert (b.digest, b.size, b.owner, b.name) == (a.digest, a.size, "me/last", "last.ckpt")
    mgr.verify("last.ckpt")
    mgr.delete("a.ckpt")
    assert mgr.load("last.ckpt")["epoch"] == 1


def test_prune_top_k_keeps_protected_and_newest(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    for step, loss in [(1, 0.9), (2, 0.2), (3, 0.5), (4, 0.7)]:
        save(mgr, f"s{step}.ckpt", step, loss)
    save(mgr, "other.ckpt", 5, 0.01, owner="someone-else")
    mgr.storage.write_bytes("notes.txt", b"keep me")
    doomed = mgr.prune(KeepTopK(1, "val_loss"), owner="me", protect={"s1.ckpt"}, dry_run=True)
    assert sorted(doomed) == ["s3.ckpt"]  # s2 best, s1 protected, s4 newest
    assert len(mgr.manifests()) == 5  # dry run deleted nothing
    mgr.prune(KeepTopK(1, "val_loss"), owner="me", protect={"s1.ckpt"})
    names = {f.name for f in mgr.storage.list()}
    assert "s3.ckpt" not in names and "s3.ckpt.manifest.json" not in names
    assert {"s1.ckpt", "s2.ckpt", "s4.ckpt", "other.ckpt", "notes.txt"} <= names
    assert mgr.prune(KeepLatest(1), owner="nobody") == []


def test_prune_without_owner_judges_each_owner_and_keeps_each_newest(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    for step in (1, 2, 3):
        save(mgr, f"me{step}.ckpt", step)
    save(mgr, "theirs1.ckpt", 1, owner="them")
    save(mgr, "theirs2.ckpt", 2, owner="them")
    # the same decision the callback and `lightning-ckpt prune` apply: per owner, its newest always stays
    assert sorted(mgr.prune(KeepLatest(1))) == ["me1.ckpt", "me2.ckpt", "theirs1.ckpt"]
    assert sorted(m.name for m in mgr.manifests()) == ["me3.ckpt", "theirs2.ckpt"]


def test_manifest_or_none_tells_a_foreign_file_from_our_interrupted_save(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    committed = save(mgr, "ours.ckpt", 1)
    assert mgr.manifest_or_none("ours.ckpt") == committed
    mgr.storage.write_bytes("stock.ckpt", b"written by another tool")
    assert mgr.manifest_or_none("stock.ckpt") is None  # readable only unverified
    with pytest.raises(UncommittedCheckpointError):
        mgr.manifest_or_none("stock.ckpt", unverified_ok=lambda: False)
    mgr.storage.write_bytes("half.ckpt", b"partial payload")
    mgr.storage.write_bytes("half.ckpt" + PENDING_SUFFIX, b"{}")
    with pytest.raises(UncommittedCheckpointError):
        mgr.manifest_or_none("half.ckpt")  # an interrupted save of ours is never "no manifest"
    with pytest.raises(CheckpointNotFoundError):
        mgr.manifest_or_none("absent.ckpt")


def test_delete_refuses_files_we_did_not_commit(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    mgr.storage.write_bytes("foreign.ckpt", b"x")
    with pytest.raises(UncommittedCheckpointError):
        mgr.delete("foreign.ckpt")
    assert mgr.storage.exists("foreign.ckpt")


def test_best(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    for step, loss in [(1, 0.9), (2, 0.2), (3, 0.5)]:
        save(mgr, f"s{step}.ckpt", step, loss)
    assert mgr.best("val_loss", "min").name == "s2.ckpt"
    assert mgr.best("val_loss", "max").name == "s1.ckpt"
    assert mgr.best("val_acc") is None


def test_load_maps_to_cpu_and_keeps_dtypes(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    mgr.save({"h": torch.ones(3, dtype=torch.float16), "b": torch.tensor([True])}, "x.ckpt")
    out = mgr.load("x.ckpt", map_location="cpu")
    assert out["h"].dtype == torch.float16 and out["h"].device.type == "cpu" and out["b"].item()
    # stock torch reads the same file
    assert torch.equal(torch.load(tmp_path / "x.ckpt", weights_only=True)["h"], out["h"])


def test_loading_spools_remote_payloads_into_spool_dir_and_leaves_nothing(backend, tmp_path) -> None:  # noqa: F811
    url, options = backend
    spool = tmp_path / "spool"
    spool.mkdir()
    mgr = CheckpointManager(url, options, spool_dir=str(spool))
    big = {"w": torch.randn(3 * 2**20)}  # 12 MiB: several read blocks
    mgr.save(big, "a.ckpt", global_step=1)
    assert torch.equal(mgr.load("a.ckpt")["w"], big["w"])
    assert mgr.latest(keep=True).name == "a.ckpt"  # verified once, kept (open or spooled) for the load
    assert torch.equal(mgr.load("a.ckpt")["w"], big["w"])
    assert torch.equal(load_checkpoint(f"{url}/a.ckpt", options, spool_dir=str(spool))["w"], big["w"])
    assert list(spool.iterdir()) == []  # spool files are anonymous and gone
    with pytest.raises(ConfigurationError, match="spool_dir"):
        CheckpointManager(url, options, spool_dir=str(tmp_path / "missing"))


def test_a_local_checkpoint_changed_in_place_after_verifying_is_refused(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(state(1), "a.ckpt", global_step=1)
    mgr.verify("a.ckpt", keep=True)
    with open(tmp_path / "a.ckpt", "r+b") as f:  # someone writes into the file itself
        f.seek(-100, 2)
        f.write(b"\0")
    with pytest.raises(CorruptCheckpointError, match="changed"):
        mgr.load("a.ckpt")
    with pytest.raises(CorruptCheckpointError, match="xxh3-128 digest"):
        mgr.load("a.ckpt")  # a fresh load re-hashes it


def test_a_local_checkpoint_replaced_after_verifying_loads_the_verified_bytes(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(state(1), "a.ckpt", global_step=1)
    mgr.verify("a.ckpt", keep=True)
    torch.save(state(2), tmp_path / "other")
    os.replace(tmp_path / "other", tmp_path / "a.ckpt")  # an atomic replace, as every save does
    assert torch.equal(mgr.load("a.ckpt")["w"], state(1)["w"])  # exactly what was hashed


def test_encrypted_checkpoints_load_on_every_backend(backend) -> None:  # noqa: F811
    from lightning_ckpt.security import Encryptor

    url, options = backend
    mgr = CheckpointManager(url, options, encryptor=Encryptor(b"k" * 32, chunk=2**20))
    big = {"w": torch.randn(2**20 + 5)}  # several encrypted chunks and read blocks
    mgr.save(big, "a.ckpt", global_step=1)
    assert torch.equal(mgr.load("a.ckpt")["w"], big["w"])
    assert torch.equal(load_checkpoint(f"{url}/a.ckpt", options, encryptor=mgr.encryptor)["w"], big["w"])


def test_the_unverified_load_warning_names_the_callers_line(tmp_path) -> None:
    # load_checkpoint calls manager.load inside the package: the warning must point at this file
    # (where the user called), not at a line of lightning_ckpt
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.ckpt")
    for load in (lambda: load_checkpoint(str(tmp_path / "plain.ckpt")),
                 lambda: CheckpointManager(str(tmp_path)).load("plain.ckpt")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert torch.equal(load()["w"], torch.ones(2))
        [w] = [w for w in caught if issubclass(w.category, CheckpointWarning)]
        assert "loading it unverified" in str(w.message)
        assert w.filename == __file__
