"""Digests: the algorithms, the pipelined hashers, and the manifest format that names them."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
from pathlib import Path

import blake3
import pytest
import torch
import xxhash

from lightning_ckpt import CheckpointManager
from lightning_ckpt.digest import (
    ALGORITHMS,
    BLAKE3,
    SHA256,
    XXH3_128,
    ChunkHasher,
    HashingWriter,
    UnknownAlgorithmError,
    algorithm_for,
    hash_chunks,
    new,
)
from lightning_ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError, TamperedCheckpointError
from lightning_ckpt.integrity import Manifest
from lightning_ckpt.security import Signer

GOLDEN = Path(__file__).parent / "golden" / "format_main_2026_11"  # sha256 manifests, format 1
KEY = b"k" * 32
REFERENCE = {XXH3_128: lambda d: xxhash.xxh3_128(d).hexdigest(), BLAKE3: lambda d: blake3.blake3(d).hexdigest(),
             SHA256: lambda d: hashlib.sha256(d).hexdigest()}


def blob(n: int) -> bytes:
    return bytes(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)).numpy())


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_each_algorithm_matches_its_reference_implementation(algorithm: str) -> None:
    data = blob(3 * 2**20 + 17)
    assert new(algorithm).__class__ is not None
    assert hash_chunks(algorithm, [data[:5], data[5 : 2**20], data[2**20 :]]) == (len(data), REFERENCE[algorithm](data))
    assert len(REFERENCE[algorithm](data)) == ALGORITHMS[algorithm]


def test_an_unknown_algorithm_is_refused_by_name() -> None:
    with pytest.raises(UnknownAlgorithmError, match="md5"):
        new("md5")


def test_signed_manifests_get_a_collision_resistant_digest() -> None:
    assert algorithm_for(signed=True) == BLAKE3 and algorithm_for(signed=False) == XXH3_128


class Sink(io.RawIOBase):
    def __init__(self, fail_at: int | None = None) -> None:
        self.data, self.fail_at = bytearray(), fail_at

    def write(self, b) -> int:  # noqa: ANN001
        if self.fail_at is not None and len(self.data) + len(b) > self.fail_at:
            raise OSError(28, "No space left on device")
        self.data += bytes(b)
        return len(b)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_the_hashing_writer_forwards_every_byte_and_hashes_what_it_forwarded(algorithm: str, overlap: bool) -> None:
    data = blob(20 * 2**20 + 3)  # more than two write blocks, and small writes between
    sink = Sink()
    writer = HashingWriter(sink, algorithm, overlap=overlap)  # type: ignore[arg-type]
    for part in (data[:10], data[10 : 9 * 2**20], data[9 * 2**20 :]):
        writer.write(bytearray(part))  # a buffer the caller reuses once write returns
    assert (writer.size, writer.digest) == (len(data), REFERENCE[algorithm](data))
    assert bytes(sink.data) == data
    with pytest.raises(ValueError, match="already taken"):
        writer.write(b"x")


def test_the_hashing_writer_raises_the_sinks_error_and_stops_its_thread() -> None:
    before = threading.active_count()
    writer = HashingWriter(Sink(fail_at=12 * 2**20), XXH3_128)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="No space"):
        writer.write(blob(20 * 2**20))
    writer.close()
    assert threading.active_count() == before


def test_the_chunk_hasher_hashes_in_order_and_restarts_clean() -> None:
    data = blob(5 * 2**20)
    hasher = ChunkHasher(BLAKE3, window=2)
    hasher.feed(b"junk from a first attempt")
    hasher.reset()
    for start in range(0, len(data), 2**20):
        hasher.feed(data[start : start + 2**20])
    assert hasher.result() == (len(data), REFERENCE[BLAKE3](data))


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(1000, generator=torch.Generator().manual_seed(seed))}


def test_new_manifests_name_their_algorithm_in_format_4(tmp_path: Path) -> None:
    CheckpointManager(str(tmp_path)).save(state(), "plain.ckpt")
    CheckpointManager(str(tmp_path), signer=Signer(KEY)).save(state(), "signed.ckpt")
    for name, algorithm in (("plain.ckpt", XXH3_128), ("signed.ckpt", BLAKE3)):
        raw = json.loads((tmp_path / f"{name}.manifest.json").read_bytes())
        assert (raw["format_version"], raw["digest_algorithm"]) == (4, algorithm)
        assert raw["digest"] == REFERENCE[algorithm]((tmp_path / name).read_bytes()) and "sha256" not in raw


def test_sha256_manifests_written_before_format_4_load_and_verify(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN, tmp_path / "ck")
    manager = CheckpointManager(str(tmp_path / "ck"))
    for name in ("last.ckpt", "epoch=0-step=8.ckpt"):
        manifest = manager.verify(name)
        assert (manifest.digest_algorithm, manifest.format_version) == (SHA256, 1)
        assert manager.load(name, weights_only=False)["global_step"] == manifest.global_step
    data = bytearray((tmp_path / "ck" / "last.ckpt").read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "ck" / "last.ckpt").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="sha256 digest"):
        manager.load("last.ckpt", weights_only=False)


def test_an_old_manifest_rewritten_keeps_its_format(tmp_path: Path) -> None:
    raw = json.loads((GOLDEN / "last.ckpt.manifest.json").read_bytes())
    manifest = Manifest.from_fields(raw, "golden")
    assert json.loads(manifest.to_json())["sha256"] == raw["sha256"]
    with pytest.raises(ValueError, match="sha256 only"):
        Manifest(name="a", size=1, digest="0" * 32, digest_algorithm=XXH3_128).to_json()


def edit_manifest(path: Path, **fields) -> None:  # noqa: ANN003
    raw = json.loads(path.read_bytes())
    raw.update(fields)
    path.write_text(json.dumps(raw))


def test_an_unknown_algorithm_is_a_corrupt_checkpoint_not_a_fresh_start(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    manager.save(state(), "a.ckpt")
    edit_manifest(tmp_path / "a.ckpt.manifest.json", digest_algorithm="md5")
    with pytest.raises(CorruptCheckpointError, match="digest_algorithm 'md5'"):
        manager.load("a.ckpt")
    with pytest.raises(IncompatibleCheckpointError, match="md5"), pytest.warns(Warning):
        manager.latest()


def test_a_digest_swapped_for_a_weaker_algorithm_under_a_signer_is_tampering(tmp_path: Path) -> None:
    """An attacker rewrites the payload and recomputes the manifest's digest -- in the strong
    algorithm, or switching to a checksum they can forge -- but cannot re-sign."""
    manager = CheckpointManager(str(tmp_path), signer=Signer(KEY))
    manager.save(state(), "a.ckpt")
    evil = io.BytesIO()
    torch.save(state(1), evil)
    (tmp_path / "a.ckpt").write_bytes(evil.getvalue())
    for algorithm in (BLAKE3, XXH3_128):
        edit_manifest(tmp_path / "a.ckpt.manifest.json", size=len(evil.getvalue()), digest_algorithm=algorithm,
                      digest=REFERENCE[algorithm](evil.getvalue()))
        with pytest.raises(TamperedCheckpointError):
            manager.load("a.ckpt")


def test_a_signed_checksum_manifest_is_refused(tmp_path: Path) -> None:
    """A validly signed manifest over an xxh3 checksum is not tamper evidence: refused."""
    from lightning_ckpt.security import canonical  # noqa: F401  (the signer signs canonical fields)

    manager = CheckpointManager(str(tmp_path), signer=Signer(KEY))
    manager.save(state(), "a.ckpt")
    path = tmp_path / "a.ckpt.manifest.json"
    raw = json.loads(path.read_bytes())
    raw.pop("signature")
    raw.update(digest_algorithm=XXH3_128, digest=REFERENCE[XXH3_128]((tmp_path / "a.ckpt").read_bytes()))
    raw["signature"] = Signer(KEY).sign(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(TamperedCheckpointError, match="xxh3-128"):
        manager.load("a.ckpt")


# -- the pipelined read: damage and failures met while ranges are hashed in a worker -------------

import uuid  # noqa: E402
from typing import Any  # noqa: E402

from faulty_fs import Fault, FaultPlan, register  # noqa: E402

from lightning_ckpt import RetryPolicy  # noqa: E402
from lightning_ckpt.errors import StorageError  # noqa: E402

FAST = RetryPolicy(attempts=3, initial_delay=0.0)


@pytest.fixture
def faulty() -> tuple[CheckpointManager, FaultPlan]:
    register()
    plan = FaultPlan()
    manager = CheckpointManager(f"faulty://d-{uuid.uuid4().hex[:8]}/ck", {"target_protocol": "memory", "plan": plan},
                                retry=FAST)
    manager.save({"w": torch.arange(6 * 2**20, dtype=torch.float32)}, "a.ckpt")  # 24 MiB: several blocks
    return manager, plan


def test_a_read_failing_midway_restarts_the_hash_and_loads_the_right_bytes(faulty) -> None:  # noqa: ANN001
    manager, plan = faulty
    plan.add(Fault("read", path="*a.ckpt", nth=2, exc=ConnectionResetError(104, "reset")))  # a blip mid-read
    assert torch.equal(manager.load("a.ckpt")["w"], torch.arange(6 * 2**20, dtype=torch.float32))
    assert plan.count("read", "*a.ckpt") > 3  # it failed, then read again from the start


def test_a_read_failing_every_time_is_a_storage_error_not_damage(faulty) -> None:  # noqa: ANN001
    manager, plan = faulty
    plan.add(Fault("read", path="*a.ckpt", nth=2, times=None, exc=ConnectionResetError(104, "reset")))
    with pytest.raises(StorageError):
        manager.load("a.ckpt")


def test_damage_and_truncation_are_found_by_the_pipelined_read(faulty) -> None:  # noqa: ANN001
    manager, plan = faulty
    fs = manager.storage.fs
    path = manager.storage.path("a.ckpt")
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 1
    fs.pipe_file(path, bytes(data))
    with pytest.raises(CorruptCheckpointError, match="xxh3-128 digest"):
        manager.load("a.ckpt")
    fs.pipe_file(path, bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        manager.load("a.ckpt")
    data[len(data) // 2] ^= 1
    fs.pipe_file(path, bytes(data))  # intact again
    plan.add(Fault("read", kind="short", path="*a.ckpt", nth=2))  # one read silently loses half its bytes
    with pytest.raises(CorruptCheckpointError, match="a.ckpt"):
        manager.load("a.ckpt")
    assert torch.equal(manager.load("a.ckpt")["w"], torch.arange(6 * 2**20, dtype=torch.float32))


@pytest.mark.s3
def test_s3_ranged_reads_survive_failing_ranges_and_refuse_damage(s3_server: Any, s3_bucket_url: Any) -> None:
    from s3_proxy import FaultyProxy, every

    url, options = s3_bucket_url
    state = {"w": torch.arange(10 * 2**20, dtype=torch.float32)}  # 40 MiB: five 8 MiB ranges
    CheckpointManager(url + "/run", options).save(state, "big.ckpt")
    with FaultyProxy(s3_server.endpoint_url, every(3, "reset", methods=("GET",))) as proxy:
        manager = CheckpointManager(url + "/run", proxy.storage_options(options),
                                    retry=RetryPolicy(attempts=6, initial_delay=0.01, max_delay=0.05))
        assert torch.equal(manager.load("big.ckpt")["w"], state["w"])
        assert proxy.faulted("reset") >= 2, proxy.requests  # ranges really failed, and were retried alone
    with FaultyProxy(s3_server.endpoint_url, lambda n, method, path: "500" if method == "GET" and n > 2 else None) as proxy:
        failing = CheckpointManager(url + "/run", proxy.storage_options(options), retry=FAST)
        with pytest.raises(StorageError):
            failing.load("big.ckpt")
    fs, key = s3_server.filesystem(), f"{url.removeprefix('s3://')}/run/big.ckpt"
    data = bytearray(fs.cat_file(key))
    data[-3 * 2**20] ^= 1  # in the last range: found only once every range was hashed
    fs.pipe_file(key, bytes(data))
    with pytest.raises(CorruptCheckpointError, match="xxh3-128 digest"):
        CheckpointManager(url + "/run", options).load("big.ckpt")


# -- the overlapped local load: torch may map the file while its digest is computed -------------


class _Marker:
    """Unpickling this runs code: it creates ``path`` (the proof that a full unpickle happened)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def test_a_damaged_local_payload_is_reported_as_damage_and_nothing_is_returned(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    manager.save({"w": torch.arange(4 * 2**20, dtype=torch.float32)}, "a.ckpt")
    data = bytearray((tmp_path / "a.ckpt").read_bytes())
    data[len(data) // 2] ^= 1  # inside the tensor's bytes: torch alone would load it
    (tmp_path / "a.ckpt").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="xxh3-128 digest"):
        manager.load("a.ckpt")
    data[len(data) // 2] ^= 1
    data[40] ^= 0xFF  # in the zip's first header: torch fails too, the digest is what is reported
    (tmp_path / "a.ckpt").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="xxh3-128 digest"):
        manager.load("a.ckpt")
    (tmp_path / "a.ckpt").write_bytes(bytes(data) + b"more")
    with pytest.raises(CorruptCheckpointError, match="truncated or overwritten"):
        manager.load("a.ckpt")


def test_a_full_unpickle_never_sees_a_payload_before_its_digest_matched(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    manager.save({"w": torch.zeros(3)}, "a.ckpt")
    marker = tmp_path / "code-ran"
    evil = io.BytesIO()
    torch.save({"w": _Marker(str(marker))}, evil)
    (tmp_path / "a.ckpt").write_bytes(evil.getvalue())
    edit_manifest(tmp_path / "a.ckpt.manifest.json", size=len(evil.getvalue()))  # the size fits; the digest not
    with pytest.raises(CorruptCheckpointError, match="xxh3-128 digest"):
        manager.load("a.ckpt", weights_only=False)
    assert not marker.exists()
    with pytest.raises(CorruptCheckpointError, match="xxh3-128 digest"):
        manager.load("a.ckpt")  # weights-only: may parse while hashing, still refuses
    assert not marker.exists()


def test_the_overlapped_load_returns_what_was_saved_and_leaves_no_thread(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    state = {"w": torch.randn(2**20), "step": 3}
    manager.save(state, "a.ckpt")
    before = threading.active_count()
    for _ in range(3):
        out = manager.load("a.ckpt")
        assert torch.equal(out["w"], state["w"]) and out["step"] == 3
    assert threading.active_count() == before


def test_concurrent_overlapped_loads_each_verify_their_own_bytes(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    manager = CheckpointManager(str(tmp_path))
    states = {f"{i}.ckpt": {"w": torch.full((2**18,), float(i))} for i in range(4)}
    for name, state in states.items():
        manager.save(state, name)
    before = threading.active_count()
    with ThreadPoolExecutor(4) as pool:
        loaded = dict(zip(states, pool.map(lambda n: CheckpointManager(str(tmp_path)).load(n), [*states] * 1)))
    assert all(torch.equal(loaded[n]["w"], states[n]["w"]) for n in states)
    assert threading.active_count() <= before + 4  # the pool's own threads at most, no hashing thread left


def test_a_save_failing_midway_leaves_no_hashing_thread(faulty) -> None:  # noqa: ANN001
    manager, plan = faulty
    before = {t.name for t in threading.enumerate()}
    plan.add(Fault("write", path="*b.ckpt*", nth=2, exc=OSError(28, "No space left on device")))
    with pytest.raises(StorageError):
        manager.save({"w": torch.randn(4 * 2**20)}, "b.ckpt")
    assert not [t for t in threading.enumerate() if t.name.startswith("lckpt-digest") and t.name not in before]
    assert [m.name for m in manager.manifests()] == ["a.ckpt"]


# -- the pipelined local save: the disk writes while the checkpoint is still being serialized --------


def test_a_failed_background_flush_fails_the_save_even_if_the_last_fsync_succeeds(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The kernel reports a failed write-back to one fsync only: the background flush's error
    must not be lost because the final fsync (called later) comes back clean."""
    import errno
    import os

    import lightning_ckpt.storage.backends as backends

    manager = CheckpointManager(str(tmp_path))
    manager.save({"w": torch.zeros(10)}, "a.ckpt")
    monkeypatch.setattr(backends, "WRITEBACK_EVERY", 2**20)
    calls = []

    def failing_fdatasync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "write-back failed")

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    with pytest.raises(StorageError, match="write-back failed"):
        manager.save({"w": torch.randn(2**20)}, "a.ckpt")  # 4 MiB: several background flushes due
    assert calls
    monkeypatch.undo()
    assert torch.equal(manager.load("a.ckpt")["w"], torch.zeros(10))  # the previous version, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "a.ckpt.manifest.json"]


def test_a_map_location_callable_never_sees_bytes_before_their_digest_matched(tmp_path: Path) -> None:
    # the caller's own map_location function is code of the caller's: handing it a storage of a
    # payload still being hashed would hand unverified bytes to the caller
    manager = CheckpointManager(str(tmp_path))
    manager.save({"w": torch.arange(4 * 2**20, dtype=torch.float32)}, "a.ckpt")
    data = bytearray((tmp_path / "a.ckpt").read_bytes())
    data[len(data) // 2] ^= 1  # inside the tensor's bytes
    (tmp_path / "a.ckpt").write_bytes(bytes(data))
    seen: list[int] = []

    def keep(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        seen.append(storage.nbytes())
        return storage

    with pytest.raises(CorruptCheckpointError, match="xxh3-128 digest"):
        manager.load("a.ckpt", map_location=keep)
    assert seen == []
    data[len(data) // 2] ^= 1
    (tmp_path / "a.ckpt").write_bytes(bytes(data))
    assert torch.equal(manager.load("a.ckpt", map_location=keep)["w"], torch.arange(4 * 2**20, dtype=torch.float32))
    assert seen


@pytest.mark.parametrize("version", [1, 2])
def test_a_download_held_in_memory_fits_the_containers_memory_limit(tmp_path: Path, monkeypatch, version: int) -> None:  # noqa: ANN001
    # in a container the kernel's MemAvailable is the host's: a checkpoint "fitting" it would be
    # downloaded into a memfd charged to the container's cgroup, and the OOM killer ends the resume
    from lightning_ckpt.storage import sources

    root = tmp_path / "cgroup"
    if version == 2:
        (tmp_path / "self").write_text("0::/pod/job\n")
        group = root / "pod" / "job"
        group.mkdir(parents=True)
        (group / "memory.max").write_text(f"{2**30}\n")
        (group / "memory.current").write_text(f"{900 * 2**20}\n")
        (group / "memory.stat").write_text(f"anon 1\ninactive_file {100 * 2**20}\n")
        (root / "pod" / "memory.max").write_text("max\n")
    else:
        (tmp_path / "self").write_text("5:cpu:/\n4:memory:/pod/job\n")
        group = root / "memory" / "pod" / "job"
        group.mkdir(parents=True)
        (group / "memory.limit_in_bytes").write_text(f"{2**30}\n")
        (group / "memory.usage_in_bytes").write_text(f"{900 * 2**20}\n")
        (group / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {100 * 2**20}\n")
    monkeypatch.setattr(sources, "PROC_SELF_CGROUP", str(tmp_path / "self"))
    monkeypatch.setattr(sources, "CGROUP_ROOT", str(root))
    # 1 GiB limit, 900 MiB used of which 100 MiB reclaimable page cache: 224 MiB of room, half of it
    assert sources.memory_budget() == (2**30 - 800 * 2**20) // 2
    (tmp_path / "self").write_text("0::/elsewhere\n")  # a cgroup without a limit: the kernel's figure
    assert sources.memory_budget() > (2**30 - 800 * 2**20) // 2
