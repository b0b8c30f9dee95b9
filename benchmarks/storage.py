"""Checkpoint save/load throughput and peak extra host memory, ours vs Lightning vs a raw floor.

One run measures, side by side, on (a) a local disk, (b) a SeaweedFS S3 server, (c) a GCS server
(fake-gcs-server) and (d) an Azure Blob server (Azurite), each started by this script on loopback
(``tests/s3_server.py``, ``tests/gcs_server.py``, ``tests/azure_server.py``):

- ``ours``: ``lightning_ckpt.CheckpointManager(dirpath, storage_options).save(state, name)``
  (streams ``torch.save`` into the storage: temp file + fsync + rename locally, a parallel
  multipart upload on S3, a resumable upload in 8 MiB chunks on GCS, 8 MiB staged blocks
  committed at the end on Azure, sha256 on the way) and ``.load(name)`` (verifies size +
  sha256 while streaming; a local file is then memory-mapped, a remote one spooled to a
  temporary file and loaded from there).
- ``lightning``: what ``ModelCheckpoint`` ends up calling, ``Trainer.save_checkpoint`` ->
  ``TorchCheckpointIO.save_checkpoint`` -> ``lightning.fabric.utilities.cloud_io._atomic_save``
  (``torch.save`` into a ``BytesIO``, then ``fs.open(path, "wb")`` locally / ``fs.pipe`` on S3 of
  ``getvalue()``), called directly; loading through ``cloud_io._load``. Lightning passes no
  storage options, so its endpoint and credentials come from the environment (``AWS_*``,
  ``STORAGE_EMULATOR_HOST``, ``AZURE_STORAGE_CONNECTION_STRING``), set in its case's process only.
- ``raw``: the floor: the same serialized bytes written with ``open`` + ``write`` + ``fsync``
  (local) or ``fs.pipe`` (object stores), and read back with ``read()`` / ``fs.cat_file`` (no
  deserialization).

A load is timed (and its memory measured) up to and including one read of every loaded tensor,
as ``load_state_dict`` would do: otherwise a memory-mapped load would look free.

Every case (each method x backend x phase x repeat) runs in a FRESH process forked from a
``multiprocessing`` fork server that has only imported the libraries, so one case's
allocations (and the allocator's retained memory) never hide another's and no case pays the
~5 s Lightning import. Peak extra RSS is the peak resident set size during the timed operation
minus the RSS just before it (after the state was built): on Linux the kernel's exact peak
(``VmHWM`` in ``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``); where
that reset is not available, RSS sampled every millisecond by a thread (psutil if installed,
else ``/proc/self/statm``) -- the table says which was used. The page cache is not RSS, so local
writes that sit in the page cache do not count; a server's memory is another process's.

Usage::

    python benchmarks/storage.py                # 256 MiB state, 3 repeats (medians reported)
    python benchmarks/storage.py --quick        # 32 MiB, 1 repeat: a smoke run for CI (< 60 s)
    python benchmarks/storage.py --size-mb 1024 --tensor-mb 64 --json results.json
    python benchmarks/storage.py --backends local,gcs,azure   # any subset of local,s3,gcs,azure

Sizes are MiB (2**20 bytes); throughput is MiB/s of the serialized checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: find lightning_ckpt and tests/
    sys.path.insert(0, str(REPO))
if str(REPO / "tests") not in sys.path:  # the server helpers import each other by module name
    sys.path.insert(1, str(REPO / "tests"))

from benchmarks import forked
from benchmarks.machine import describe
from benchmarks.peak_memory import PeakRSS

MiB = 2**20
METHODS = ("ours", "lightning", "raw")
BACKENDS = ("local", "s3", "gcs", "azure")
OBJECT_STORES = ("s3", "gcs", "azure")
# Heavy imports done once in the fork server, so each forked case starts in ~0.1 s.
_PRELOAD = ["torch", "fsspec", "s3fs", "gcsfs", "adlfs", "lightning_ckpt", "lightning.fabric.utilities.cloud_io"]
_CHILD_TIMEOUT_S = 900.0


# ------------------------------------------------------------------------------ the workloads
def build_state(size_mb: float, tensor_mb: float) -> dict[str, Any]:
    """A flat dict of float32 tensors totalling ``size_mb`` MiB, none larger than ``tensor_mb``."""
    import torch

    gen = torch.Generator().manual_seed(0)
    total = int(size_mb * MiB) // 4
    per = max(1, int(tensor_mb * MiB) // 4)
    state: dict[str, Any] = {}
    i = 0
    while total > 0:
        n = min(per, total)
        state[f"layer{i:04d}.weight"] = torch.randn(n, generator=gen)
        total -= n
        i += 1
    return state


def _state_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _lightning_env(backend: str, options: dict[str, Any]) -> dict[str, str]:
    """Environment that makes an option-less filesystem of ``backend`` reach the benchmark server."""
    if backend == "s3":
        return _aws_env(options)
    if backend == "gcs":
        return {"STORAGE_EMULATOR_HOST": options["endpoint_url"]}
    if backend == "azure":
        return {"AZURE_STORAGE_CONNECTION_STRING": options["connection_string"]}
    return {}


def _aws_env(options: dict[str, Any]) -> dict[str, str]:
    """Environment that makes an option-less ``s3fs.S3FileSystem()`` reach the benchmark server."""
    return {
        "AWS_ENDPOINT_URL": options["client_kwargs"]["endpoint_url"],
        "AWS_ACCESS_KEY_ID": options["key"],
        "AWS_SECRET_ACCESS_KEY": options["secret"],
        "AWS_DEFAULT_REGION": options["client_kwargs"].get("region_name", "us-east-1"),
    }


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, PeakRSS]:
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, mem


def _filesystem(case: dict[str, Any]) -> Any:
    """The filesystem a method writes through, with its S3 client already connected.

    A training run saves many times through one client, so what is measured is a save through a
    warm client: each method's first request (botocore loading its S3 model, ~0.1 s and ~30 MiB)
    happens here, outside the timing, for all three alike.
    """
    import fsspec

    directory, backend, opts = case["url"], case["backend"], case["storage_options"]
    if case["method"] == "ours":
        from lightning_ckpt import CheckpointManager

        manager = CheckpointManager(directory, opts)
        manager.manifests()  # one listing: connects the client
        return manager
    if case["method"] == "lightning":
        # Lightning builds its filesystem with url_to_fs(path) and no options, so on S3 the
        # endpoint and credentials can only come from the environment. This process runs this
        # one case and nothing else, so no other method ever sees these variables.
        os.environ.update(_lightning_env(backend, opts))
        fs = fsspec.core.url_to_fs(directory)[0]  # cached by fsspec: _atomic_save/_load reuse it
    else:
        fs = fsspec.core.url_to_fs(directory, **opts)[0]
    if backend in OBJECT_STORES:
        fs.ls(directory.split("://", 1)[1].split("/", 1)[0])
    else:
        # TorchCheckpointIO.save_checkpoint makes the directory before calling _atomic_save
        os.makedirs(directory, exist_ok=True)
    return fs


def _save_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    method, backend = case["method"], case["backend"]
    path = f"{case['url']}/{case['name']}"
    state = build_state(case["size_mb"], case["tensor_mb"])
    target = _filesystem(case)

    if method == "ours":
        result, seconds, mem = _timed(lambda: target.save(state, case["name"]))
        size = result.manifest.size
    elif method == "lightning":
        from lightning.fabric.utilities.cloud_io import _atomic_save

        _, seconds, mem = _timed(lambda: _atomic_save(state, path))
        size = int(target.size(path))
    else:  # raw floor: only the I/O of the already serialized bytes
        buf = io.BytesIO()
        torch.save(state, buf)
        blob = buf.getvalue()
        del state, buf
        if backend in OBJECT_STORES:
            _, seconds, mem = _timed(lambda: target.pipe_file(path, blob))
        else:

            def write() -> None:
                with open(path, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())

            _, seconds, mem = _timed(write)
        size = len(blob)
    return {"seconds": seconds, "extra_rss": mem.extra, "rss_method": mem.method, "size": size}


def _touched(state: dict[str, Any]) -> dict[str, Any]:
    """Read every loaded tensor once, as ``load_state_dict`` would: a memory-mapped load is lazy,
    and its memory and time only show when the tensors are used."""
    for value in state.values():
        if hasattr(value, "sum"):
            value.sum()
    return state


def _load_case(case: dict[str, Any]) -> dict[str, Any]:
    method, backend = case["method"], case["backend"]
    path = f"{case['url']}/{case['name']}"
    target = _filesystem(case)

    if method == "ours":
        out, seconds, mem = _timed(lambda: _touched(target.load(case["name"])))
    elif method == "lightning":
        from lightning.fabric.utilities.cloud_io import _load

        out, seconds, mem = _timed(lambda: _touched(_load(path)))
    elif backend in OBJECT_STORES:
        out, seconds, mem = _timed(lambda: target.cat_file(path))
    else:

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        out, seconds, mem = _timed(read)
    # check what came back: all the tensors (or, for raw, all the bytes)
    got, expected = (
        (len(out), case["size"]) if method == "raw" else (_state_bytes(out), int(case["size_mb"] * MiB) // 4 * 4)
    )
    if got != expected:
        raise RuntimeError(f"{method}/{backend}: loaded {got} bytes, expected {expected}")
    return {"seconds": seconds, "extra_rss": mem.extra, "rss_method": mem.method}


def run_case(ctx: Any, case: dict[str, Any]) -> dict[str, Any]:
    """Run ``case`` in a fresh process; raise with the child's traceback if it failed."""
    return forked.run_case(ctx, case, {"save": _save_case, "load": _load_case}, _CHILD_TIMEOUT_S)


def machine() -> dict[str, Any]:
    """What this ran on."""
    return describe("torch", "lightning", "fsspec", "s3fs", "gcsfs", "adlfs")


@contextlib.contextmanager
def s3_server(needed: bool) -> Iterator[Any]:
    """A SeaweedFS S3 server for the run (``None`` when S3 is not benchmarked)."""
    if not needed:
        yield None
        return
    from tests.s3_server import SeaweedS3

    # large volumes: the benchmark writes GBs, and volume growth is not what is measured
    with SeaweedS3(volume_size_limit_mb=1024) as server:
        yield server


@contextlib.contextmanager
def servers(backends: tuple[str, ...]) -> Iterator[dict[str, tuple[str, dict[str, Any], Any]]]:
    """Each object store benchmarked: ``{backend: (bucket URL, storage_options, server)}``."""
    with contextlib.ExitStack() as stack:
        out: dict[str, tuple[str, dict[str, Any], Any]] = {}
        name = f"bench-{uuid.uuid4().hex[:12]}"
        if "s3" in backends:
            s3 = stack.enter_context(s3_server(True))
            out["s3"] = (s3.make_bucket(name), s3.storage_options, s3)
        if "gcs" in backends:
            from gcs_server import FakeGCS

            gcs = stack.enter_context(FakeGCS())
            out["gcs"] = (gcs.make_bucket(name), gcs.storage_options, gcs)
        if "azure" in backends:
            from azure_server import Azurite

            azure = stack.enter_context(Azurite())
            out["azure"] = (azure.make_container(name), azure.storage_options, azure)
        yield out


def _cleanup(backend: str, directory: str, server: Any) -> None:
    if backend in OBJECT_STORES:
        with contextlib.suppress(FileNotFoundError):
            server.filesystem().rm(directory.split("://", 1)[1], recursive=True)
    else:
        shutil.rmtree(directory, ignore_errors=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every case and return the raw samples, the medians and the machine description."""
    started = time.perf_counter()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    # gcsfs >= 2025.x probes every bucket over gRPC, which no emulator serves (tests/gcs_server.py);
    # set before the fork server imports gcsfs
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    multiprocessing.forkserver.ensure_running()  # imports in the background while the servers start
    samples: list[dict[str, Any]] = []
    local_root = tempfile.mkdtemp(prefix="lckpt-bench-", dir=args.local_dir)
    try:
        with servers(args.backends) as stores:
            for rep in range(args.repeat):
                # rotate the order so that no method always runs first (cold caches, warm server)
                methods = list(args.methods[rep % len(args.methods) :]) + list(args.methods[: rep % len(args.methods)])
                for backend in args.backends:
                    for method in methods:
                        server = None
                        if backend in stores:
                            bucket, opts, server = stores[backend]
                            directory = f"{bucket}/{method}-r{rep}"
                        else:
                            directory, opts = os.path.join(local_root, f"{method}-r{rep}"), {}
                        case = {
                            "backend": backend,
                            "method": method,
                            "url": directory,
                            "name": "state.ckpt",
                            "size_mb": args.size_mb,
                            "tensor_mb": args.tensor_mb,
                            "storage_options": opts,
                        }
                        try:
                            saved = run_case(ctx, {**case, "phase": "save"})
                            loaded = run_case(ctx, {**case, "phase": "load", "size": saved["size"]})
                        finally:
                            _cleanup(backend, directory, server)
                        sample = {
                            "backend": backend,
                            "method": method,
                            "repeat": rep,
                            "size": saved["size"],
                            "save_s": saved["seconds"],
                            "save_extra_rss": saved["extra_rss"],
                            "load_s": loaded["seconds"],
                            "load_extra_rss": loaded["extra_rss"],
                            "rss_method": saved["rss_method"],
                        }
                        samples.append(sample)
                        if args.verbose:
                            print(json.dumps(sample), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    results = summarize(samples)
    return {
        "machine": machine(),
        "config": {
            "size_mb": args.size_mb,
            "tensor_mb": args.tensor_mb,
            "repeat": args.repeat,
            "backends": list(args.backends),
            "methods": list(args.methods),
            "local_dir": args.local_dir or tempfile.gettempdir(),
        },
        "rss_method": samples[0]["rss_method"] if samples else None,
        "results": results,
        "ratios": ratios(results),
        "samples": samples,
        "wall_s": time.perf_counter() - started,
    }


def summarize(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of every measure per (backend, method)."""
    out = []
    keys = sorted({(s["backend"], s["method"]) for s in samples}, key=lambda k: (BACKENDS.index(k[0]),
                                                                                 METHODS.index(k[1])))
    for backend, method in keys:
        group = [s for s in samples if (s["backend"], s["method"]) == (backend, method)]
        size = statistics.median(s["size"] for s in group)
        save_s = statistics.median(s["save_s"] for s in group)
        load_s = statistics.median(s["load_s"] for s in group)
        save_rss = statistics.median(s["save_extra_rss"] for s in group)
        load_rss = statistics.median(s["load_extra_rss"] for s in group)
        out.append({
            "backend": backend,
            "method": method,
            "size_mib": size / MiB,
            "save_s": save_s,
            "save_mib_s": size / MiB / save_s if save_s > 0 else float("inf"),
            "save_extra_rss_mib": save_rss / MiB,
            "save_extra_rss_x": save_rss / size,
            "load_s": load_s,
            "load_mib_s": size / MiB / load_s if load_s > 0 else float("inf"),
            "load_extra_rss_mib": load_rss / MiB,
            "load_extra_rss_x": load_rss / size,
            "n": len(group),
        })
    return out


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """ours / Lightning per backend: save and load throughput (> 1 is faster), memory (< 1 is less)."""
    by = {(r["backend"], r["method"]): r for r in results}
    out: dict[str, dict[str, float]] = {}
    for backend in BACKENDS:
        ours, light, raw = by.get((backend, "ours")), by.get((backend, "lightning")), by.get((backend, "raw"))
        entry: dict[str, float] = {}
        if ours and light:
            entry["save_throughput_ours_over_lightning"] = ours["save_mib_s"] / light["save_mib_s"]
            entry["save_extra_rss_ours_over_lightning"] = (
                ours["save_extra_rss_mib"] / light["save_extra_rss_mib"] if light["save_extra_rss_mib"] else float("nan")
            )
            entry["load_throughput_ours_over_lightning"] = ours["load_mib_s"] / light["load_mib_s"]
        if ours and raw:
            entry["save_throughput_ours_over_raw"] = ours["save_mib_s"] / raw["save_mib_s"]
        if entry:
            out[backend] = entry
    return out


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown table plus the ratios and the machine."""
    m, c = report["machine"], report["config"]
    lines = [
        (f"Checkpoint of {c['size_mb']:g} MiB of float32 tensors (each <= {c['tensor_mb']:g} MiB), "
         f"median of {c['repeat']} run(s), every case in a fresh process."),
        (f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, Linux {m['kernel']}; "
         f"Python {m['python']}, torch {m['torch']}, Lightning {m['lightning']}, fsspec {m['fsspec']}, "
         f"s3fs {m['s3fs']}, gcsfs {m.get('gcsfs')}, adlfs {m.get('adlfs')}; on loopback: S3 = SeaweedFS, "
         f"GCS = fake-gcs-server, Azure = Azurite; local dir {c['local_dir']}."),
        f"Peak extra RSS: {report['rss_method']}, minus the RSS just before the operation.",
        "",
        ("| backend | method | save s | save MiB/s | save peak extra RSS MiB (x ckpt) | load s | load MiB/s "
         "| load peak extra RSS MiB (x ckpt) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['backend']} | {r['method']} | {r['save_s']:.3f} | {r['save_mib_s']:.0f} | "
            f"{r['save_extra_rss_mib']:.0f} ({r['save_extra_rss_x']:.2f}x) | {r['load_s']:.3f} | "
            f"{r['load_mib_s']:.0f} | {r['load_extra_rss_mib']:.0f} ({r['load_extra_rss_x']:.2f}x) |"
        )
    if report["ratios"]:
        lines += ["", ("| backend | save MiB/s ours/Lightning | save extra RSS ours/Lightning "
                       "| load MiB/s ours/Lightning | save MiB/s ours/raw |"),
                  "|---|---:|---:|---:|---:|"]
        keys = ("save_throughput_ours_over_lightning", "save_extra_rss_ours_over_lightning",
                "load_throughput_ours_over_lightning", "save_throughput_ours_over_raw")
        for backend, ratio in report["ratios"].items():
            cells = [f"{ratio[k]:.2f}" if k in ratio else "-" for k in keys]
            lines.append(f"| {backend} | {' | '.join(cells)} |")
    lines += ["", ("raw = the serialized bytes written with write+fsync / fs.pipe and read back without "
                   "deserializing (the I/O floor). Lightning's local write has no fsync; ours and raw do."),
              f"Total wall time {report['wall_s']:.1f} s."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small state, one repeat: a smoke run (< 60 s)")
    p.add_argument("--size-mb", type=float, default=None, help="checkpoint size in MiB (256; --quick: 32)")
    p.add_argument("--tensor-mb", type=float, default=16.0,
                   help="largest tensor in MiB (16; a real model's largest tensor is a few %% of its state)")
    p.add_argument("--repeat", type=int, default=None, help="runs per case, medians reported (3; --quick: 1)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of local,s3,gcs,azure")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of ours,lightning,raw")
    p.add_argument("--local-dir", default=None, help="where local checkpoints go (default: the temp dir)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON to OUT")
    p.add_argument("--verbose", action="store_true", help="print each sample to stderr as it completes")
    args = p.parse_args(argv)
    args.size_mb = args.size_mb if args.size_mb is not None else (32.0 if args.quick else 256.0)
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    args.backends = tuple(b for b in args.backends.split(",") if b)
    args.methods = tuple(m for m in args.methods.split(",") if m)
    for value, allowed, what in ((args.backends, BACKENDS, "backend"), (args.methods, METHODS, "method")):
        bad = set(value) - set(allowed)
        if bad or not value:
            p.error(f"unknown {what}(s) {sorted(bad)}; choose from {', '.join(allowed)}")
    if args.size_mb <= 0 or args.tensor_mb <= 0 or args.repeat < 1:
        p.error("--size-mb and --tensor-mb must be positive and --repeat at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
