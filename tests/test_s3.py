"""S3 scenarios against a real server (SeaweedFS): retention on a bucket, resuming in a fresh
process with credentials only in ``storage_options``, refused credentials, a server that dies
during an upload, and a damaged object.

Objects are counted and inspected with a separate s3fs client, never through the code under test.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import fit
from s3_server import SeaweedS3

from lightning_ckpt import (
    CheckpointCallback,
    CheckpointError,
    CheckpointManager,
    CorruptCheckpointError,
    RetryPolicy,
    StorageError,
    StoragePermissionError,
)
from lightning_ckpt.integrity import MANIFEST_SUFFIX
from lightning_ckpt.manager import PENDING_SUFFIX

pytestmark = [pytest.mark.s3, pytest.mark.filterwarnings("ignore::UserWarning:lightning")]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
STEPS_PER_EPOCH = 8  # helpers.fit: 64 samples, batches of 8


def objects(server: SeaweedS3, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (``s3://bucket/run``) by name, read with a separate client."""
    fs = server.filesystem()
    root = prefix.removeprefix("s3://")
    try:
        found = fs.find(root, detail=True)
        # SeaweedFS may keep an emptied prefix as a directory entry: only objects count
        names = [p.rsplit("/", 1)[-1] for p, info in found.items() if info.get("type") != "directory"]
    except FileNotFoundError:
        return {}
    return {name: fs.cat_file(f"{root}/{name}") for name in names}


def ckpt_name(epoch: int) -> str:
    return f"epoch={epoch}-step={(epoch + 1) * STEPS_PER_EPOCH}.ckpt"


class ValLosses(pl.Callback):
    """Records ``{epoch: val_loss}`` at every validation end."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.losses[trainer.current_epoch] = float(trainer.callback_metrics["val_loss"])


# -- a run, then a resume in a fresh process ------------------------------------------------------

_RESUME_SCRIPT = r'''
import json, os, sys
import lightning.pytorch as pl
from helpers import fit
from lightning_ckpt import CheckpointCallback

config = json.load(open(sys.argv[1]))
assert not [k for k in os.environ if k.startswith("AWS_")], "the test must not pass AWS_* variables"
seen, losses = {}, {}

class Probe(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        seen["start_step"], seen["start_epoch"] = trainer.global_step, trainer.current_epoch
    def on_validation_end(self, trainer, pl_module):
        losses[trainer.current_epoch] = float(trainer.callback_metrics["val_loss"])

cb = CheckpointCallback(**config["callback"])
trainer, _ = fit(cb, max_epochs=config["max_epochs"], ckpt_path="last", extra_callbacks=[Probe()])
json.dump({**seen, "losses": losses, "resumed_from": cb.resumed_from, "global_step": trainer.global_step,
           "best_model_path": cb.best_model_path, "last_model_path": cb.last_model_path},
          open(config["out"], "w"))
'''


@pytest.fixture(scope="module")
def resumed_run(s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """4 epochs here, then ``ckpt_path="last"`` to 6 epochs in a fresh process (no AWS_* env)."""
    bucket = s3_server.make_bucket(f"retention-{uuid.uuid4().hex[:12]}")
    url = f"{bucket}/run"
    fs = s3_server.filesystem()
    foreign = {"notes.txt": b"my notes", "other.ckpt": b"a checkpoint someone else wrote"}
    for name, data in foreign.items():
        fs.pipe_file(f"{url.removeprefix('s3://')}/{name}", data)
    kw = {"dirpath": url, "storage_options": s3_server.storage_options, "monitor": "val_loss", "save_top_k": 2,
          "save_last": True}

    probe = ValLosses()
    cb = CheckpointCallback(**kw)
    trainer, _ = fit(cb, max_epochs=4, extra_callbacks=[probe])
    first = {"objects": objects(s3_server, url), "losses": dict(probe.losses), "step": trainer.global_step,
             "kept": sorted(m.name for m in cb.manager.manifests(owner=cb.owner))}

    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "resume.py").write_text(_RESUME_SCRIPT)
    config = {"callback": kw, "max_epochs": 6, "out": str(tmp / "out.json")}
    (tmp / "config.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp)  # no ~/.aws either: credentials and endpoint come from storage_options only
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(tmp / "resume.py"), str(tmp / "config.json")], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    second = json.loads((tmp / "out.json").read_text())
    second["losses"] = {int(k): v for k, v in second["losses"].items()}
    second["objects"] = objects(s3_server, url)
    second["output"] = proc.stdout + proc.stderr
    yield {"url": url, "foreign": foreign, "first": first, "second": second}
    fs.rm(bucket.removeprefix("s3://"), recursive=True)


def _check_bucket(found: dict[str, bytes], foreign: dict[str, bytes], expected_ckpts: set[str]) -> None:
    for name, data in foreign.items():  # objects we did not write are untouched
        assert found[name] == data
    ours = {n for n in found if n not in foreign}
    assert not [n for n in ours if n.endswith(PENDING_SUFFIX)], sorted(ours)  # no save left half-done
    payloads = {n for n in ours if not n.endswith(MANIFEST_SUFFIX)}
    manifests = {n[: -len(MANIFEST_SUFFIX)] for n in ours if n.endswith(MANIFEST_SUFFIX)}
    assert payloads == manifests  # every checkpoint has its manifest and every manifest its payload
    assert payloads == expected_ckpts
    assert len(found) == 2 * len(expected_ckpts) + len(foreign)


def test_retention_on_a_bucket_deletes_exactly_what_it_should(resumed_run: dict[str, Any]) -> None:
    first, second, foreign = resumed_run["first"], resumed_run["second"], resumed_run["foreign"]
    losses = first["losses"]
    assert sorted(losses) == [0, 1, 2, 3]
    best_two = {ckpt_name(e) for e in sorted(losses, key=losses.__getitem__)[:2]}
    assert set(first["kept"]) == best_two
    _check_bucket(first["objects"], foreign, best_two | {"last.ckpt"})

    # after the resume: top 2 over all six epochs, plus last; the checkpoint resumed from still
    # exists (protected even if it fell out of the top k)
    resumed_name = second["resumed_from"].rsplit("/", 1)[-1]
    all_losses = {**losses, **second["losses"]}
    assert sorted(all_losses) == [0, 1, 2, 3, 4, 5]
    best_two = {ckpt_name(e) for e in sorted(all_losses, key=all_losses.__getitem__)[:2]}
    _check_bucket(second["objects"], foreign, best_two | {"last.ckpt", resumed_name})
    by_name = {ckpt_name(e): loss for e, loss in all_losses.items()}
    assert second["best_model_path"] == f"{resumed_run['url']}/{min(best_two, key=by_name.__getitem__)}"


def test_last_resumes_in_a_fresh_process_with_options_only(resumed_run: dict[str, Any]) -> None:
    first, second = resumed_run["first"], resumed_run["second"]
    url = resumed_run["url"]
    assert second["resumed_from"] == f"{url}/last.ckpt", second["output"][-3000:]
    assert (second["start_epoch"], second["start_step"]) == (4, first["step"]) == (4, 32)
    assert second["global_step"] == 6 * STEPS_PER_EPOCH
    assert second["last_model_path"] == f"{url}/last.ckpt"
    assert f"resuming from {url}/last.ckpt" in second["output"]
    # what the resumed run committed is a valid, verified checkpoint of the final state
    loaded = torch.load(io.BytesIO(second["objects"]["last.ckpt"]), weights_only=True)
    assert loaded["global_step"] == 48 and loaded["epoch"] == 5


# -- refused credentials ----------------------------------------------------------------------------


class RequestCounter:
    """Counts the HTTP requests s3fs filesystems send (a botocore event hook, no mocking)."""

    def __init__(self) -> None:
        self.count = 0

    def attach(self, fs: Any) -> RequestCounter:
        fs.connect()
        # unique_id: attaching to the same (cached) filesystem twice does not count twice
        fs.s3.meta.events.register("before-send.s3", self._seen, unique_id=f"request-counter-{id(self)}")
        return self

    def _seen(self, **kwargs: Any) -> None:
        self.count += 1


def test_wrong_secret_is_a_permission_error_and_is_not_retried(
    s3_server: SeaweedS3, s3_bucket_url: tuple[str, dict[str, Any]]
) -> None:
    url = f"{s3_bucket_url[0]}/run"
    bad = s3_server.storage_options_for(s3_server.key, s3_server.secret + "-wrong")
    requests = RequestCounter()

    def requests_until_refused(retry: RetryPolicy, operation: str) -> int:
        manager = CheckpointManager(url, bad, retry=retry)
        requests.attach(manager.storage.fs)
        requests.count = 0
        with pytest.raises(StoragePermissionError, match=url) as info:
            if operation == "save":
                manager.save({"w": torch.ones(3)}, "a.ckpt")
            else:
                manager.manifests()
        assert isinstance(info.value, PermissionError)
        return requests.count

    for operation in ("save", "list"):
        once = requests_until_refused(RetryPolicy(attempts=1), operation)
        # a retry under this policy would repeat the requests (after sleeping 30 s): the same
        # count proves the refusal was not retried
        patient = requests_until_refused(RetryPolicy(attempts=5, initial_delay=30.0, max_delay=30.0),
                                         operation)
        assert once >= 1 and patient == once, (operation, once, patient)

    # through the callback: the refusal surfaces at setup, not as a silent fresh start
    cb = CheckpointCallback(dirpath=url, storage_options=bad,
                            retry=RetryPolicy(attempts=5, initial_delay=30.0, max_delay=30.0))
    with pytest.raises(StoragePermissionError, match=url):
        fit(cb, max_epochs=1, ckpt_path="last")
    assert objects(s3_server, url) == {}


def test_read_only_identity_can_list_but_not_save(
    s3_server: SeaweedS3, s3_bucket_url: tuple[str, dict[str, Any]]
) -> None:
    url, options = s3_bucket_url
    CheckpointManager(f"{url}/run", options).save({"w": torch.ones(3)}, "a.ckpt", global_step=1)
    reader = CheckpointManager(f"{url}/run", s3_server.storage_options_for(s3_server.readonly_key,
                                                                          s3_server.readonly_secret))
    assert [m.name for m in reader.manifests()] == ["a.ckpt"]
    assert torch.equal(reader.load("a.ckpt")["w"], torch.ones(3))
    with pytest.raises(StoragePermissionError, match=url):
        reader.save({"w": torch.zeros(3)}, "b.ckpt")
    assert set(objects(s3_server, f"{url}/run")) == {"a.ckpt", "a.ckpt.manifest.json"}


# -- the server dies during an upload ---------------------------------------------------------------


@pytest.fixture
def own_server(s3_server: SeaweedS3) -> Iterator[SeaweedS3]:
    """A second server, this test's own, which it may kill and restart.

    Asking for ``s3_server`` applies conftest's policy for a missing ``weed`` (skip; fail on CI).
    """
    with SeaweedS3() as server:
        yield server


@pytest.mark.slow  # long for the default run; .ci/run runs it with -m slow
def test_server_dies_during_an_upload(own_server: SeaweedS3) -> None:
    url = f"{own_server.make_bucket()}/run"
    options = own_server.storage_options
    options["config_kwargs"]["retries"] = {"max_attempts": 1}  # botocore: no retries (s3fs still has its own)
    manager = CheckpointManager(url, options, retry=RetryPolicy(attempts=2, initial_delay=0.1))
    good = {"w": torch.arange(1000, dtype=torch.float32)}
    manager.save(good, "good.ckpt", global_step=1)

    chunk = bytes(8 * 2**20)  # the storage's multipart block: every write uploads a part
    uploading, server_gone = threading.Event(), threading.Event()

    def slow_writer(stream: Any) -> None:
        for i in range(25):  # 200 MiB
            stream.write(chunk)
            if i == 2:
                uploading.set()  # three parts are on the server
                server_gone.wait(30)

    outcome: dict[str, BaseException] = {}

    def save_big() -> None:
        try:
            manager.save({}, "big.ckpt", global_step=2, write=slow_writer)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=save_big)
    worker.start()
    assert uploading.wait(60)
    own_server.kill(hard=True)  # a crash: no chance to finish in-flight requests
    server_gone.set()
    worker.join(120)
    assert not worker.is_alive()

    error = outcome.get("error")
    assert error is not None, "the save succeeded although the server died"
    # the backend's own error (botocore's EndpointConnectionError) arrives translated, naming the URL
    assert isinstance(error, StorageError), f"{type(error).__module__}.{type(error).__name__}: {error}"
    assert isinstance(error, CheckpointError) and f"{url}/big.ckpt" in str(error)

    own_server.start()  # same ports and data directory
    after = CheckpointManager(url, options)
    assert [m.name for m in after.manifests()] == ["good.ckpt"]  # nothing partial is visible
    assert torch.equal(after.load("good.ckpt")["w"], good["w"])
    after.cleanup()  # what the failed save left behind (its marker) goes; the good one stays
    assert set(objects(own_server, url)) == {"good.ckpt", "good.ckpt.manifest.json"}


# -- a damaged object ----------------------------------------------------------------------------------


def test_a_flipped_byte_is_caught_while_streaming(
    s3_server: SeaweedS3, s3_bucket_url: tuple[str, dict[str, Any]]
) -> None:
    url = f"{s3_bucket_url[0]}/run"
    manager = CheckpointManager(url, s3_bucket_url[1])
    state = {"w": torch.randn(3 * 2**20)}  # 12 MiB: several read chunks
    manager.save(state, "a.ckpt", global_step=1)
    fs, key = s3_server.filesystem(), f"{url.removeprefix('s3://')}/a.ckpt"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(key, bytes(data))
    with pytest.raises(CorruptCheckpointError, match="a.ckpt") as info:
        CheckpointManager(url, s3_bucket_url[1]).load("a.ckpt")
    assert "xxh3-128 digest" in str(info.value)
    with pytest.raises(CorruptCheckpointError):
        manager.verify("a.ckpt")
    assert fs.cat_file(key) == bytes(data)  # nothing was deleted or rewritten


# -- a writer killed mid-upload ---------------------------------------------------------------------

_KILLED_UPLOAD_SCRIPT = r'''
import json, sys, time
from lightning_ckpt import CheckpointManager

config = json.load(open(sys.argv[1]))
manager = CheckpointManager(config["url"], config["options"])

def endless(stream):
    block = bytes(8 * 2**20)
    for _ in range(6):  # three 16 MiB parts reach the server...
        stream.write(block)
    print("uploading", flush=True)
    time.sleep(600)  # ...and the process is SIGKILLed here, without any chance to abort

manager.save({}, "big.ckpt", global_step=1, write=endless)
'''


def test_cleanup_aborts_the_upload_of_a_writer_killed_mid_upload(
    s3_server: SeaweedS3, s3_bucket_url: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    bucket, options = s3_bucket_url
    url = f"{bucket}/run"
    fs = s3_server.filesystem()
    name = bucket.removeprefix("s3://")
    foreign = fs.call_s3("create_multipart_upload", Bucket=name, Key="run/someone-elses.bin")  # not ours
    (tmp_path / "kill.py").write_text(_KILLED_UPLOAD_SCRIPT)
    (tmp_path / "config.json").write_text(json.dumps({"url": url, "options": options}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "config.json")],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "uploading"
    finally:
        child.kill()
        child.wait(60)

    def uploads() -> set[str]:
        return {u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=name).get("Uploads") or []}

    assert uploads() == {"run/big.ckpt", "run/someone-elses.bin"}  # the killed writer's parts remain
    (marker,) = objects(s3_server, url)  # invisible: only its marker shows
    assert marker.startswith("big.ckpt~lckpt-") and marker.endswith(".pending")

    removed = CheckpointManager(url, options).cleanup()  # the killed writer's process is gone
    assert removed == ["big.ckpt (unfinished upload)", marker]
    assert uploads() == {"run/someone-elses.bin"}  # ours aborted, the foreign one untouched
    assert objects(s3_server, url) == {}
    fs.call_s3("abort_multipart_upload", Bucket=name, Key="run/someone-elses.bin", UploadId=foreign["UploadId"])
