"""The classic MNIST convolutional classifier as a ``LightningModule``.

Two convolution blocks (3x3 convolution, ReLU, 2x2 max-pooling), dropout and one linear layer
to the ten digit classes, trained with Adam: the network of the PyTorch and Lightning MNIST
tutorials, small enough to train in seconds on a CPU. It logs ``train_loss`` per step and per
epoch and ``val_loss`` / ``val_acc`` per epoch, so a checkpoint callback can monitor
``val_loss`` and put it in checkpoint file names.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MNISTClassifier"]

# A 28x28 input shrinks to 26 -> 13 after the first block and 11 -> 5 after the second.
_FEATURES = 64 * 5 * 5


class MNISTClassifier(LightningModule):
    """A two-block CNN that classifies 1x28x28 images into the digits 0 to 9.

    Args:
        lr: Adam's learning rate.
        dropout: the dropout probability before the linear head.
        gamma: when set, a ``StepLR`` scheduler multiplies the learning rate by it after every
            epoch; ``None`` (the default) keeps the learning rate constant.
    """

    def __init__(self, lr: float = 1e-3, dropout: float = 0.25, gamma: float | None = None) -> None:
        super().__init__()
        # Stored in every checkpoint, so a resumed run or a loaded model rebuilds the same network.
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(_FEATURES, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return the class logits, shape ``[N, 10]``, for images of shape ``[N, 1, 28, 28]``."""
        logits: Tensor = self.net(x)
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Compute and log the cross-entropy loss of one training batch."""
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log the loss and the accuracy of one validation batch, averaged over the epoch."""
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).to(torch.float32).mean()
        self.log("val_loss", loss, on_epoch=True, prog_bar=True)
        self.log("val_acc", accuracy, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """Adam, plus a per-epoch ``StepLR`` when ``gamma`` is set."""
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        if self.hparams["gamma"] is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.hparams["gamma"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
