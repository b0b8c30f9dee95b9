"""Resume time: ``Trainer.fit(ckpt_path=...)`` until the first training step, ours vs Lightning's.

One run measures, side by side, on a local disk and on a SeaweedFS S3 server (``tests/s3_server.py``,
started here on loopback):

- ``resume``: from calling ``trainer.fit(model, data, ckpt_path=...)`` until the first
  ``training_step`` starts (``on_train_batch_start``). Ours: ``CheckpointCallback(dirpath)`` and
  ``ckpt_path="last"`` (list, pick the newest that verifies, verify, load -- what a user types);
  Lightning's: ``ModelCheckpoint(dirpath)`` and ``ckpt_path=`` the checkpoint's path (no listing,
  no verification). The model and optimizer are built before the clock starts in both.
- ``load``: the load alone, until every tensor was read once (as ``load_state_dict`` would):
  ``CheckpointManager(dir).load(name)`` (verified) vs ``TorchCheckpointIO().load_checkpoint(path)``
  (what ``Trainer.fit(ckpt_path=...)`` calls; unverified). With ``--device cuda`` both load with
  ``map_location="cuda"``, so the host-to-device copy is included.

The checkpoint: an MLP (width 2048) + Adam of ``--params`` parameters (16M: ~200 MiB, weights and
two Adam moments), saved by each callback after one training step. Every case runs in a fresh
process forked from a server that has imported torch and Lightning (so nobody pays the import);
methods alternate within each repeat; medians are reported, with ours / Lightning per row.
Local cases read a warm page cache (both methods alike).

Usage::

    python benchmarks/resume.py                  # 16M parameters, local + S3, 5 repeats
    python benchmarks/resume.py --short          # 1M parameters, 1 repeat: the smoke test
    python benchmarks/resume.py --device cuda --params 100M --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "tests") not in sys.path:
    sys.path.insert(1, str(REPO / "tests"))

from benchmarks import forked
from benchmarks.machine import describe
from benchmarks.storage import s3_server

METHODS = ("ours", "lightning")
PHASES = ("resume", "load")
# imports done once in the fork server: Lightning's resume path imports every installed fsspec
# implementation on first use (gcsfs, adlfs: 2-4 s here), which is not what is measured
_PRELOAD = ["torch", "lightning.pytorch", "fsspec", "s3fs", "gcsfs", "adlfs", "lightning_ckpt", "lightning_ckpt.callback"]
_CHILD_TIMEOUT_S = 900
WIDTH = 2048


def parse_count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _aws_env(options: dict[str, Any]) -> dict[str, str]:
    """What makes an option-less ``s3fs.S3FileSystem()`` (Lightning's) reach the server."""
    return {
        "AWS_ENDPOINT_URL": options["client_kwargs"]["endpoint_url"],
        "AWS_ACCESS_KEY_ID": options["key"],
        "AWS_SECRET_ACCESS_KEY": options["secret"],
        "AWS_DEFAULT_REGION": options["client_kwargs"].get("region_name", "us-east-1"),
    }


def _build(case: dict[str, Any], callback: Any, steps: int, probe: Any = None) -> tuple[Any, Any, Any]:
    """(trainer, model, data): ``steps`` training steps in all, ``callback`` saving."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, Dataset

    layers = max(1, round(case["params"] / (WIDTH * WIDTH + WIDTH)))

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])

        def training_step(self, b: Any, _: int) -> Any:
            return self.net(b).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-5)

    class Data(Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> Any:
            return torch.ones(WIDTH)

    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="gpu" if case["device"] == "cuda" else "cpu", devices=1, max_steps=steps, max_epochs=1,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=case["scratch"], callbacks=[callback] + ([probe] if probe is not None else []),
    )
    model = MLP()
    model.configure_optimizers()
    return trainer, model, DataLoader(Data(), batch_size=8)


def _callback(case: dict[str, Any], every: int) -> Any:
    """The method's checkpoint callback, saving every ``every`` steps (resumes save nothing:
    the checkpoint resumed from must stay the same for every repeat)."""
    if case["method"] == "ours":
        from lightning_ckpt import CheckpointCallback

        return CheckpointCallback(dirpath=case["dir"], storage_options=case["options"] or None,
                                  every_n_train_steps=every, save_last=False)
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=case["dir"], every_n_train_steps=every, filename="step={step}",
                           auto_insert_metric_name=False)


def _prepare_case(case: dict[str, Any]) -> dict[str, Any]:
    """Train one step and save (the checkpoint every later case resumes from)."""
    os.environ.update(case["env"])
    trainer, model, data = _build(case, _callback(case, every=1), steps=1)
    trainer.fit(model, data)
    params = sum(p.numel() for p in model.parameters())
    if case["method"] == "ours":
        from lightning_ckpt import CheckpointManager

        newest = CheckpointManager(case["dir"], case["options"] or None).latest()
        assert newest is not None
        return {"name": newest.name, "size": newest.size, "model_params": params}
    path = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return {"name": path.rsplit("/", 1)[1], "size": fs.size(p), "model_params": params}


def _read_all(obj: Any) -> None:
    """Read every byte of every tensor (a memory-mapped load is not free until touched)."""
    import torch

    if isinstance(obj, torch.Tensor):
        obj.float().sum().item() if obj.is_floating_point() else obj.sum().item()
    elif isinstance(obj, dict):
        for v in obj.values():
            _read_all(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _read_all(v)


def _resume_case(case: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl

    os.environ.update(case["env"])
    marks: dict[str, float] = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            marks.setdefault("first_step", time.perf_counter())

    trainer, model, data = _build(case, _callback(case, every=1000), steps=2, probe=Probe())
    target = "last" if case["method"] == "ours" else f"{case['dir']}/{case['name']}"
    start = time.perf_counter()
    trainer.fit(model, data, ckpt_path=target)
    if "first_step" not in marks:
        raise RuntimeError("no training step ran after the resume")
    if trainer.global_step != 2:
        raise RuntimeError(f"resumed at the wrong step: {trainer.global_step}")
    return {"seconds": marks["first_step"] - start}


def _load_case(case: dict[str, Any]) -> dict[str, Any]:
    os.environ.update(case["env"])
    location = "cuda" if case["device"] == "cuda" else "cpu"
    start = time.perf_counter()
    if case["method"] == "ours":
        from lightning_ckpt import CheckpointManager

        out = CheckpointManager(case["dir"], case["options"] or None).load(case["name"], map_location=location)
    else:
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        out = TorchCheckpointIO().load_checkpoint(f"{case['dir']}/{case['name']}", map_location=location)
    _read_all(out)
    if location == "cuda":
        import torch

        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start}


def run_case(ctx: Any, case: dict[str, Any]) -> dict[str, Any]:
    """Run ``case`` in a fresh process; raise with the child's traceback if it failed."""
    phases = {"prepare": _prepare_case, "resume": _resume_case, "load": _load_case}
    return forked.run_case(ctx, case, phases, _CHILD_TIMEOUT_S)


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    backends = tuple(args.backends.split(","))
    scratch = tempfile.mkdtemp(prefix="lckpt-resume-", dir=args.local_dir)
    samples: list[dict[str, Any]] = []
    try:
        with s3_server("s3" in backends) as s3:
            places: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {}
            if "local" in backends:
                places["local"] = (scratch, {}, {})
            if s3 is not None:
                bucket = s3.make_bucket(f"resume-{uuid.uuid4().hex[:10]}")
                places["s3"] = (bucket, s3.storage_options, _aws_env(s3.storage_options))
            cases: dict[tuple[str, str], dict[str, Any]] = {}
            for backend, (root, options, env) in places.items():
                for method in METHODS:
                    case = {"backend": backend, "method": method, "device": args.device, "params": args.params,
                            "dir": f"{root}/{method}", "options": options, "scratch": f"{scratch}/work-{method}",
                            "env": env if method == "lightning" else {}}
                    case.update(run_case(ctx, {**case, "phase": "prepare"}))
                    cases[backend, method] = case
            for repeat in range(args.repeat):
                for backend in places:
                    order = METHODS if repeat % 2 == 0 else METHODS[::-1]  # alternate who goes first
                    for phase in PHASES:
                        for method in order:
                            out = run_case(ctx, {**cases[backend, method], "phase": phase})
                            samples.append({"backend": backend, "method": method, "phase": phase, **out})
                            if args.verbose:
                                print(f"  {backend} {phase} {method}: {out['seconds']:.3f} s", file=sys.stderr)
            sizes = {f"{b}/{m}": c["size"] for (b, m), c in cases.items()}
            params = next(iter(cases.values()))["model_params"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"samples": samples, "sizes": sizes, "model_params": params, "machine": describe("torch", "lightning", "fsspec", "s3fs"),
            "args": vars(args), "medians": medians(samples)}


def medians(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for s in samples:
        out.setdefault(f"{s['backend']}/{s['phase']}", {}).setdefault(s["method"], [])  # type: ignore[arg-type]
    for key, by_method in out.items():
        backend, phase = key.split("/")
        for method in list(by_method):
            xs = [s["seconds"] for s in samples if (s["backend"], s["phase"], s["method"]) == (backend, phase, method)]
            by_method[method] = statistics.median(xs)
        by_method["ratio"] = by_method["ours"] / by_method["lightning"]
    return out


def render(report: dict[str, Any]) -> str:
    a = report["args"]
    lines = [f"resume benchmark: {report['model_params']:,} parameters (MLP of width {WIDTH}) + Adam, device {a['device']}, {a['repeat']} repeat(s), medians",
             "machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()),
             "checkpoint bytes: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in report["sizes"].items()),
             "", "| backend | what | ours s | Lightning s | ours/Lightning |", "|---|---|---:|---:|---:|"]
    for key, m in report["medians"].items():
        backend, phase = key.split("/")
        what = "fit(ckpt_path) to first step" if phase == "resume" else "load alone (every tensor read)"
        lines.append(f"| {backend} | {what} | {m['ours']:.3f} | {m['lightning']:.3f} | {m['ratio']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true", help="1M parameters, one repeat: the smoke test")
    p.add_argument("--params", default=None, help="model parameters, e.g. 16M (default) or 1M")
    p.add_argument("--repeat", type=int, default=None, help="repeats (medians reported; default 5, --short 1)")
    p.add_argument("--backends", default="local,s3", help="comma-separated subset of local,s3")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--local-dir", default=None, help="where local checkpoints go (default: the temp dir)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON to OUT")
    p.add_argument("--verbose", action="store_true", help="print each sample to stderr")
    args = p.parse_args(argv)
    args.params = parse_count(args.params or ("1M" if args.short else "16M"))
    args.repeat = args.repeat or (1 if args.short else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
