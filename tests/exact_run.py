"""A training run for the exact-resume tests, run in a fresh process each time.

    python exact_run.py DIRPATH MAX_STEPS WORKERS OUT [CKPT_PATH]

Trains a small dropout MLP with a shuffling plain DataLoader and a validation loop every 5 steps,
saving a checkpoint at every step, and writes the final model and optimizer state to OUT.
"""

from __future__ import annotations

import random
import sys

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ckpt import CheckpointCallback


class NoisyData(Dataset):
    """Each item draws from numpy and Python RNGs too, so worker seeding matters."""

    def __init__(self, n: int = 80) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        jitter = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        return self.x[i] + jitter, self.y[i]


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y) + 1e-4 * torch.rand(()).item()

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)}


def main(dirpath: str, max_steps: int, workers: int, out: str, ckpt_path: str | None) -> None:
    pl.seed_everything(1, workers=True, verbose=False)
    model = Net()
    kw = {"num_workers": workers, "persistent_workers": False} if workers else {}
    train = DataLoader(NoisyData(), batch_size=8, shuffle=True, **kw)
    val = DataLoader(NoisyData(16), batch_size=8)
    trainer = pl.Trainer(max_steps=max_steps, val_check_interval=5, num_sanity_val_steps=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=[CheckpointCallback(dirpath=dirpath, every_n_train_steps=1, save_top_k=-1,
                                                       filename="{step}")])
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    torch.save({"model": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                "step": trainer.global_step}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else None)
