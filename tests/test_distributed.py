"""Two processes over gloo on CPU, launched as users launch them: DDP and FSDP2 (ModelParallelStrategy).

Each run is ``python tests/dist_run.py CONFIG`` in a fresh process group; every rank reports what
it believes (best, last, top-k, failures) and a hash of the full model + optimizer state. The
checks: exactly one checkpoint set, every rank agrees, bit-identical resume (each rank's random
streams included), sharded checkpoints committed once over every shard, resume at another world
size, damage and failures handled on every rank without a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_ckpt import CheckpointManager
from lightning_ckpt.integrity import manifest_name
from lightning_ckpt.sharded import consolidate

pytestmark = [
    pytest.mark.slow,  # every test starts 2-process runs (10-40 s each on 2 cores)
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "dist_run.py"
TOPK = {"monitor": "val_loss", "save_top_k": 2, "save_last": True, "every_n_train_steps": 4}


def run(tmp: Path, tag: str, timeout: float = 240, **config: Any) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """One multi-process run; returns the process and every rank's report that was written."""
    config = {"devices": 2, "max_steps": 16, **config, "out": str(tmp / tag)}
    path = tmp / f"{tag}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, str(RUN), str(path)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=tmp, check=False)
    reports = []
    for rank in range(config["devices"]):
        report = tmp / f"{tag}.rank{rank}.json"
        if report.exists():
            reports.append(json.loads(report.read_text()))
    return proc, reports


def ok(proc: subprocess.CompletedProcess, reports: list[dict], devices: int = 2) -> list[dict]:
    # exit 0, nothing else: a rank aborting in the interpreter's teardown after a run that did
    # everything right (exit 134, "terminate called without an active exception") is a failure a
    # scheduler sees (issue 15); the background sharded save's thread is joined before the end
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(reports) == devices, proc.stderr[-4000:]
    for report in reports:
        assert "error" not in report, report["error"]
    return reports


def agree(reports: list[dict], *keys: str) -> None:
    """Every rank reports the same value for each key."""
    for key in keys:
        assert len({json.dumps(r[key]) for r in reports}) == 1, (key, [r[key] for r in reports])


def digest_of(full: dict) -> str:
    """The report's state hash of a consolidated checkpoint (same keys as dist_run.full_state)."""
    sys.path.insert(0, str(REPO / "tests"))
    from dist_run import digest

    state = {f"model.{k}": v for k, v in full["state_dict"].items()}
    for name, values in full["optimizer_states"][0]["state"].items():
        for key, value in values.items():
            state[f"optim.{name}.{key}"] = torch.as_tensor(value)
    return digest(state)


def committed(dirpath: Path) -> list[str]:
    return sorted(m.name for m in CheckpointManager(str(dirpath)).manifests())


# -- DDP ---------------------------------------------------------------------------------------


def test_ddp_writes_one_checkpoint_set_and_every_rank_agrees(tmp_path: Path) -> None:
    reports = ok(*run(tmp_path, "a", strategy="ddp", dirpath=str(tmp_path / "ck"), callback=TOPK))
    agree(reports, "best_model_path", "best_model_score", "best_k_models", "last_model_path", "state_sha")
    names = committed(tmp_path / "ck")
    assert len(names) == 3 and "last.ckpt" in names  # top 2 and last, whatever the losses were
    mgr = CheckpointManager(str(tmp_path / "ck"))
    for name in names:
        mgr.verify(name)
    expected = {n for name in names for n in (name, manifest_name(name))}
    assert {p.name for p in (tmp_path / "ck").iterdir()} == expected  # nothing else: no rank wrote its own
    assert sorted(reports[0]["best_k_models"]) == sorted(mgr.url_of(n) for n in names if n != "last.ckpt")


def test_ddp_resume_is_bit_exact_on_every_rank_also_after_async_saves(tmp_path: Path) -> None:
    # each rank draws its own dropout masks (seeded by rank): resuming must restore every rank's streams
    common = {"strategy": "ddp", "rank_seed": True}
    every4 = {"save_top_k": -1, "every_n_train_steps": 4}
    full = ok(*run(tmp_path, "full", dirpath=str(tmp_path / "full"), callback=every4, **common))
    ok(*run(tmp_path, "part", max_steps=10, dirpath=str(tmp_path / "ck"), callback={**every4, "async_save": True},
            **common))
    resumed = ok(*run(tmp_path, "res", ckpt_path="last", dirpath=str(tmp_path / "ck"), callback=every4, **common))
    assert resumed[0]["resumed_from"].endswith("epoch=0-step=8.ckpt")
    assert [r["state_sha"] for r in resumed] == [r["state_sha"] for r in full]


def test_ddp_incremental_saves_are_written_by_rank_0_and_resume_bit_exact(tmp_path: Path) -> None:
    from lightning_ckpt import pieces

    # width 2048: the first layer's weight (64 KiB) and its Adam moments are pieces
    common = {"strategy": "ddp", "rank_seed": True, "width": 2048}
    every4 = {"save_top_k": -1, "every_n_train_steps": 4, "incremental": True}
    full = ok(*run(tmp_path, "full", dirpath=str(tmp_path / "full"), callback=every4, **common))
    ok(*run(tmp_path, "part", max_steps=10, dirpath=str(tmp_path / "ck"), callback={**every4, "async_save": True},
            **common))
    resumed = ok(*run(tmp_path, "res", ckpt_path="last", dirpath=str(tmp_path / "ck"), callback=every4, **common))
    assert resumed[0]["resumed_from"].endswith("epoch=0-step=8.ckpt")
    assert [r["state_sha"] for r in resumed] == [r["state_sha"] for r in full]
    mgr = CheckpointManager(str(tmp_path / "ck"))
    assert all(mgr.verify(n).pieces for n in committed(tmp_path / "ck"))
    assert any(pieces.is_pack(p.name) for p in (tmp_path / "ck").iterdir())


def test_ddp_a_failed_periodic_save_warns_on_every_rank_and_training_goes_on(tmp_path: Path) -> None:
    fault = {"op": "close", "path": "*epoch=0-step=8.ckpt"}
    (tmp_path / "ck").mkdir()  # faulty:// over the local disk behaves like an object store: no mkdir
    reports = ok(*run(tmp_path, "a", strategy="ddp", dirpath=f"faulty://{tmp_path}/ck", faults=[fault],
                      callback={"save_top_k": -1, "every_n_train_steps": 4}))
    assert [r["failed_saves"] for r in reports] == [1, 1]
    assert [r["global_step"] for r in reports] == [16, 16]
    assert committed(tmp_path / "ck") == ["epoch=0-step=4.ckpt", "epoch=1-step=12.ckpt", "epoch=1-step=16.ckpt"]
    assert not any(".pending" in p.name or "step=8" in p.name for p in (tmp_path / "ck").iterdir())


def test_ddp_a_failed_final_save_fails_the_run_without_hanging(tmp_path: Path) -> None:
    fault = {"op": "close", "path": "*epoch=1-step=16.ckpt"}
    (tmp_path / "ck").mkdir()
    proc, reports = run(tmp_path, "a", strategy="ddp", dirpath=f"faulty://{tmp_path}/ck", faults=[fault],
                        callback={"save_top_k": -1, "every_n_train_steps": 4})
    assert reports, proc.stderr[-3000:]
    # rank 0 raises the storage's error; every other rank learns it and raises too, naming it
    reason = "could not finish writing faulty://"
    assert reports[0]["error"].startswith("StorageError") and reason in reports[0]["error"], reports
    for report in reports[1:]:
        assert "failed on rank 0 (StorageError" in report["error"] and reason in report["error"], reports
    assert committed(tmp_path / "ck") == ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt", "epoch=1-step=12.ckpt"]


def test_ddp_a_rank_that_dies_ends_the_run_and_the_last_checkpoint_resumes(tmp_path: Path) -> None:
    proc, reports = run(tmp_path, "a", strategy="ddp", dirpath=str(tmp_path / "ck"), fail_rank=1, fail_step=6,
                        callback={"save_top_k": -1, "every_n_train_steps": 4})
    assert proc.returncode != 0 or any("error" in r for r in reports)
    assert committed(tmp_path / "ck") == ["epoch=0-step=4.ckpt"]
    CheckpointManager(str(tmp_path / "ck")).verify("epoch=0-step=4.ckpt")
    resumed = ok(*run(tmp_path, "b", strategy="ddp", dirpath=str(tmp_path / "ck"), ckpt_path="last", max_steps=8,
                      callback={"save_top_k": -1, "every_n_train_steps": 4}))
    assert [r["global_step"] for r in resumed] == [8, 8]
    assert resumed[0]["resumed_from"].endswith("epoch=0-step=4.ckpt")


def test_ddp_a_monitor_the_ranks_disagree_on_fails_on_every_rank_instead_of_hanging(tmp_path: Path) -> None:
    # val_loss logged without sync_dist=True (a common mistake): each rank sees its own half of the
    # validation data, so each would rank the checkpoints differently -- this used to hang
    proc, reports = run(tmp_path, "a", timeout=150, strategy="ddp", sync_dist=False,
                        dirpath=str(tmp_path / "ck"), callback=TOPK)
    assert reports and reports[0]["rank"] == 0, proc.stderr[-3000:]  # the others may be killed first
    for report in reports:
        error = report["error"]
        assert error.startswith("RanksDisagreeError") and "'val_loss'" in error and "sync_dist=True" in error, error
        assert "rank 0: " in error and "rank 1: " in error, error
    assert committed(tmp_path / "ck") == []  # nothing was ranked by one rank's share of the data


NO_SHOW = """
import sys, time
from datetime import timedelta
from types import SimpleNamespace
import torch.distributed as dist
from lightning_ckpt import CheckpointCallback, RanksDisagreeError
from lightning_ckpt import distributed

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
cb = CheckpointCallback(dirpath="memory://no-show", monitor="val_loss")
cb.decision_timeout = timedelta(seconds=2)
cb._decision_group = (dist.group.WORLD, distributed.decision_group(cb.decision_timeout))
trainer = SimpleNamespace(current_epoch=0, global_step=4, global_rank=rank, callback_metrics={"val_loss": 1.0})
if rank == 1:  # never comes to the decision
    time.sleep(20)
    sys.exit(0)
try:
    cb._candidates(trainer)
except RanksDisagreeError as exc:
    print("RAISED", exc)
    sys.stdout.flush()
    import os
    os._exit(0)
print("NO ERROR")
"""


def test_a_rank_that_never_comes_to_a_save_decision_fails_it_within_the_timeout(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "no_show.py"
    script.write_text(NO_SHOW)
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for rank in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=120)  # the decision gives up after 2 s; rank 1 sleeps 20 s
        assert procs[1].poll() is None, "rank 0 should have given up while rank 1 still stayed away"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert "RAISED" in out and "waited 0:00:02" in out and "monitor='val_loss'" in out, out[-3000:]


def test_ddp_resumes_a_mid_epoch_checkpoint_at_another_world_size_both_ways(tmp_path: Path) -> None:
    # 64 samples in batches of 4: 16 batches an epoch on one process, 8 on each of two
    every6 = {"save_top_k": -1, "every_n_train_steps": 6}
    ok(*run(tmp_path, "one", devices=1, strategy="auto", max_steps=6, dirpath=str(tmp_path / "ck"),
            callback=every6), devices=1)
    proc, reports = run(tmp_path, "two", max_steps=12, ckpt_path="last", dirpath=str(tmp_path / "ck"), callback=every6)
    two = ok(proc, reports)
    assert [r["resumed_from"].rsplit("/", 1)[1] for r in two] == ["epoch=0-step=6.ckpt"] * 2
    assert [r["global_step"] for r in two] == [12, 12]
    assert "written by 1 process(es), resumed on 2" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    agree(two, "state_sha")
    # and back: the 2-process checkpoint at step 12 (mid-epoch there too) on one process
    proc, reports = run(tmp_path, "back", devices=1, strategy="auto", max_steps=16, ckpt_path="last",
                        dirpath=str(tmp_path / "ck"), callback=every6)
    back = ok(proc, reports, devices=1)
    assert back[0]["resumed_from"].endswith("step=12.ckpt") and back[0]["global_step"] == 16
    assert "written by 2 process(es), resumed on 1" in proc.stderr + proc.stdout, proc.stderr[-3000:]


# -- FSDP2 (ModelParallelStrategy): sharded checkpoints ---------------------------------------


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted 16-step run, and a 10-step run (saving in the background) to resume from."""
    tmp = tmp_path_factory.mktemp("fsdp")
    common = {"strategy": "fsdp2", "rank_seed": True, "callback": TOPK}
    full = ok(*run(tmp, "full", dirpath=str(tmp / "full"), **common))
    part = ok(*run(tmp, "part", max_steps=10, dirpath=str(tmp / "ck"), strategy="fsdp2", rank_seed=True,
                   callback={**TOPK, "async_save": True}))
    return {"tmp": tmp, "full": full, "part": part, "dirpath": tmp / "ck", "common": common}


def test_fsdp2_every_rank_writes_its_shards_and_one_manifest_commits_them(fsdp_runs: dict[str, Any]) -> None:
    dirpath, part = fsdp_runs["dirpath"], fsdp_runs["part"]
    agree(part, "best_model_path", "best_model_score", "best_k_models", "last_model_path", "state_sha")
    mgr = CheckpointManager(str(dirpath))
    names = committed(dirpath)
    assert names == ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"]
    for name in names:
        manifest = mgr.verify(name)
        on_disk = {p.name for p in (dirpath / name).iterdir()}
        assert manifest.sharded and set(manifest.files) == on_disk
        assert {".metadata", "meta.pt"} <= on_disk
        assert {n.split("_")[2] for n in on_disk if n.endswith(".distcp")} == {"0", "1"}  # both ranks wrote


def test_fsdp2_resume_from_last_of_async_saves_is_bit_exact(fsdp_runs: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    dirpath = tmp_path / "ck"
    shutil.copytree(fsdp_runs["dirpath"], dirpath)
    resumed = ok(*run(tmp_path, "res", ckpt_path="last", dirpath=str(dirpath), **fsdp_runs["common"]))
    assert resumed[0]["resumed_from"] == str(dirpath / "last.ckpt")
    assert [r["state_sha"] for r in resumed] == [r["state_sha"] for r in fsdp_runs["full"]]
    # retention removed whole directories: the top 2 and last remain
    assert len(committed(dirpath)) == 3 and len([p for p in dirpath.iterdir() if p.is_dir()]) == 3


def test_fsdp2_resume_on_one_process_reshards_exactly_what_was_saved(fsdp_runs: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    dirpath = tmp_path / "ck"
    shutil.copytree(fsdp_runs["dirpath"], dirpath)
    expected = digest_of(consolidate(CheckpointManager(str(dirpath)), "epoch=0-step=8.ckpt"))
    reports = ok(*run(tmp_path, "one", devices=1, max_steps=12, ckpt_path=str(dirpath / "epoch=0-step=8.ckpt"),
                      dirpath=str(dirpath), **fsdp_runs["common"]), devices=1)
    assert reports[0]["loaded_sha"] == expected
    assert reports[0]["global_step"] == 12


def test_fsdp2_a_damaged_shard_is_skipped_by_last_and_refused_by_name(fsdp_runs: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    dirpath = tmp_path / "ck"
    shutil.copytree(fsdp_runs["dirpath"], dirpath)
    for name in ("last.ckpt", "epoch=0-step=8.ckpt"):
        shard = dirpath / name / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    damaged = tmp_path / "damaged"  # the resumed run below saves a fresh last.ckpt into dirpath
    shutil.copytree(dirpath, damaged)
    resumed = ok(*run(tmp_path, "res", ckpt_path="last", max_steps=6, dirpath=str(dirpath), **fsdp_runs["common"]))
    assert [r["resumed_from"] for r in resumed] == [str(dirpath / "epoch=0-step=4.ckpt")] * 2
    _, reports = run(tmp_path, "named", ckpt_path=str(damaged / "last.ckpt"), max_steps=12, dirpath=str(damaged),
                        **fsdp_runs["common"])
    # every rank refuses it (rank 0 then ends the run: Lightning kills the other ranks, which may
    # not have written their report by then)
    assert reports and reports[0]["rank"] == 0, reports
    assert all(r.get("error", "").startswith("CorruptCheckpointError") for r in reports), reports


def test_fsdp2_gathering_a_full_state_dict_writes_one_file_and_resumes_exactly(
    fsdp_runs: dict[str, Any], tmp_path: Path
) -> None:
    # ModelParallelStrategy(save_distributed_checkpoint=False) refuses storage options and reads
    # local paths only: the callback writes the gathered state through its own IO and loads it back
    common = {**fsdp_runs["common"], "full_state_dict": True, "dirpath": str(tmp_path / "ck")}
    ok(*run(tmp_path, "part", max_steps=10, **common))
    assert all((tmp_path / "ck" / name).is_file() for name in committed(tmp_path / "ck"))
    resumed = ok(*run(tmp_path, "res", ckpt_path="last", **common))
    assert resumed[0]["resumed_from"] == str(tmp_path / "ck" / "last.ckpt")
    assert [r["state_sha"] for r in resumed] == [r["state_sha"] for r in fsdp_runs["full"]]


def test_fsdp2_a_checkpoint_of_another_model_is_refused_on_every_rank(fsdp_runs: dict[str, Any], tmp_path: Path) -> None:
    proc, reports = run(tmp_path, "other", width=16, ckpt_path=str(fsdp_runs["dirpath"] / "last.ckpt"),
                        dirpath=str(tmp_path / "ck"), strategy="fsdp2")
    assert reports and reports[0]["rank"] == 0, proc.stderr[-3000:]  # the others may be killed first
    for report in reports:
        assert report["error"].startswith("IncompatibleCheckpointError: the sharded checkpoint"), report
        assert "Size mismatch" in report["error"] and "state_dict.net.0.weight" in report["error"], report


def test_fsdp2_preemption_commits_a_sharded_checkpoint_and_the_rerun_continues_exactly(
    fsdp_runs: dict[str, Any], tmp_path: Path
) -> None:
    common = {**fsdp_runs["common"], "dirpath": str(tmp_path / "ck"),
              "callback": {**TOPK, "preemption": True}}
    proc, reports = run(tmp_path, "pre", signal_at_step=6, **common)  # SIGTERM on every rank at step 6
    assert proc.returncode == 75 and not reports, proc.stderr[-3000:]
    assert "preemption checkpoint committed" in proc.stderr + proc.stdout
    mgr = CheckpointManager(str(tmp_path / "ck"))
    preempted = mgr.verify("preempted.ckpt")
    assert preempted.sharded and preempted.global_step == 6 and preempted.extra["plan"] == "full"
    resumed = ok(*run(tmp_path, "res", ckpt_path="last", **common))
    assert resumed[0]["resumed_from"] == str(tmp_path / "ck" / "preempted.ckpt")
    assert [r["state_sha"] for r in resumed] == [r["state_sha"] for r in fsdp_runs["full"]]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_fsdp2_a_shard_that_fails_on_one_rank_fails_the_save_on_every_rank(tmp_path: Path, async_save: bool) -> None:
    (tmp_path / "ck").mkdir()
    fault = {"op": "open_write", "path": "*epoch=0-step=8.ckpt/__1_*"}  # only rank 1 writes these
    reports = ok(*run(tmp_path, "a", strategy="fsdp2", dirpath=f"faulty://{tmp_path}/ck", faults=[fault],
                      callback={"save_top_k": -1, "every_n_train_steps": 4, "async_save": async_save}))
    assert [r["failed_saves"] for r in reports] == [1, 1]
    assert [r["global_step"] for r in reports] == [16, 16]
    assert committed(tmp_path / "ck") == ["epoch=0-step=4.ckpt", "epoch=1-step=12.ckpt", "epoch=1-step=16.ckpt"]
    assert not (tmp_path / "ck" / "epoch=0-step=8.ckpt").exists()  # rank 0 removed the other shards


def test_fsdp2_on_s3_saves_prunes_and_resumes(s3_bucket_url: tuple[str, dict], tmp_path: Path) -> None:
    url, options = s3_bucket_url
    dirpath = f"{url}/run"
    common = {"strategy": "fsdp2", "dirpath": dirpath, "storage_options": options,
              "callback": {"monitor": "val_loss", "save_top_k": 1, "every_n_train_steps": 4}}
    ok(*run(tmp_path, "a", max_steps=8, **common))
    resumed = ok(*run(tmp_path, "b", max_steps=12, ckpt_path="last", **common))
    assert resumed[0]["resumed_from"] == f"{dirpath}/epoch=0-step=8.ckpt"
    agree(resumed, "best_model_path", "state_sha")
    mgr = CheckpointManager(dirpath, options)
    names = [m.name for m in mgr.manifests()]
    best = resumed[0]["best_model_path"].rsplit("/", 1)[1]
    # top-1, the newest and the one resumed from (both never pruned); each a directory of 4 files
    # and a manifest: count the objects
    assert sorted(names) == sorted({best, "epoch=1-step=12.ckpt", "epoch=0-step=8.ckpt"})
    objects = mgr.storage.fs.find(mgr.storage.root)
    assert len(objects) == 5 * len(names), objects
    for name in names:
        mgr.verify(name)
