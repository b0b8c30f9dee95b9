"""Sharded checkpoints in one process, over every backend: commit, listing, verification, retention.

``torch.distributed.checkpoint`` runs without a process group here (one rank), which exercises
everything but the collectives -- those are covered by 2-process runs in test_distributed.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from backends import backend  # noqa: F401

from lightning_ckpt import (
    CheckpointManager,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    KeepLatest,
    UncommittedCheckpointError,
)
from lightning_ckpt.errors import ShardedCheckpointError
from lightning_ckpt.integrity import SHARDED_FORMAT_VERSION, manifest_name
from lightning_ckpt.layout import Marker, release
from lightning_ckpt.manager import PENDING_SUFFIX
from lightning_ckpt.security import Encryptor
from lightning_ckpt.sharded import META_FILE, ShardedCheckpointer, consolidate

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def tensors(v: float) -> dict:
    return {
        "state_dict": {"layer.weight": torch.full((8, 4), v), "layer.bias": torch.arange(8.0) + v},
        "optimizer_0": {"state": {"layer.weight": {"step": torch.tensor(3.0), "exp_avg": torch.full((8, 4), -v)}},
                        "param_groups": [{"lr": 0.01, "params": ["layer.weight"]}]},
    }


def save(mgr: CheckpointManager, name: str, step: int, loss: float = 1.0) -> object:
    return ShardedCheckpointer(mgr).save(tensors(step), {"epoch": 0, "global_step": step, "loops": {"x": 1}}, name,
                                         epoch=0, global_step=step, metrics={"val_loss": loss}, monitor="val_loss",
                                         owner="me")


def test_a_sharded_save_commits_every_file_with_one_manifest(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    result = save(mgr, "s.ckpt", 4)
    manifest = result.manifest
    files = {f.name: f.size for f in mgr.storage.child("s.ckpt").list()}
    assert set(manifest.files) == set(files) and {".metadata", META_FILE} <= set(files)
    assert any(name.endswith(".distcp") for name in files)
    assert all(manifest.files[n]["size"] == size for n, size in files.items())
    assert manifest.sharded and manifest.size == sum(files.values())
    assert manifest.format_version == SHARDED_FORMAT_VERSION
    assert result.url == mgr.url_of("s.ckpt")
    assert [m.name for m in mgr.manifests()] == ["s.ckpt"]
    assert mgr.verify("s.ckpt").global_step == 4
    assert not mgr.storage.exists("s.ckpt" + PENDING_SUFFIX)


def test_consolidate_returns_every_tensor_whole(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "s.ckpt", 4)
    full = consolidate(mgr, "s.ckpt")
    expected = tensors(4)
    assert torch.equal(full["state_dict"]["layer.weight"], expected["state_dict"]["layer.weight"])
    assert torch.equal(full["state_dict"]["layer.bias"], expected["state_dict"]["layer.bias"])
    exp_avg = full["optimizer_states"][0]["state"]["layer.weight"]["exp_avg"]
    assert torch.equal(exp_avg, expected["optimizer_0"]["state"]["layer.weight"]["exp_avg"])
    assert full["loops"] == {"x": 1} and full["global_step"] == 4


def test_retention_copies_and_deletes_whole_directories(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    for step in (1, 2, 3):
        save(mgr, f"s{step}.ckpt", step)
    mgr.copy("s3.ckpt", "last.ckpt", owner="me/last")
    assert mgr.verify("last.ckpt").sharded
    deleted = mgr.prune(KeepLatest(1), owner="me")
    assert sorted(deleted) == ["s1.ckpt", "s2.ckpt"]
    assert sorted(mgr.storage.dirs()) == ["last.ckpt", "s3.ckpt"]
    assert sorted(f.name for f in mgr.storage.list()) == [manifest_name("last.ckpt"), manifest_name("s3.ckpt")]


def test_a_damaged_or_missing_shard_is_named(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "old.ckpt", 1)
    manifest = save(mgr, "new.ckpt", 2).manifest
    shard = next(n for n in manifest.files if n.endswith(".distcp"))
    directory = mgr.storage.child("new.ckpt")
    data = bytearray(directory.read_bytes(shard))
    data[len(data) // 2] ^= 0xFF
    directory.write_bytes(shard, bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"new\.ckpt/__0_0\.distcp does not match the sha256"):
        mgr.verify("new.ckpt")
    with pytest.warns(CheckpointWarning, match="skipping damaged"):
        assert mgr.latest().name == "old.ckpt"
    directory.delete(shard)
    with pytest.raises(CorruptCheckpointError, match="is missing"):
        mgr.verify("new.ckpt")


def test_an_interrupted_sharded_save_is_invisible_and_cleaned_up(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "good.ckpt", 1)
    # a crash after the shards were written, before the manifest: the marker proves they are ours
    directory = mgr.begin_directory("torn.ckpt")
    directory.write_bytes("__0_0.distcp", b"half")
    assert [m.name for m in mgr.manifests()] == ["good.ckpt"]
    assert mgr.cleanup() == []  # its writer (this process) is still saving: never touched
    marker = Marker.parse("torn.ckpt" + PENDING_SUFFIX, mgr.storage.read_bytes("torn.ckpt" + PENDING_SUFFIX))
    release(marker.token)  # ... until the writer dies
    removed = mgr.cleanup()
    assert "torn.ckpt/" in removed and "torn.ckpt" + PENDING_SUFFIX in removed
    assert mgr.storage.dirs() == ["good.ckpt"]
    assert mgr.verify("good.ckpt").global_step == 1


def test_a_failed_sharded_save_leaves_nothing_and_keeps_older_ones(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url, options)
    save(mgr, "good.ckpt", 1)
    with pytest.raises((AttributeError, TypeError)):  # meta.pt cannot be pickled: the save fails after the shards
        ShardedCheckpointer(mgr).save(tensors(2), {"bad": lambda: None}, "bad.ckpt", global_step=2)
    assert [m.name for m in mgr.manifests()] == ["good.ckpt"]
    assert mgr.storage.dirs() == ["good.ckpt"]
    assert sorted(f.name for f in mgr.storage.list()) == [manifest_name("good.ckpt")]


def test_loading_a_sharded_checkpoint_as_one_file_says_what_to_do(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    save(mgr, "s.ckpt", 1)
    with pytest.raises(ShardedCheckpointError, match="consolidate"):
        mgr.load("s.ckpt")


def test_replacing_a_sharded_checkpoint_leaves_no_stale_shard(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    save(mgr, "last.ckpt", 1)
    mgr.storage.child("last.ckpt").write_bytes("__9_0.distcp", b"stale")  # not in any manifest
    save(mgr, "last.ckpt", 2)
    assert "__9_0.distcp" not in {f.name for f in mgr.storage.child("last.ckpt").list()}
    assert mgr.verify("last.ckpt").global_step == 2


def test_encrypted_sharded_checkpoints_are_refused_up_front(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path), encryptor=Encryptor(b"k" * 32))
    with pytest.raises(ConfigurationError, match="encrypting sharded"):
        ShardedCheckpointer(mgr)


# -- the command line on sharded checkpoints ------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from lightning_ckpt.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_lists_verifies_inspects_diffs_prunes_and_exports_sharded_checkpoints(tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    mgr = CheckpointManager(str(tmp_path / "run"))
    save(mgr, "a.ckpt", 1, loss=0.9)
    save(mgr, "b.ckpt", 2, loss=0.5)
    code, out, _ = cli(capsys, "ls", mgr.url, "--json")
    assert code == 0 and [c["name"] for c in json.loads(out)] == ["a.ckpt", "b.ckpt"]
    code, out, _ = cli(capsys, "verify", mgr.url)
    assert code == 0 and "2 ok, 0 bad" in out
    code, out, _ = cli(capsys, "inspect", mgr.url_of("b.ckpt"))
    assert code == 0 and "sharded" in out and "layer.weight" in out
    code, out, _ = cli(capsys, "diff", mgr.url_of("a.ckpt"), mgr.url_of("b.ckpt"))
    assert code == 0 and "layer.weight" in out
    target = tmp_path / "model.safetensors"
    code, _, _ = cli(capsys, "export", mgr.url_of("b.ckpt"), "--format", "safetensors", "--output", str(target))
    assert code == 0
    weights = load_file(str(target))
    assert torch.equal(weights["layer.weight"], tensors(2)["state_dict"]["layer.weight"])
    code, _, _ = cli(capsys, "prune", mgr.url, "--keep-last", "1")
    assert code == 0 and [m.name for m in mgr.manifests()] == ["b.ckpt"]
    assert mgr.storage.dirs() == ["b.ckpt"]


def test_cli_verify_names_the_damaged_shard(tmp_path, capsys) -> None:
    mgr = CheckpointManager(str(tmp_path / "run"))
    save(mgr, "a.ckpt", 1)
    shard = tmp_path / "run" / "a.ckpt" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, _ = cli(capsys, "verify", mgr.url)
    assert code == 1 and "a.ckpt/__0_0.distcp does not match the sha256" in out


# -- loading into a model (one process; the 2-process runs load sharded models) ---------------------


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save_model(mgr: CheckpointManager, name: str, model, optimizer) -> None:  # noqa: ANN001
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors = {"state_dict": model.state_dict(), "optimizer_0": get_optimizer_state_dict(model, optimizer)}
    ShardedCheckpointer(mgr).save(tensors, {"global_step": 7}, name, global_step=7)


def test_load_fills_the_model_and_optimizer_and_returns_the_rest(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    saved_model, saved_opt = model_and_optimizer(0)
    save_model(mgr, "s.ckpt", saved_model, saved_opt)
    model, optimizer = model_and_optimizer(1)
    manifest, extras = ShardedCheckpointer(mgr).load("s.ckpt", model, [optimizer])
    assert manifest is not None and extras == {"global_step": 7}
    for a, b in zip(model.state_dict().values(), saved_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_opt.state_dict()["state"][0]["exp_avg"])


def test_a_sharded_directory_lightning_wrote_itself_loads_unverified_with_a_warning(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    saved_model, saved_opt = model_and_optimizer(0)
    save_model(mgr, "plain.ckpt", saved_model, saved_opt)
    mgr.storage.delete(manifest_name("plain.ckpt"))  # what Lightning's ModelParallelStrategy leaves
    model, optimizer = model_and_optimizer(1)
    with pytest.warns(CheckpointWarning, match="no lightning-ckpt manifest"):
        manifest, _ = ShardedCheckpointer(mgr).load("plain.ckpt", model, [optimizer])
    assert manifest is None
    assert torch.equal(model[0].weight, saved_model[0].weight)
    # but an interrupted save of ours is never taken for one
    mgr.storage.write_bytes("plain.ckpt" + PENDING_SUFFIX, b"{}")
    with pytest.raises(UncommittedCheckpointError, match="never committed"):
        ShardedCheckpointer(mgr).load("plain.ckpt", model, [optimizer])


def test_a_background_save_leaves_no_thread_behind_once_waited_for(tmp_path) -> None:
    """A daemon thread still alive at interpreter exit is stopped inside torch's C++ code and the
    process aborts (exit 134, "terminate called without an active exception"): once a background
    save was waited for, none of its threads may remain (issue 15)."""
    import threading

    mgr = CheckpointManager(str(tmp_path))
    for step in (1, 2, 3):
        pending = ShardedCheckpointer(mgr).save_async(tensors(step), {"epoch": 0}, f"s{step}.ckpt", global_step=step)
        assert pending.wait().manifest.global_step == step
        assert pending._thread is not None and not pending._thread.is_alive()
    left = [t.name for t in threading.enumerate() if t.name.startswith(("lightning-ckpt", "AsyncCheckpointExecutor"))]
    assert left == []
