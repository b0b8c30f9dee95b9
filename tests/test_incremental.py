"""Incremental checkpoints: unchanged tensors are stored once, every checkpoint stays complete.

Through the manager (plain PyTorch), the fault-injecting filesystem, signing and encryption, the
collector's handshake with writers, and the callback under a real Trainer (exact resume).
"""

from __future__ import annotations

import collections
import errno
import json
import os
import subprocess
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from faulty_fs import Fault, FaultPlan, register

from lightning_ckpt import (
    CheckpointError,
    CheckpointManager,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    Incremental,
    KeyMissingError,
    RetryPolicy,
    StorageError,
    TamperedCheckpointError,
)
from lightning_ckpt import layout, pieces
from lightning_ckpt.integrity import manifest_name
from lightning_ckpt.security import Encryptor, Signer

FAST = RetryPolicy(attempts=2, initial_delay=0.0)
KB = 1024


def packs(manager: CheckpointManager) -> dict[str, int]:
    return {f.name: f.size for f in manager.storage.list() if pieces.is_pack(f.name)}


class Run:
    """A state with a frozen part (never touched), a trained part and Adam-like moments."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.frozen = torch.randn(256, 256, generator=g)  # 256 KiB
        self.emb = torch.randn(100, 64, generator=g).to(torch.bfloat16)  # 12.5 KiB: inline by default
        self.head = torch.randn(64, 256, generator=g)  # 64 KiB
        self.moment = torch.zeros(64, 256)
        self.ids = torch.arange(20000, dtype=torch.int64)  # 156 KiB, never changes
        self.mask = torch.ones(70000, dtype=torch.bool)

    def step(self) -> None:
        with torch.no_grad():
            self.head.add_(0.5)
            self.moment.add_(self.head * 2)

    def state(self) -> dict[str, Any]:
        sd = collections.OrderedDict(frozen=self.frozen, emb=self.emb.detach(), head=self.head.detach(),
                                     ids=self.ids, mask=self.mask)
        return {"state_dict": sd, "optimizer_states": [{"state": {0: {"exp_avg": self.moment}}, "param_groups": [
            {"lr": 0.1, "params": [0]}]}], "epoch": 3, "pair": (1, self.frozen)}

    def expected(self) -> dict[str, torch.Tensor]:
        return {"frozen": self.frozen.clone(), "head": self.head.clone(), "moment": self.moment.clone()}


def check(loaded: dict[str, Any], want: dict[str, torch.Tensor]) -> None:
    sd = loaded["state_dict"]
    assert torch.equal(sd["frozen"], want["frozen"]) and sd["frozen"].dtype == torch.float32
    assert torch.equal(sd["head"], want["head"])
    assert torch.equal(loaded["optimizer_states"][0]["state"][0]["exp_avg"], want["moment"])
    assert sd["ids"].dtype == torch.int64 and torch.equal(sd["ids"], torch.arange(20000))
    assert sd["mask"].dtype == torch.bool and bool(sd["mask"].all())
    assert sd["emb"].dtype == torch.bfloat16
    assert type(sd) is collections.OrderedDict and isinstance(loaded["pair"], tuple)
    assert torch.equal(loaded["pair"][1], want["frozen"])


def test_a_frozen_tensor_is_stored_once_and_every_checkpoint_loads_complete(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    inc = Incremental()
    run, expected = Run(), []
    for i in range(4):
        run.step()
        manager.save(run.state(), f"e{i}.ckpt", global_step=i, incremental=inc)
        expected.append(run.expected())
    stored = sum(packs(manager).values())
    frozen = run.frozen.nbytes + run.ids.nbytes + run.mask.nbytes
    # frozen bytes once; head + moment (64 KiB each) four times; the pair's frozen alias shares too
    assert stored == frozen + 4 * 2 * 64 * KB
    for i in range(4):
        check(manager.load(f"e{i}.ckpt"), expected[i])
        manager.verify(f"e{i}.ckpt")
    # a stock reader of the payload alone gets placeholders, never silently wrong values
    raw = torch.load(tmp_path / "e3.ckpt", weights_only=True)
    assert raw["state_dict"]["frozen"].device.type == "meta"
    assert json.loads((tmp_path / manifest_name("e3.ckpt")).read_bytes())["format_version"] == 4  # incremental (3) with a named digest (4)


def test_the_shortcut_skips_copy_and_hash_of_unchanged_tensors(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    inc = Incremental(confirm_every=100)
    run = Run()
    manager.save(run.state(), "a.ckpt", incremental=inc)
    run.step()
    job = inc.prepare(run.state())
    reused = {path[-1] for path in job.reused}
    assert reused == {"frozen", "ids", "mask"}  # (the tuple holds the same frozen object); head, moment changed
    manager.save(job.state, "b.ckpt", incremental=job)
    assert job.written == 2 * 64 * KB
    check(manager.load("b.ckpt"), run.expected())


def test_tied_tensors_stay_tied_and_small_ones_inline(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    w = torch.randn(128, 128)
    view = w[:64]  # a view: shares the storage, so both stay inline
    state = {"a": w, "b": w, "v": view, "meta": torch.empty(5, device="meta"), "c": torch.randn(128, 128)}
    manager.save(state, "t.ckpt", incremental=Incremental())
    out = manager.load("t.ckpt")
    assert out["a"].data_ptr() == out["v"].data_ptr() and torch.equal(out["v"], w[:64])
    assert out["meta"].device.type == "meta" and out["meta"].shape == (5,)
    assert torch.equal(out["c"], state["c"])


def test_a_write_the_version_counter_misses_is_caught_by_the_confirmation(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    inc = Incremental(confirm_every=2)
    frozen = torch.randn(256, 256)
    manager.save({"w": frozen}, "a.ckpt", incremental=inc)
    frozen.data.add_(1)  # `.data` does not move the version counter
    saves, caught = 0, None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(3):
            manager.save({"w": frozen}, f"b{i}.ckpt", incremental=inc)
            if torch.equal(manager.load(f"b{i}.ckpt")["w"], frozen):
                caught = i
                break
            saves += 1
    assert caught is not None and caught < 2  # within confirm_every saves
    assert any("version counter" in str(w.message) for w in seen)
    frozen.data.add_(1)  # from now on hashed every save: the very next save holds the new bytes
    manager.save({"w": frozen}, "c.ckpt", incremental=inc)
    assert torch.equal(manager.load("c.ckpt")["w"], frozen)


def test_prune_frees_a_shared_piece_exactly_when_its_last_checkpoint_goes(tmp_path: Path) -> None:
    from lightning_ckpt import KeepLatest

    manager = CheckpointManager(str(tmp_path))
    inc = Incremental()
    run = Run()
    for i in range(3):
        run.step()
        manager.save(run.state(), f"e{i}.ckpt", global_step=i, incremental=inc)
    first = {r.file for r in pieces.table_of(manager.read_manifest("e0.ckpt")).refs if r}
    assert len(packs(manager)) == 3
    manager.prune(KeepLatest(1))
    # e0's pack still holds the frozen pieces e2 references; e1's pack held only its own head/moment
    left = packs(manager)
    assert set(left) == first | {r.file for r in pieces.table_of(manager.read_manifest("e2.ckpt")).refs if r}
    assert len(left) == 2
    check(manager.load("e2.ckpt"), run.expected())
    manager.delete("e2.ckpt")
    assert packs(manager) == {}


def test_a_copy_shares_the_pieces_and_outlives_its_source(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    run = Run()
    manager.save(run.state(), "e0.ckpt", incremental=Incremental())
    manager.copy("e0.ckpt", "last.ckpt")
    manager.delete("e0.ckpt")
    check(manager.load("last.ckpt"), run.expected())
    manager.delete("last.ckpt")
    assert packs(manager) == {}


@pytest.fixture
def faulty() -> tuple[str, dict[str, Any], FaultPlan]:
    register()
    plan = FaultPlan()
    return f"faulty://i-{uuid.uuid4().hex[:8]}/ckpts", {"target_protocol": "memory", "plan": plan}, plan


def test_a_failing_piece_write_commits_nothing_and_leaves_nothing(faulty) -> None:
    url, options, plan = faulty
    manager = CheckpointManager(url, options, retry=FAST)
    inc = Incremental()
    run = Run()
    manager.save(run.state(), "a.ckpt", incremental=inc)
    run.step()
    plan.add(Fault(op="write", path="*lckpt-pack-*", exc=OSError(errno.EIO, "bad sector")))
    with pytest.raises(StorageError, match="bad sector"):
        manager.save(run.state(), "b.ckpt", incremental=inc)
    assert [m.name for m in manager.manifests()] == ["a.ckpt"]
    manager.cleanup()
    assert set(packs(manager)) == pieces.table_of(manager.read_manifest("a.ckpt")).files
    run.step()
    manager.save(run.state(), "b.ckpt", incremental=inc)  # the cache survived the failure
    check(manager.load("b.ckpt"), run.expected())


def test_a_crash_between_pieces_and_manifest_loses_nothing_and_cleanup_reclaims_the_pack(faulty) -> None:
    url, options, plan = faulty
    manager = CheckpointManager(url, options, retry=FAST)
    inc = Incremental()
    run = Run()
    manager.save(run.state(), "a.ckpt", incremental=inc)
    want = run.expected()
    run.step()
    # the manifest never lands and the save's own clean-up fails too: what a SIGKILL leaves
    plan.add(Fault(op="open_write", path="*b.ckpt.manifest.json", times=None))
    plan.add(Fault(op="rm", path="*", times=None))
    with pytest.raises(StorageError):
        manager.save(run.state(), "b.ckpt", incremental=inc)
    plan.clear()
    assert len(packs(manager)) == 2
    removed = manager.cleanup()
    assert any(pieces.is_pack(f) for f in removed)
    assert set(packs(manager)) == pieces.table_of(manager.read_manifest("a.ckpt")).files
    check(manager.load("a.ckpt"), want)


def test_damage_to_a_shared_piece_is_found_by_verify_and_refused_by_load(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    run = Run()
    manager.save(run.state(), "a.ckpt", incremental=Incremental())
    pack = next(iter(packs(manager)))
    with open(tmp_path / pack, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xfe")
    with pytest.raises(CorruptCheckpointError, match="does not match its digest"):
        manager.verify("a.ckpt")
    with pytest.raises(CorruptCheckpointError):
        manager.load("a.ckpt")
    os.remove(tmp_path / pack)
    with pytest.raises(CorruptCheckpointError, match="missing"):
        manager.verify("a.ckpt")
    with pytest.warns(CheckpointWarning, match="skipping damaged"):
        assert manager.latest() is None  # skipped with a warning, never loaded


def test_the_signature_covers_the_piece_references(tmp_path: Path) -> None:
    signer = Signer(b"k" * 32)
    manager = CheckpointManager(str(tmp_path), signer=signer)
    run = Run()
    manager.save(run.state(), "a.ckpt", incremental=Incremental())
    run.step()
    manager.save(run.state(), "b.ckpt", incremental=Incremental())
    path = tmp_path / manifest_name("b.ckpt")
    raw = json.loads(path.read_bytes())
    refs = raw["pieces"]["refs"]
    refs[0], refs[1] = refs[1], refs[0]  # swap two tensors' bytes
    path.write_text(json.dumps(raw))
    with pytest.raises(TamperedCheckpointError):
        manager.load("b.ckpt")


def test_encrypted_pieces_are_keyed_and_unreadable_without_the_key(tmp_path: Path) -> None:
    key = os.urandom(32)
    manager = CheckpointManager(str(tmp_path), encryptor=Encryptor(key))
    inc = Incremental()
    run = Run()
    manager.save(run.state(), "a.ckpt", incremental=inc)
    run.step()
    manager.save(run.state(), "b.ckpt", incremental=inc)
    check(manager.load("b.ckpt"), run.expected())
    table = pieces.table_of(manager.read_manifest("b.ckpt"))
    plain_ids = {pieces.digest(memoryview(run.frozen.numpy()).cast("B"))}
    assert not plain_ids & {r.id for r in table.refs if r}  # ids say nothing checkable about plaintext
    blob = b"".join((tmp_path / p).read_bytes() for p in packs(manager))
    assert bytes(memoryview(run.frozen.numpy()).cast("B")[:4096]) not in blob
    assert sum(packs(manager).values()) < 2 * (run.frozen.nbytes + run.ids.nbytes + run.mask.nbytes)  # shared
    with pytest.raises(KeyMissingError):
        CheckpointManager(str(tmp_path), encryptor=Encryptor(os.urandom(32))).load("b.ckpt")
    # a new key shares nothing with the old one's pieces (its ids are keyed differently)
    rotated = CheckpointManager(str(tmp_path), encryptor=Encryptor(os.urandom(32), key))
    rotated.save(run.state(), "c.ckpt", incremental=Incremental())
    assert not table.files & pieces.table_of(rotated.read_manifest("c.ckpt")).files
    check(rotated.load("b.ckpt"), run.expected())


def test_the_collector_never_runs_beside_a_live_writer_and_writers_wait_for_it(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    run = Run()
    manager.save(run.state(), "a.ckpt", incremental=Incremental())
    orphan = pieces.pack_name(layout.new_token())
    (tmp_path / orphan).write_bytes(b"x" * 10)
    token = layout.new_token()
    with layout.in_flight(token):  # another save in progress in this process
        manager.storage.write_bytes(layout.marker_name("z.ckpt", token),
                                    layout.Marker.mine("z.ckpt", token).to_json())
        assert pieces.collect(manager.storage) == []
        manager.storage.delete(layout.marker_name("z.ckpt", token))
    gc = layout.new_token()
    with layout.in_flight(gc):  # a live collector: a writer waits, then gives up
        manager.storage.write_bytes(layout.marker_name(pieces.COLLECTOR, gc),
                                    layout.Marker.mine(pieces.COLLECTOR, gc, "gc").to_json())
        with pytest.raises(StorageError, match="reclaiming"):
            pieces.wait_for_collectors(manager.storage, layout.STALE_AFTER, timeout=0.2)
        manager.storage.delete(layout.marker_name(pieces.COLLECTOR, gc))
    assert pieces.collect(manager.storage) == [orphan]


def test_files_we_did_not_write_are_never_touched(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    foreign = {"notes.~lckpt-pack-keep": b"a", ".lckpt-pack-0123456789abcdef": b"b", "x.ckpt": b"c"}
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
    run = Run()
    manager.save(run.state(), "a.ckpt", incremental=Incremental())
    manager.delete("a.ckpt")
    manager.cleanup()
    for name, data in foreign.items():
        assert (tmp_path / name).read_bytes() == data


def test_an_unparseable_manifest_stops_the_collector(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    run = Run()
    manager.save(run.state(), "a.ckpt", incremental=Incremental())
    (tmp_path / "b.ckpt").write_bytes(b"x")
    (tmp_path / manifest_name("b.ckpt")).write_bytes(b"{not json")
    os.remove(tmp_path / manifest_name("a.ckpt"))  # its packs are unreferenced now...
    assert pieces.collect(manager.storage) == []  # ...but b's manifest might reference them
    assert packs(manager)


@pytest.mark.parametrize("bad", [
    {"refs": "x"},
    {"refs": [["0" * 64, "../etc/passwd", 0, 1, "0" * 64, "cpu"]]},
    {"refs": [["0" * 64, ".~lckpt-pack-0123456789abcdef", -1, 1, "0" * 64, "cpu"]]},
    {"refs": [["zz", ".~lckpt-pack-0123456789abcdef", 0, 1, "0" * 64, "cpu"]]},
    {"refs": [["0" * 64, ".~lckpt-pack-0123456789abcdef", 0, True, "0" * 64, "cpu"]]},
    {"refs": [["0" * 64, ".~lckpt-pack-0123456789abcdef", 0, 1, "0" * 64, "cuda:0; rm"]]},
])
def test_a_malformed_piece_table_is_a_damaged_manifest(tmp_path: Path, bad: dict[str, Any]) -> None:
    manager = CheckpointManager(str(tmp_path))
    manager.save(Run().state(), "a.ckpt", incremental=Incremental())
    path = tmp_path / manifest_name("a.ckpt")
    raw = json.loads(path.read_bytes())
    raw["pieces"] = bad
    path.write_text(json.dumps(raw))
    with pytest.raises(CorruptCheckpointError, match="malformed"):
        manager.load("a.ckpt")


def test_placeholders_and_pieces_must_agree(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    manager.save(Run().state(), "a.ckpt", incremental=Incremental())
    path = tmp_path / manifest_name("a.ckpt")
    raw = json.loads(path.read_bytes())
    raw["pieces"]["refs"].pop()
    path.write_text(json.dumps(raw))
    with pytest.raises(CorruptCheckpointError, match="placeholders"):
        manager.load("a.ckpt", verify=False)


def test_bad_arguments_are_refused() -> None:
    from lightning_ckpt import CheckpointCallback

    for kwargs in ({"min_bytes": 0}, {"confirm_every": 0}, {"min_bytes": 1.5}):
        with pytest.raises(ConfigurationError):
            Incremental(**kwargs)
    with pytest.raises(ConfigurationError, match="incremental"):
        CheckpointCallback(incremental="yes")  # type: ignore[arg-type]


def test_s3_incremental_round_trip(s3_bucket_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket_url
    manager = CheckpointManager(url + "/inc", options)
    inc = Incremental()
    run = Run()
    for i in range(2):
        run.step()
        manager.save(run.state(), f"e{i}.ckpt", global_step=i, incremental=inc)
    manager.copy("e1.ckpt", "last.ckpt")
    check(manager.load("last.ckpt"), run.expected())
    manager.verify("e0.ckpt")
    manager.delete("e0.ckpt")
    check(manager.load("e1.ckpt"), run.expected())
    assert len(packs(manager)) == 2


# -- the callback under a real Trainer ------------------------------------------------------------

class FrozenBackbone:
    """TinyModel with a frozen 64x256 backbone (64 KiB: one piece) in front of its head."""

    @staticmethod
    def model() -> Any:
        import lightning.pytorch as pl  # noqa: F401
        from helpers import TinyModel
        from torch import nn

        class Model(TinyModel):
            def __init__(self) -> None:
                super().__init__()
                self.backbone = nn.Linear(4, 4096, bias=False)  # 64 KiB
                self.backbone.requires_grad_(False)
                self.proj = nn.Linear(4096, 4)  # 64 KiB, trained: a piece that changes

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(self.proj(torch.tanh(self.backbone(x))) * 0.01 + x)

        return Model


def fit_frozen(ckpt: Any, max_epochs: int, ckpt_path: str | None = None) -> Any:
    import lightning.pytorch as pl
    from helpers import data, trainer

    pl.seed_everything(0, verbose=False)
    model = FrozenBackbone.model()()
    train, val = data()
    t = trainer([ckpt], max_epochs=max_epochs)
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return t, model


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("async_save", [False, True])
def test_callback_resume_is_bit_identical_and_frozen_weights_are_written_once(tmp_path: Path, async_save: bool) -> None:
    from lightning_ckpt import CheckpointCallback, load_checkpoint

    def callback(d: Path) -> Any:
        return CheckpointCallback(dirpath=str(d), monitor="val_loss", save_top_k=-1, save_last=True,
                                  incremental=True, async_save=async_save)

    _, full = fit_frozen(callback(tmp_path / "full"), max_epochs=3)
    manager = CheckpointManager(str(tmp_path / "full"))
    names = [m.name for m in manager.manifests()]
    assert len(names) == 4 and "last.ckpt" in names
    backbone = full.backbone.weight.nbytes
    stored = sum(packs(manager).values())
    # backbone once (and once more, moved out of the first pack, which holds mostly trained tensors);
    # proj and its two Adam moments every epoch
    assert stored == backbone * (1 + 1 + 3 * 3)
    for name in names:
        manager.verify(name)
    # interrupted after epoch 1, resumed from "last" in a new trainer: bit for bit the same
    fit_frozen(callback(tmp_path / "cut"), max_epochs=1)
    _, resumed = fit_frozen(callback(tmp_path / "cut"), max_epochs=3, ckpt_path="last")
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    loaded = load_checkpoint(str(tmp_path / "cut" / "last.ckpt"))
    for key, value in resumed.state_dict().items():
        assert torch.equal(loaded["state_dict"][key], value), key
    assert "optimizer_states" in loaded and loaded["optimizer_states"][0]["state"]


WRITER = """
import sys, torch
from lightning_ckpt import CheckpointManager, Incremental, KeepLatest
directory, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
manager = CheckpointManager(directory)
inc = Incremental()
frozen = torch.arange(100_000, dtype=torch.float32)  # the same bytes in both writers: shared
head = torch.zeros(50_000)
for i in range(n):
    head += 1
    manager.save({"frozen": frozen, "head": head, "i": i}, f"{tag}-{i}.ckpt", global_step=i, owner=tag,
                 incremental=inc)
    manager.prune(KeepLatest(2), owner=tag)
"""


@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_two_processes_share_a_directory_and_lose_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag, "6"], env=env,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    manager = CheckpointManager(str(tmp_path))
    names = sorted(m.name for m in manager.manifests())
    assert names == ["a-4.ckpt", "a-5.ckpt", "b-4.ckpt", "b-5.ckpt"]
    for name in names:
        out = manager.load(name)
        assert torch.equal(out["frozen"], torch.arange(100_000, dtype=torch.float32))
        assert torch.equal(out["head"], torch.full((50_000,), float(out["i"] + 1)))
    manager.cleanup()
    referenced = set().union(*(pieces.table_of(manager.read_manifest(n)).files for n in names))
    assert set(packs(manager)) == referenced


def test_cli_and_export_see_a_complete_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_ckpt import export
    from lightning_ckpt.cli import main

    manager = CheckpointManager(str(tmp_path / "run"))
    inc = Incremental()
    run = Run()
    manager.save(run.state(), "a.ckpt", global_step=1, incremental=inc)
    run.step()
    manager.save(run.state(), "b.ckpt", global_step=2, incremental=inc)
    url = manager.url_of("b.ckpt")
    assert main(["verify", str(tmp_path / "run")]) == 0
    assert main(["inspect", url]) == 0
    assert "frozen" in capsys.readouterr().out
    assert main(["diff", manager.url_of("a.ckpt"), url]) == 0
    out = capsys.readouterr().out
    assert "state_dict: 4 same, 1 values" in out and "frozen" not in out  # compared in full: only head moved
    # a standalone .ckpt that stock torch.load reads, weights-only
    export(url, str(tmp_path / "standalone.ckpt"), format="ckpt")
    check(torch.load(tmp_path / "standalone.ckpt", weights_only=True), run.expected())
    assert main(["export", url, "--format", "ckpt", "-o", str(tmp_path / "cli.ckpt")]) == 0
    check(torch.load(tmp_path / "cli.ckpt", weights_only=True), run.expected())
    # a damaged shared piece: verify names it and fails
    pack = sorted(packs(manager))[0]
    with open(tmp_path / "run" / pack, "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01\x02")
    assert main(["verify", str(tmp_path / "run")]) != 0
    assert "digest" in capsys.readouterr().out + capsys.readouterr().err


def test_a_background_save_refuses_a_tensor_changed_behind_the_version_counter(tmp_path: Path) -> None:
    from lightning_ckpt.async_saver import AsyncSaver

    manager = CheckpointManager(str(tmp_path))
    inc = Incremental(confirm_every=1)  # every shortcut tensor is confirmed at every save
    frozen = torch.randn(256, 256)
    with AsyncSaver(manager) as saver:
        saver.save({"w": frozen}, "a.ckpt", incremental=inc).wait()
        saver.save({"w": frozen}, "b.ckpt", incremental=inc).wait()  # confirmed: same bytes, nothing written
        assert len(packs(manager)) == 1
        original = frozen.clone()
        frozen.data.add_(1)
        with pytest.warns(CheckpointWarning, match="version counter"):
            pending = saver.save({"w": frozen}, "c.ckpt", incremental=inc)
            with pytest.raises(CheckpointError, match="did not commit"):
                pending.wait()
        saver.save({"w": frozen}, "d.ckpt", incremental=inc).wait()
    assert "c.ckpt" not in {m.name for m in manager.manifests()}
    assert torch.equal(manager.load("d.ckpt")["w"], frozen)
    assert torch.equal(manager.load("b.ckpt")["w"], original)


def test_a_pack_mostly_dead_is_not_kept_alive_by_one_piece(tmp_path: Path) -> None:
    from lightning_ckpt import KeepLatest

    manager = CheckpointManager(str(tmp_path))
    inc = Incremental()
    stable = torch.randn(128, 128)  # 64 KiB, never changes
    moving = [torch.randn(256, 256) for _ in range(4)]  # 1 MiB that changes every save
    for i in range(6):
        for t in moving:
            t.add_(1)
        manager.save({"stable": stable, "moving": moving}, f"e{i}.ckpt", global_step=i, incremental=inc)
        manager.prune(KeepLatest(2))
    stored = sum(packs(manager).values())
    # two checkpoints' moving tensors, the stable one (once or twice), never the first save's whole pack
    assert stored <= 2 * 4 * moving[0].nbytes + 2 * stable.nbytes
    for name in ("e4.ckpt", "e5.ckpt"):
        assert torch.equal(manager.load(name)["stable"], stable)


def test_one_run_saving_into_two_directories_never_references_the_other_ones_pieces(tmp_path: Path) -> None:
    a, b = CheckpointManager(str(tmp_path / "a")), CheckpointManager(str(tmp_path / "b"))
    inc = Incremental()
    run = Run()
    a.save(run.state(), "x.ckpt", incremental=inc)
    b.save(run.state(), "x.ckpt", incremental=inc)  # the shortcut's pieces are in a/: b writes its own
    a.delete("x.ckpt")
    check(b.load("x.ckpt"), run.expected())
    assert packs(a) == {} and packs(b)


def test_an_old_runs_pieces_are_reused_by_content_and_never_deleted_while_referenced(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    run = Run()
    manager.save(run.state(), "old.ckpt", owner="old-run", incremental=Incremental())
    before = dict(packs(manager))
    job = Incremental().prepare(run.state())  # a new process: no shortcut, content hashes find the pieces
    manager.save(job.state, "new.ckpt", owner="new-run", incremental=job)
    assert job.written == 0 and packs(manager) == before
    manager.prune(__import__("lightning_ckpt").KeepLatest(1), owner="old-run")  # keeps its newest: nothing goes
    manager.delete("old.ckpt")
    check(manager.load("new.ckpt"), run.expected())


def test_cleanup_of_a_directory_not_yet_created_writes_nothing(tmp_path: Path) -> None:
    # found by the kill campaign: the collector wrote its marker into a directory that did not exist
    register()
    manager = CheckpointManager(f"faulty://{tmp_path}/absent", {"target_protocol": "file"})
    assert manager.cleanup() == []
    assert not (tmp_path / "absent").exists()


def test_a_crashed_collector_on_another_host_holds_writers_back_for_minutes_not_hours(tmp_path: Path) -> None:
    import time as _time

    manager = CheckpointManager(str(tmp_path))
    token = layout.new_token()
    marker = layout.Marker(pieces.COLLECTOR, token, "gc", host="0badc0de", pid=1, started=_time.time() - 60)
    manager.storage.write_bytes(layout.marker_name(pieces.COLLECTOR, token), marker.to_json())
    with pytest.raises(StorageError, match="reclaiming"):
        pieces.wait_for_collectors(manager.storage, layout.STALE_AFTER, timeout=0.1)  # a minute old: live
    old = layout.Marker(pieces.COLLECTOR, token, "gc", host="0badc0de", pid=1,
                        started=_time.time() - pieces.COLLECTOR_STALE - 1)
    manager.storage.write_bytes(layout.marker_name(pieces.COLLECTOR, token), old.to_json())
    pieces.wait_for_collectors(manager.storage, layout.STALE_AFTER, timeout=0.1)  # ten minutes: abandoned
    manager.save(Run().state(), "a.ckpt", incremental=Incremental())
