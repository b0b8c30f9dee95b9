"""Incremental vs full checkpoints, in one run: bytes written, stall and persist time per save, and
what the directory holds after N saves.

Two models, each saved once an "epoch" (a few real optimizer steps between saves) with the
background saver the callback uses (``async_save=True``: the stall is what training waits for,
the persist runs beside it):

- ``95% frozen``: a stack of square linear layers of which only the last 5 % of the parameters
  train (a fine-tuning shape: frozen backbone, trained head);
- ``0% frozen``: the same stack, every layer trained (the overhead of incremental saves when
  nothing can be shared).

Each is run with full and with incremental saves into its own directory, with retention keeping
the newest ``--keep`` checkpoints (``KeepLatest``); the storage figure is the directory's size
after the last save and its retention. Figures are medians over the saves after the first (the
first incremental save writes everything). Nothing here is asserted; ``--short`` is the smoke
run of ``tests/test_benchmarks_incremental.py``.

    python benchmarks/incremental.py                       # 20 layers of 1536x1536 (180 MiB), 10 saves
    python benchmarks/incremental.py --short --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_ckpt import CheckpointManager, Incremental, KeepLatest  # noqa: E402
from lightning_ckpt.async_saver import AsyncSaver  # noqa: E402


def build(layers: int, width: int, frozen_fraction: float, optimizer: str, seed: int = 0) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    frozen = min(layers - 1, round(layers * frozen_fraction))
    for layer in list(model)[:frozen]:
        layer.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9) if optimizer == "sgd" else torch.optim.AdamW(params, lr=1e-4)
    return model, opt


def train(model: nn.Module, opt: Any, width: int, steps: int = 2) -> None:
    for _ in range(steps):
        x = torch.randn(4, width)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def run(frozen: float, args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    """Both modes side by side: every epoch the same state is saved full and incremental, the
    order alternating, so the disk's write-back and the machine's load fall on both alike."""
    model, opt = build(args.layers, args.width, frozen, args.optimizer)
    modes: dict[str, dict[str, Any]] = {}
    for mode in ("full", "incremental"):
        directory = os.path.join(root, f"{mode}-{int(frozen * 100)}")
        os.makedirs(directory)
        manager = CheckpointManager(directory)
        modes[mode] = {"dir": directory, "manager": manager, "saver": AsyncSaver(manager),
                       "inc": Incremental() if mode == "incremental" else None,
                       "stalls": [], "persists": [], "written": []}
    try:
        for epoch in range(args.saves):
            train(model, opt, args.width)
            order = ("full", "incremental") if epoch % 2 else ("incremental", "full")
            for mode in order:
                m = modes[mode]
                directory = m["dir"]
                before = {f: os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)}
                state = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "epoch": epoch}
                meta: dict[str, Any] = {"global_step": epoch}
                if m["inc"] is not None:
                    meta["incremental"] = m["inc"]
                start = time.perf_counter()
                pending = m["saver"].save(state, f"epoch={epoch}.ckpt", **meta)
                m["stalls"].append(time.perf_counter() - start)
                assert pending is not None
                pending.wait()
                m["persists"].append(pending.persist_seconds)
                after = {f: os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)}
                m["written"].append(sum(n for f, n in after.items() if before.get(f) != n))
                m["manager"].prune(KeepLatest(args.keep))
    finally:
        for m in modes.values():
            m["saver"].close()
    later = slice(1, None) if args.saves > 1 else slice(None)
    results = []
    for mode, m in modes.items():
        manager = m["manager"]
        for manifest in manager.manifests():  # every checkpoint left is complete and verifies
            manager.verify(manifest.name)
        results.append({
            "mode": mode,
            "frozen": frozen,
            "bytes_per_save": statistics.median(m["written"][later]),
            "first_save_bytes": m["written"][0],
            "stall_s": statistics.median(m["stalls"][later]),
            "persist_s": statistics.median(m["persists"][later]),
            "storage_bytes": dir_bytes(m["dir"]),
            "checkpoints_kept": len(manager.manifests()),
        })
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--saves", type=int, default=10)
    parser.add_argument("--keep", type=int, default=3, help="retention: keep the newest K checkpoints")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="sgd: SGD with momentum (one state tensor per trained weight); adamw: two")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--short", action="store_true", help="a smoke run: 4 layers of 256, 3 saves")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.short:
        args.layers, args.width, args.saves = 4, 256, 3
    from machine import describe

    root = tempfile.mkdtemp(prefix="lckpt-incr-", dir=args.dir)
    results = []
    try:
        for frozen in (0.95, 0.0):
            results.extend(run(frozen, args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = args.layers * args.width * args.width * 4
    print(f"# incremental checkpoints: {args.layers} layers of {args.width}x{args.width} ({size / 2**20:.0f} MiB of "
          f"weights), {args.optimizer}, {args.saves} saves, async_save, keep newest {args.keep}")
    print(f"# machine: {json.dumps(describe('torch'))}")
    print("| frozen | mode | bytes/save | first save | stall/save | persist/save | storage after saves |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['frozen']:.0%} | {r['mode']} | {r['bytes_per_save'] / 2**20:.2f} MiB | "
              f"{r['first_save_bytes'] / 2**20:.2f} MiB | {r['stall_s'] * 1e3:.1f} ms | {r['persist_s'] * 1e3:.0f} ms | "
              f"{r['storage_bytes'] / 2**20:.1f} MiB |")
    ratios = {}
    for frozen in (0.95, 0.0):
        full = next(r for r in results if r["frozen"] == frozen and r["mode"] == "full")
        inc = next(r for r in results if r["frozen"] == frozen and r["mode"] == "incremental")
        ratios[f"{frozen:.0%}"] = {
            "bytes_per_save": inc["bytes_per_save"] / full["bytes_per_save"],
            "stall": inc["stall_s"] / full["stall_s"],
            "persist": inc["persist_s"] / full["persist_s"],
            "storage_vs_one_full_checkpoint": inc["storage_bytes"] / full["first_save_bytes"],
            "storage_vs_full": inc["storage_bytes"] / full["storage_bytes"],
        }
    print("\n| frozen | bytes/save inc/full | stall inc/full | persist inc/full | storage inc / one full ckpt | "
          "storage inc/full |")
    print("|---|---|---|---|---|---|")
    for frozen, r in ratios.items():
        print(f"| {frozen} | {r['bytes_per_save']:.3f} | {r['stall']:.3f} | {r['persist']:.3f} | "
              f"{r['storage_vs_one_full_checkpoint']:.2f} | {r['storage_vs_full']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": describe("torch"), "results": results, "ratios": ratios}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
