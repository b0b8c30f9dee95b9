"""How long a checkpoint save blocks training, ours vs Lightning vs DCP vs the raw floors.

One run measures, side by side and on the same state (an MLP with Adam, built and stepped by a
real Lightning ``Trainer``; the checkpoint is what ``Trainer.save_checkpoint`` would write):

1. ``raw pinned copy``: every tensor of the checkpoint copied into preallocated host buffers
   (pinned for CUDA) -- the floor for how long a save must block training.
2. ``raw write+fsync``: those bytes written to one file in ``--dir`` and fsynced -- the floor
   for persisting.
3. ``Lightning sync``: ``trainer.save_checkpoint(path)`` with the default ``TorchCheckpointIO``
   (what ``ModelCheckpoint`` calls). Lightning does not fsync; "durable" adds an fsync of the
   file, done by this benchmark, to its stall.
4. ``Lightning AsyncCheckpointIO``: the same through ``AsyncCheckpointIO``; stall = the call,
   durable = its single-worker executor drained (a no-op submitted behind the save) + fsync.
5. ``DCP async_save``: ``torch.distributed.checkpoint.async_save`` in a world-size-1 gloo
   process group; stall = the call, durable = ``future.result()`` (DCP fsyncs its files).
6. ``ours sync``: ``CheckpointManager(dir).save(checkpoint, name)``.
7. ``ours async``: ``AsyncSaver(manager).save(checkpoint, name)``; stall =
   ``pending.stall_seconds``, durable = when ``pending.wait()`` returns.

Each method runs in a FRESH process (forked from a fork server that has only imported the
libraries), so allocations never hide each other: one cold save, then ``--saves`` warm ones, each
waited for until durable before the next. Peak extra host memory is the peak RSS over all of a
method's saves minus the RSS once the state was built (the kernel's ``VmHWM``, reset through
``/proc/self/clear_refs``, else RSS sampled every millisecond); peak extra GPU memory is the
``torch.cuda.max_memory_allocated`` delta. The checkpoint dict is built once per process with
``trainer._checkpoint_connector.dump_checkpoint()`` (what ``save_checkpoint`` builds), outside the
timing of ours and DCP; its cost is reported.

Training overhead: a real ``Trainer.fit`` (forward/backward/Adam on the same model, random data)
of ``--train-steps`` timed steps, without saving and with a save every ``--interval-steps`` steps
by each method (one warm-up save before the timed window; no save on the last step, so every
save has an interval to persist in), each variant in its own process; overhead % =
(time_with - time_without) / time_without, time_without being the mean of the no-save runs just
before and just after that method's run (their spread shows the noise: other load on the machine).

Usage::

    python benchmarks/save_stall.py                    # ~350 MB state (29 M params), CPU
    python benchmarks/save_stall.py --quick            # ~16 MB, 2 saves, short training (CI, < 90 s)
    python benchmarks/save_stall.py --device cuda --params 386M --json out.json   # as in ANCHORS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: find lightning_ckpt
    sys.path.insert(0, str(REPO))

from benchmarks.machine import describe
from benchmarks.peak_memory import PeakRSS

MiB = 2**20
METHODS: dict[str, str] = {
    "raw_copy": "raw pinned copy",
    "raw_write": "raw write+fsync",
    "lightning_sync": "Lightning sync (ModelCheckpoint)",
    "lightning_async": "Lightning AsyncCheckpointIO",
    "dcp_async": "DCP async_save",
    "ours_sync": "ours sync (CheckpointManager)",
    "ours_async": "ours async (AsyncSaver)",
}
TRAIN_METHODS = ("lightning_sync", "lightning_async", "dcp_async", "ours_sync", "ours_async")
_PRELOAD = ["torch", "torch.distributed.checkpoint", "lightning.pytorch", "lightning_ckpt"]
_CHILD_TIMEOUT_S = 1800.0


# ------------------------------------------------------------------------------ memory meter
class PeakMemory:
    """Peak host RSS (:class:`PeakRSS`) and CUDA allocation above the level at ``__enter__``, in bytes."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.method = ""
        self.extra_rss = 0
        self.extra_gpu: int | None = None
        self._host = PeakRSS()
        self._gpu_base = 0

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._gpu_base = torch.cuda.memory_allocated()
        self._host.__enter__()
        self.method = self._host.method
        return self

    def __exit__(self, *exc: object) -> None:
        self._host.__exit__(*exc)
        self.extra_rss = self._host.extra
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.extra_gpu = max(0, torch.cuda.max_memory_allocated() - self._gpu_base)


def parse_count(text: str) -> int:
    """``"386M"`` -> 386_000_000; ``"1.3M"``, ``"500k"``, ``"2G"`` and plain integers too."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def model_shape(params: int) -> tuple[int, int]:
    """(width, layers) of an MLP of about ``params`` parameters (width 4096 like ANCHORS at scale)."""
    width = 4096 if params >= 200_000_000 else 2048 if params >= 10_000_000 else 512 if params >= 500_000 else 128
    return width, max(1, round(params / (width * width + width)))


def _build_trainer(case: dict[str, Any], steps: int, callback: Any) -> tuple[Any, Any]:
    """A Trainer + LightningModule that will run ``steps`` training steps calling ``callback``."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, Dataset

    width, layers = case["width"], case["layers"]
    batch = case["batch_size"]

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            mods: list[torch.nn.Module] = []
            for _ in range(layers):
                mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
            self.net = torch.nn.Sequential(*mods[:-1])

        def training_step(self, b: Any, _: int) -> Any:
            x, y = b
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-5)

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, width, generator=gen), torch.randn(batch, width, generator=gen)) for _ in range(4)]

    class Data(Dataset):
        def __len__(self) -> int:
            return steps

        def __getitem__(self, i: int) -> Any:
            return batches[i % len(batches)]

    torch.manual_seed(0)
    plugins = []
    if case["method"] == "lightning_async":
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        plugins.append(AsyncCheckpointIO())
    trainer = pl.Trainer(
        accelerator="gpu" if case["device"] == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        max_steps=steps,
        limit_train_batches=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=case["dir"],
        plugins=plugins or None,
        callbacks=[callback],
    )
    return trainer, (MLP(), DataLoader(Data(), batch_size=None, shuffle=False))


def _tensors(obj: Any) -> list[Any]:
    import torch

    out: list[Any] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clear_dir(path: str) -> None:
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if os.path.isdir(full):
            shutil.rmtree(full)
        else:
            os.remove(full)


class MethodSaver:
    """One save method bound to a live trainer: ``save(name)`` -> stall, ``wait()`` -> durable."""

    def __init__(self, method: str, trainer: Any, directory: str) -> None:
        self.method = method
        self.trainer = trainer
        self.dir = directory
        self.last_path: str | None = None
        self.future: Any = None
        self.pending: Any = None
        self.dump_seconds: list[float] = []
        if method in ("ours_sync", "ours_async"):
            from lightning_ckpt import CheckpointManager
            from lightning_ckpt.async_saver import AsyncSaver

            self.manager = CheckpointManager(directory)
            self.saver = AsyncSaver(self.manager) if method == "ours_async" else None

    def dump(self) -> dict[str, Any]:
        start = time.perf_counter()
        checkpoint = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        self.dump_seconds.append(time.perf_counter() - start)
        return checkpoint

    def save(self, name: str, checkpoint: dict[str, Any] | None = None) -> float:
        """Start a save; return the seconds the caller was blocked (what training waits for)."""
        start = time.perf_counter()
        if self.method in ("lightning_sync", "lightning_async"):
            self.last_path = os.path.join(self.dir, name)
            self.trainer.save_checkpoint(self.last_path)
            return time.perf_counter() - start
        if checkpoint is None:
            checkpoint = self.dump()
            start = time.perf_counter()  # the dump is reported separately (ms)
        if self.method == "dcp_async":
            import torch.distributed.checkpoint as dcp

            if self.future is not None:  # one save in flight at a time, as with the others
                self.future.result()
            self.future = dcp.async_save(checkpoint, checkpoint_id=os.path.join(self.dir, name))
            return time.perf_counter() - start
        if self.method == "ours_sync":
            self.manager.save(checkpoint, name)
            return time.perf_counter() - start
        self.pending = self.saver.save(checkpoint, name)
        return float(self.pending.stall_seconds)

    def wait(self) -> None:
        """Block until the latest save is durable (on disk, fsynced)."""
        if self.method == "lightning_async":
            executor = self.trainer.strategy.checkpoint_io._executor
            if executor is not None:
                executor.submit(lambda: None).result()  # one worker: runs after the queued saves
            if self.trainer.strategy.checkpoint_io._error is not None:
                raise self.trainer.strategy.checkpoint_io._error
        if self.method in ("lightning_sync", "lightning_async") and self.last_path:
            _fsync_path(self.last_path)  # Lightning does not fsync; durable means on disk
        if self.method == "dcp_async" and self.future is not None:
            self.future.result()
            self.future = None
        if self.method == "ours_async" and self.pending is not None:
            self.pending.wait()

    def close(self) -> None:
        if self.method == "ours_async":
            self.saver.close()
        if self.method == "lightning_async":
            self.trainer.strategy.checkpoint_io.teardown()


@contextlib.contextmanager
def _process_group(needed: bool) -> Any:
    if not needed:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ the cases
def _save_case(case: dict[str, Any]) -> dict[str, Any]:
    """Build the state in a 2-step fit, then (inside on_train_end, trainer live) time the saves."""
    import lightning.pytorch as pl
    import torch

    method, cuda = case["method"], case["device"] == "cuda"
    out: dict[str, Any] = {}

    class Measure(pl.Callback):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            saver = MethodSaver(method, trainer, case["dir"])
            checkpoint = saver.dump()
            tensors = _tensors(checkpoint)
            out["state_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
            out["tensors"] = len(tensors)
            out["state_device"] = str(tensors[0].device)
            stalls: list[float] = []
            durables: list[float] = []
            extra: dict[str, list[float]] = {}
            if method == "raw_write":  # its buffers are the raw copy's: built before the meter
                buffers = [torch.empty_like(t, device="cpu", pin_memory=cuda) for t in tensors]
                for b, t in zip(buffers, tensors):
                    b.copy_(t)
            with PeakMemory(cuda) as mem:
                if method == "raw_copy":
                    buffers = [torch.empty_like(t, device="cpu", pin_memory=cuda) for t in tensors]
                for i in range(1 + case["saves"]):
                    name = f"save-{i}.ckpt"
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    if method == "raw_copy":
                        for b, t in zip(buffers, tensors):
                            b.copy_(t, non_blocking=cuda)
                        if cuda:
                            torch.cuda.synchronize()
                        stalls.append(time.perf_counter() - start)
                        continue
                    if method == "raw_write":
                        with open(os.path.join(case["dir"], name), "wb", buffering=0) as f:
                            for b in buffers:
                                f.write(memoryview(b.reshape(-1).view(torch.uint8).numpy()))
                            os.fsync(f.fileno())
                        durables.append(time.perf_counter() - start)
                        _clear_dir(case["dir"])
                        continue
                    stalls.append(saver.save(name, None if method.startswith("lightning") else checkpoint))
                    saver.wait()
                    durables.append(time.perf_counter() - start)
                    if method == "ours_async":
                        extra.setdefault("snapshot_seconds", []).append(saver.pending.snapshot_seconds)
                        extra.setdefault("persist_seconds", []).append(saver.pending.persist_seconds)
                    if method == "lightning_sync" or method == "lightning_async":
                        extra.setdefault("file_bytes", []).append(os.path.getsize(saver.last_path))
                    _clear_dir(case["dir"])
                saver.close()
            out.update(stalls=stalls, durables=durables, extra=extra, extra_rss=mem.extra_rss,
                       extra_gpu=mem.extra_gpu, rss_method=mem.method, dump_seconds=saver.dump_seconds[0])

    with _process_group(method == "dcp_async"):
        trainer, (model, data) = _build_trainer(case, 2, Measure())
        trainer.fit(model, data)
    return out


def _train_case(case: dict[str, Any]) -> dict[str, Any]:
    """A real fit: warm-up, one warm-up save, then ``train_steps`` timed steps saving every K."""
    import lightning.pytorch as pl
    import torch

    method, cuda = case["method"], case["device"] == "cuda"
    warmup, timed, every = case["warmup_steps"], case["train_steps"], case["interval_steps"]
    out: dict[str, Any] = {"stalls": [], "step_seconds": []}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Train(pl.Callback):
        saver: MethodSaver | None = None
        start = last = 0.0

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            step = trainer.global_step  # optimizer steps done
            if step == warmup:
                if method != "none":
                    self.saver = MethodSaver(method, trainer, case["dir"])
                    self.saver.save("warmup.ckpt")  # buffers/executors/process-group warm
                    self.saver.wait()
                sync()
                self.start = self.last = time.perf_counter()
                return
            if step < warmup:
                return
            done = step - warmup
            if done == timed:
                sync()  # on CUDA only at the ends: a sync per step would stop the CPU running ahead
            now = time.perf_counter()
            out["step_seconds"].append(now - self.last)
            self.last = now
            if done == timed:
                out["seconds"] = now - self.start
                if self.saver is not None:
                    drain = time.perf_counter()
                    self.saver.wait()
                    out["drain_seconds"] = time.perf_counter() - drain
                    self.saver.close()
            elif self.saver is not None and done % every == 0:
                out["stalls"].append(self.saver.save(f"step-{step}.ckpt"))

    with _process_group(method == "dcp_async"):
        trainer, (model, data) = _build_trainer(case, warmup + timed, Train())
        trainer.fit(model, data)
    out["steps"] = timed
    return out


def _child(case: dict[str, Any], conn: Any) -> None:
    try:
        fn = _save_case if case["phase"] == "save" else _train_case
        conn.send({"ok": True, **fn(case)})
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent with its traceback
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


def run_case(ctx: Any, case: dict[str, Any]) -> dict[str, Any]:
    """Run ``case`` in a fresh process; return its result or ``{"error": traceback}``."""
    os.makedirs(case["dir"], exist_ok=True)
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(case, child), daemon=False)
    proc.start()
    child.close()
    try:
        if not parent.poll(_CHILD_TIMEOUT_S):
            result = {"ok": False, "error": f"timed out after {_CHILD_TIMEOUT_S:.0f} s"}
        else:
            result = parent.recv()
    except EOFError:
        result = {"ok": False, "error": "the case process died without a result"}
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()
        shutil.rmtree(case["dir"], ignore_errors=True)
    if not result.pop("ok"):
        return {"error": result["error"]}
    return result


# ------------------------------------------------------------------------------ the run
def machine(device: str) -> dict[str, Any]:
    info = {**describe("torch", "lightning"), "device": device}
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _p50(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(results: dict[str, dict[str, Any]], training: dict[str, Any]) -> dict[str, Any]:
    """Per-method p50/max/cold figures and the ratios against the floors and Lightning."""
    rows: dict[str, dict[str, Any]] = {}
    for method, r in results.items():
        if "error" in r:
            rows[method] = {"error": r["error"].strip().splitlines()[-1]}
            continue
        stalls, durables = r["stalls"], r["durables"]
        warm_stall, warm_durable = stalls[1:], durables[1:]
        rows[method] = {
            "cold_stall": stalls[0] if stalls else None,
            "stall_p50": _p50(warm_stall),
            "stall_max": max(warm_stall) if warm_stall else None,
            "cold_durable": durables[0] if durables else None,
            "durable_p50": _p50(warm_durable),
            "extra_rss": r["extra_rss"],
            "extra_rss_x_state": r["extra_rss"] / r["state_bytes"],
            "extra_gpu": r["extra_gpu"],
        }
    base = {m: rows.get(m, {}) for m in ("raw_copy", "raw_write", "lightning_sync")}
    for method, row in rows.items():
        if "error" in row:
            continue
        s, d = row["stall_p50"], row["durable_p50"]
        rc, rw, ls = base["raw_copy"].get("stall_p50"), base["raw_write"].get("durable_p50"), base[
            "lightning_sync"].get("stall_p50")
        row["stall_x_raw_copy"] = s / rc if s is not None and rc else None
        row["stall_x_lightning_sync"] = s / ls if s is not None and ls else None
        # persist throughput relative to the raw write: > 1 is faster than the floor
        row["persist_throughput_x_raw_write"] = rw / d if d and rw else None
    for method in TRAIN_METHODS:
        base_s = baseline_seconds(training, method)
        t = training.get(method)
        if t and "error" not in t and base_s and method in rows and "error" not in rows[method]:
            rows[method]["overhead_pct"] = (t["seconds"] - base_s) / base_s * 100
    return rows


def baseline_seconds(training: dict[str, Any], method: str) -> float | None:
    """Mean time of the no-save runs just before and just after ``method``'s training run."""
    t = training.get(method)
    if not t or "baselines" not in t:
        return None
    none = training.get("none", [])
    times = [none[i]["seconds"] for i in t["baselines"] if i < len(none) and "seconds" in none[i]]
    return statistics.mean(times) if times else None


def _fmt(x: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def render(report: dict[str, Any]) -> str:
    m, a, rows = report["machine"], report["args"], report["rows"]
    state_mib = report["state_bytes"] / MiB if report.get("state_bytes") else None
    lines = [
        "## Save stall benchmark",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus']} CPU cores, {m['memory_gib']} GiB RAM; "
        f"device {m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}; Python {m['python']}, "
        f"torch {m['torch']}, Lightning {m['lightning']}; kernel {m['kernel']}.",
        f"State: MLP width {a['width']} x {a['layers']} layers = {a['param_count'] / 1e6:.1f} M params + Adam "
        f"= {_fmt(state_mib, '.0f')} MiB in {report.get('tensors', '?')} tensors on {m['device']}; "
        f"directory {a['dir']}; 1 cold + {a['saves']} warm saves per method, each in a fresh process.",
        f"Peak host memory: {report.get('rss_method', '?')}.",
        "",
        "| method | cold stall (s) | warm stall p50 (s) | warm stall max (s) | until durable p50 (s) "
        "| extra host RAM (MiB, ×state) | extra GPU (MiB) | stall ÷ raw copy | stall ÷ Lightning sync "
        f"| persist throughput ÷ raw write | training overhead (save every {a['interval_steps']} steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, label in METHODS.items():
        row = rows.get(method)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {label} | error: {row['error']} |" + " |" * 10)
            continue
        gpu = "n/a" if row["extra_gpu"] is None else f"{row['extra_gpu'] / MiB:.0f}"
        lines.append(
            f"| {label} | {_fmt(row['cold_stall'])} | {_fmt(row['stall_p50'])} | {_fmt(row['stall_max'])} "
            f"| {_fmt(row['durable_p50'])} | {row['extra_rss'] / MiB:.0f} ({row['extra_rss_x_state']:.2f}×) "
            f"| {gpu} | {_fmt(row['stall_x_raw_copy'], '.2f', '×')} "
            f"| {_fmt(row['stall_x_lightning_sync'], '.3f', '×')} "
            f"| {_fmt(row['persist_throughput_x_raw_write'], '.2f', '×')} "
            f"| {_fmt(row.get('overhead_pct'), '+.1f', ' %')} |"
        )
    lines += ["", "Stall = time the training loop is blocked per save; durable = from the save call until the "
              "file is on disk and fsynced (Lightning does not fsync: the benchmark's fsync is added). "
              f"Ours and DCP save a pre-built checkpoint dict; building it (`dump_checkpoint`) took "
              f"{_fmt(report.get('dump_seconds'), '.4f')} s."]
    training = report.get("training") or {}
    if training:
        none = [t for t in training.get("none", []) if "seconds" in t]
        interval = report.get("interval_seconds")
        lines += [
            "",
            f"Training: {a['train_steps']} timed steps (batch {a['batch_size']}) after {a['warmup_steps']} warm-up "
            f"steps; a save every {a['interval_steps']} steps "
            f"(≈ {_fmt(interval, '.2f')} s of training between saves, from the no-save runs' median step).",
            "",
            "| variant | training time (s) | step p50 / max (s) | overhead vs the adjacent no-save runs "
            "| stalls (s) | drain after the loop (s) |",
            "|---|---|---|---|---|---|",
        ]
        base = statistics.mean(t["seconds"] for t in none) if none else None
        for method in ["none", *TRAIN_METHODS]:
            runs = training.get("none", []) if method == "none" else [training[method]] if method in training else []
            for i, t in enumerate(runs):
                label = f"no saving (run {i + 1})" if method == "none" else METHODS[method]
                if "error" in t:
                    lines.append(f"| {label} | error: {t['error'].strip().splitlines()[-1]} | | | | | |")
                    continue
                steps = sorted(t["step_seconds"])
                ref = base if method == "none" else baseline_seconds(training, method)
                stalls = ", ".join(f"{s:.3f}" for s in t["stalls"]) or "—"
                drain = _fmt(t.get("drain_seconds"), ".2f") if method != "none" else "—"
                lines.append(
                    f"| {label} | {t['seconds']:.2f} | {statistics.median(steps):.3f} / {steps[-1]:.3f} "
                    f"| {_fmt((t['seconds'] - ref) / ref * 100 if ref else None, '+.1f', ' %')} "
                    f"| {stalls} | {drain} |"
                )
    ours = rows.get("ours_async", {})
    if ours and "error" not in ours:
        lines += ["", "Targets (ANCHORS.md) for ours async:", ""]

        def check(name: str, value: float | None, target: str, ok: bool | None) -> str:
            verdict = "—" if ok is None else ("met" if ok else "MISSED")
            return f"- {name}: {_fmt(value, '.3f')} (target {target}): {verdict}"

        v = ours["stall_x_raw_copy"]
        lines.append(check("p50 stall ÷ raw pinned copy", v, "≤ 1.2", None if v is None else v <= 1.2))
        v = ours["stall_x_lightning_sync"]
        lines.append(check("p50 stall ÷ Lightning sync save", v, "≤ 0.2 on CPU", None if v is None else v <= 0.2))
        v = ours["persist_throughput_x_raw_write"]
        lines.append(check("persist throughput ÷ raw write+fsync", v, "≥ 0.8", None if v is None else v >= 0.8))
        v = ours["extra_rss_x_state"]
        lines.append(check("extra host memory ×state", v, "≤ 1.25", v <= 1.25))
        v = ours.get("overhead_pct")
        interval = report.get("interval_seconds")
        persist = ours["durable_p50"]
        applies = interval is not None and persist is not None and interval >= persist
        lines.append(check("training overhead %", v, "≤ 1 when interval ≥ persist time",
                           None if v is None or not applies else v <= 1.0)
                     + f" (interval {_fmt(interval, '.2f')} s, persist {_fmt(persist, '.2f')} s"
                     + ("" if applies else ": the condition does not hold, no verdict") + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--params", default=None, help="model parameters, e.g. 29M (default) or 386M (as ANCHORS.md)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory under /tmp)")
    p.add_argument("--saves", type=int, default=None, help="warm saves per method after the cold one (default 5)")
    p.add_argument("--interval-steps", type=int, default=None, help="save every K training steps (default 20)")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 80)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 64)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--no-training", action="store_true", help="skip the training-overhead runs")
    p.add_argument("--quick", action="store_true", help="~16 MB state, 2 saves, short training (CI smoke run)")
    p.add_argument("--json", default=None, help="write everything measured to this file")
    args = p.parse_args(argv)

    quick = args.quick
    params = parse_count(args.params or ("1.3M" if quick else "29M"))
    width, layers = model_shape(params)
    saves = args.saves or (2 if quick else 5)
    every = args.interval_steps or (4 if quick else 20)
    steps = args.train_steps or (3 * every if quick else 4 * every)
    batch = args.batch_size or (16 if quick else 64)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda but torch.cuda.is_available() is False")

    root = tempfile.mkdtemp(prefix="lckpt-stall-", dir=args.dir)
    common = {"device": args.device, "width": width, "layers": layers, "saves": saves, "batch_size": batch,
              "warmup_steps": 2, "train_steps": steps, "interval_steps": every}
    report: dict[str, Any] = {
        "machine": machine(args.device),
        "args": {**common, "param_count": layers * (width * width + width), "dir": args.dir or tempfile.gettempdir(),
                 "quick": quick},
    }
    started = time.perf_counter()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    multiprocessing.forkserver.ensure_running()
    results: dict[str, dict[str, Any]] = {}
    training: dict[str, Any] = {}
    try:
        for method in methods:
            print(f"[save] {METHODS[method]} ...", file=sys.stderr, flush=True)
            results[method] = run_case(ctx, {**common, "phase": "save", "method": method,
                                             "dir": os.path.join(root, method)})
            if "error" in results[method]:
                print(results[method]["error"], file=sys.stderr)
        if not args.no_training:
            # A B A C A ...: each method between two no-save runs, so slow drift (other load on
            # the machine) shows as a difference between its two baselines
            variants = ["none"]
            for method in (m for m in TRAIN_METHODS if m in methods):
                variants += [method, "none"]
            for i, method in enumerate(variants):
                print(f"[train] {method} ...", file=sys.stderr, flush=True)
                r = run_case(ctx, {**common, "phase": "train", "method": method,
                                   "dir": os.path.join(root, f"train-{i}-{method}")})
                if "error" in r:
                    print(r["error"], file=sys.stderr)
                if method == "none":
                    training.setdefault("none", []).append(r)
                else:
                    r["baselines"] = [len(training["none"]) - 1, len(training["none"])]  # indices into none
                    training[method] = r
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ok = [r for r in results.values() if "error" not in r]
    if ok:
        report.update(state_bytes=ok[0]["state_bytes"], tensors=ok[0]["tensors"], rss_method=ok[0]["rss_method"],
                      dump_seconds=ok[0]["dump_seconds"])
    report["results"] = results
    report["training"] = training
    report["rows"] = summarize(results, training)
    none = [t for t in training.get("none", []) if "step_seconds" in t]
    if none:
        report["interval_seconds"] = statistics.median(x for t in none for x in t["step_seconds"]) * every
    report["seconds"] = time.perf_counter() - started
    text = render(report)
    print(text)
    print(f"\n(total {report['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    failed = [m for m, r in results.items() if "error" in r and m != "dcp_async"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
