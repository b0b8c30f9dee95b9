"""One leg of a cross-device round trip, in a fresh process (a CPU-only one hides its GPUs).

    python device_run.py DIRPATH ACCELERATOR MAX_EPOCHS OUT [CKPT_PATH]

Trains helpers.TinyModel on ``ACCELERATOR`` ("cpu" or "gpu") with a CheckpointCallback
(a checkpoint per epoch and last.ckpt in DIRPATH), resuming from CKPT_PATH if given, with no
map_location anywhere. Writes to OUT (moved to the CPU): the weights and Adam state the run
started from, the final ones, the steps, and the devices the training ran on.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import TinyModel, data, trainer

from lightning_ckpt import CheckpointCallback


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_cpu(v) for v in value]
    return value


class Record(pl.Callback):
    def __init__(self) -> None:
        self.start: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = {"step": trainer.global_step, "model": _cpu(pl_module.state_dict()),
                      "optimizer": _cpu(trainer.optimizers[0].state_dict()),
                      "devices": sorted({str(p.device) for p in pl_module.parameters()}),
                      "optimizer_devices": sorted({str(v.device) for s in trainer.optimizers[0].state.values()
                                                   for k, v in s.items() if k != "step"})}


def main(dirpath: str, accelerator: str, max_epochs: int, out: str, ckpt_path: str | None) -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyModel()
    train, val = data()
    record = Record()
    callback = CheckpointCallback(dirpath=dirpath, monitor="val_loss", save_top_k=-1, save_last=True)
    t = trainer([callback, record], max_epochs=max_epochs, accelerator=accelerator, devices=1)
    t.fit(model, train, val, ckpt_path=ckpt_path)
    torch.save({"start": record.start, "step": t.global_step, "model": _cpu(model.state_dict()),
                "optimizer": _cpu(t.optimizers[0].state_dict()), "resumed_from": callback.resumed_from,
                "cuda_available": torch.cuda.is_available()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else None)
