"""A multi-process training run for the distributed tests (launched as a script, as users do).

    python tests/dist_run.py CONFIG_JSON

Lightning's ``ddp`` launcher re-runs this script once per extra rank, so everything comes from
one JSON file: strategy (``ddp`` or ``fsdp2`` = ModelParallelStrategy with ``fully_shard``),
devices, dirpath, storage_options, max_steps, ckpt_path, callback arguments, a fault plan for
one rank's storage, and where each rank reports (``OUT.rank{N}.json``): the callback's view of
best/last/top-k, the global step, and a hash of the full model and optimizer state.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import traceback
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ckpt import CheckpointCallback


class Data(Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Net(pl.LightningModule):
    def __init__(self, sharded: bool = False, fail_rank: int | None = None, fail_step: int | None = None,
                 rank_seed: bool = False, width: int = 32) -> None:
        super().__init__()
        self.sharded, self.rank_seed = sharded, rank_seed
        self.sync_dist = True  # False: every rank logs the val_loss of its own share of the data
        self.fail_rank, self.fail_step = fail_rank, fail_step
        self.net = nn.Sequential(nn.Linear(8, width), nn.Dropout(0.2), nn.ReLU(), nn.Linear(width, 1))

    def setup(self, stage: str) -> None:
        if self.rank_seed:  # ranks draw different dropout masks: their random streams differ
            torch.manual_seed(100 + self.global_rank)

    def configure_model(self) -> None:
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_rank == self.global_rank and self.fail_step == self.global_step:
            raise RuntimeError(f"rank {self.global_rank} fails on purpose at step {self.global_step}")
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=self.sync_dist)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def full_state(trainer: pl.Trainer, model: Net) -> dict[str, torch.Tensor]:
    """Model + optimizer state as full tensors (gathered from shards), keyed by name."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if not model.sharded:
        out = {f"model.{k}": v for k, v in model.state_dict().items()}
        opt = trainer.optimizers[0].state_dict()
        names = [n for n, _ in model.named_parameters()]
        for idx, state in opt["state"].items():
            for key, value in state.items():
                out[f"optim.{names[idx]}.{key}"] = torch.as_tensor(value)
        return out
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    out = {f"model.{k}": v for k, v in get_model_state_dict(model, options=options).items()}
    opt = get_optimizer_state_dict(model, trainer.optimizers[0], options=options)
    for name, state in opt["state"].items():
        for key, value in state.items():
            out[f"optim.{name}.{key}"] = torch.as_tensor(value)
    return out


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordLoaded(pl.Callback):
    """Hashes the full model + optimizer state right after a resume loaded it (before any step)."""

    def __init__(self) -> None:
        self.sha: str | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:
            self.sha = digest(full_state(trainer, pl_module))


class SignalAtStep(pl.Callback):
    """Every rank sends itself ``signal`` once ``step`` is reached, as SLURM signals every task."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def main(config: dict[str, Any]) -> None:
    pl.seed_everything(7, workers=True, verbose=False)
    sharded = config.get("strategy") == "fsdp2"
    model = Net(sharded, config.get("fail_rank"), config.get("fail_step"), config.get("rank_seed", False),
                config.get("width", 32))
    model.sync_dist = config.get("sync_dist", True)
    if sharded:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=config["devices"], tensor_parallel_size=1,
                                              save_distributed_checkpoint=not config.get("full_state_dict", False))
    else:
        strategy = config.get("strategy", "ddp")
    storage_options = config.get("storage_options")
    if config.get("faults") is not None:  # faults in rank 0's storage: faulty:///path over the local disk
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from faulty_fs import Fault, FaultPlan, register

        register()
        storage_options = {"target_protocol": "file", "plan": FaultPlan(*(Fault(**f) for f in config["faults"]))}
    callback = CheckpointCallback(dirpath=config["dirpath"], storage_options=storage_options,
                                  **config.get("callback", {}))
    trainer = pl.Trainer(
        accelerator="cpu", devices=config["devices"], strategy=strategy, max_steps=config["max_steps"],
        max_epochs=config.get("max_epochs"), val_check_interval=config.get("val_check_interval", 4),
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback, loaded := RecordLoaded()]
        + ([SignalAtStep(config["signal_at_step"], signal.SIGTERM)] if config.get("signal_at_step") else []),
    )
    report: dict[str, Any] = {"rank": trainer.global_rank}
    try:
        trainer.fit(model, DataLoader(Data(), batch_size=4, shuffle=True), DataLoader(Data(16), batch_size=4),
                    ckpt_path=config.get("ckpt_path"))
    except Exception as exc:  # noqa: BLE001 -- reported for the test to judge
        report["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    report.update(
        global_step=trainer.global_step,
        best_model_path=callback.best_model_path,
        best_model_score=None if callback.best_model_score is None else float(callback.best_model_score),
        last_model_path=callback.last_model_path,
        best_k_models=sorted(callback.best_k_models),
        resumed_from=callback.resumed_from,
        failed_saves=callback.failed_saves,
        loaded_sha=loaded.sha,
    )
    if "error" not in report:
        report["state_sha"] = digest(full_state(trainer, model))
    with open(f"{config['out']}.rank{trainer.global_rank}.json", "w") as f:
        json.dump(report, f)
    if torch.distributed.is_initialized():  # a tidy end, as a training script should have
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main(cfg)
