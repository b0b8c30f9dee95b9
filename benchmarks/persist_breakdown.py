"""Where a save's persist time goes: serialization, the zip writer's CRC-32, the digest, write + fsync.

One process, the save-stall benchmark's state by default (an MLP of width 2048 x 7 + Adam, 336 MiB in
56 tensors, CPU), each step timed alone, methods alternated, medians of ``--repeat``:

- ``raw write+fsync``: the serialized bytes written to a file and fsynced (the floor);
- ``torch.save -> discard``: serialization alone (torch's zip writer, CRC-32 included) into a sink
  that drops the bytes;
- ``torch.save -> discard, no CRC-32``: the same with torch's ``compute_crc32`` off (what the zip
  writer's checksum costs; our digest already covers the bytes);
- ``xxh3-128`` / ``BLAKE3`` / ``sha256`` of the serialized bytes;
- ``ours: CheckpointManager.save``: serialize + digest (overlapped) + write + fsync + commit.

Usage::

    python benchmarks/persist_breakdown.py [--repeat 5] [--dir /tmp] [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # noqa: ANN001
        return memoryview(b).nbytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a 3 MiB state, one repeat: the smoke test")
    p.add_argument("--dir", default=None)
    args = p.parse_args(argv)
    import torch
    import torch.utils.serialization as tus

    from lightning_ckpt import CheckpointManager
    from lightning_ckpt.digest import BLAKE3, SHA256, XXH3_128, hash_chunks

    torch.manual_seed(0)
    width = 256 if args.quick else 2048
    repeat = 1 if args.quick else args.repeat
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(7)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    state = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    directory = tempfile.mkdtemp(prefix="lckpt-persist-", dir=args.dir)
    manager = CheckpointManager(directory)

    def raw() -> None:
        with open(os.path.join(directory, "raw.bin"), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def serialize() -> None:
        torch.save(state, _Discard())

    def serialize_no_crc() -> None:
        tus.config.save.compute_crc32 = False
        try:
            torch.save(state, _Discard())
        finally:
            tus.config.save.compute_crc32 = True

    steps = {
        "raw write+fsync": raw,
        "torch.save -> discard": serialize,
        "torch.save -> discard, no CRC-32": serialize_no_crc,
        "xxh3-128 of the bytes": lambda: hash_chunks(XXH3_128, [data]),
        "BLAKE3 of the bytes": lambda: hash_chunks(BLAKE3, [data]),
        "sha256 of the bytes": lambda: hash_chunks(SHA256, [data]),
        "ours: CheckpointManager.save": lambda: manager.save(state, "a.ckpt"),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeat):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["raw write+fsync"])
    print(f"{len(data) / 2**20:.0f} MiB serialized, medians of {repeat}, {os.cpu_count()} CPUs")
    print("| step | s | ÷ raw write+fsync |\n|---|---:|---:|")
    for name, xs in times.items():
        print(f"| {name} | {statistics.median(xs):.3f} | {statistics.median(xs) / floor:.2f}× |")
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
