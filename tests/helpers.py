"""Shared test scaffolding: a tiny deterministic LightningModule and trainer factory."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyModel(pl.LightningModule):
    """A two-layer regression net with Adam + StepLR; logs train_loss and val_loss."""

    def __init__(self, lr: float = 0.05, scheduler: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), on_epoch=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        if not self.hparams.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


def data(n: int = 64, batch_size: int = 8, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=batch_size)
    return train, val


def trainer(callbacks: list[Any], max_epochs: int = 2, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("accelerator", "cpu")
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def fit(
    callback: Any,
    max_epochs: int = 2,
    ckpt_path: str | None = None,
    seed: int = 0,
    extra_callbacks: list[Any] | None = None,
    **kwargs: Any,
) -> tuple[pl.Trainer, TinyModel]:
    """Train TinyModel for ``max_epochs`` (8 steps an epoch) with ``callback``."""
    pl.seed_everything(seed, verbose=False)
    model = TinyModel()
    train, val = data()
    t = trainer([callback, *(extra_callbacks or [])], max_epochs=max_epochs, **kwargs)
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return t, model


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
