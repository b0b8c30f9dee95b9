"""One training run of the exact-resume matrix (tests/test_exact_matrix.py), configured by a dict.

    python matrix_run.py CONFIG_JSON          (or run_in_child(config) from a forked process)

A small dropout MLP with an LR scheduler (stepping per epoch or per step), shuffled training data
whose items also draw from Python's and NumPy's generators, and CheckpointCallback saving at the
trigger under test. ``config``:

    trigger:   epoch | epoch_noval | val_every_2 | val_half | val_steps | steps | time | preempt
    loader:    shuffle | generator | workers | persistent | iterable | iterable_stateful | torchdata |
               distributed
    interval:  "epoch" | "step" (the scheduler's), accumulate: 1 | 2, epochs: max_epochs
    reload: reload_dataloaders_every_n_epochs, limit_train_batches: as the Trainer's
    save_on_train_epoch_end: the callback's argument, noval: no validation, sanity: num_sanity_val_steps, max_steps: train by steps, not epochs
    dirpath, out, ckpt_path (resume from it), preempt_at (global step to send SIGTERM at)

Writes the final weights, optimizer and scheduler states, and a trace (per training batch: epoch,
step, the batch's sum and the loss; per validation: val_loss) to ``out`` (rank 0 of a DDP run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_ckpt import CheckpointCallback
from lightning_ckpt.preemption import Preemption

N, BATCH = 48, 8  # 6 batches an epoch


def _item(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    jitter = float(np.random.rand()) * 1e-3 + random.random() * 1e-3 + float(torch.rand(())) * 1e-3
    return x + jitter, x.sum(0, keepdim=True)


class Noisy(Dataset):
    """Map-style; each item draws from Python's, NumPy's and torch's generators."""

    def __init__(self, n: int = N) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _item(self.x[i])


class Stream(IterableDataset):
    """An iterable dataset without a length: a shuffled pass over the data per epoch, no state."""

    def __init__(self, n: int = N) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __iter__(self) -> Any:
        for i in torch.randperm(len(self.x)).tolist():
            yield _item(self.x[i])


class StatefulStream(Stream):
    """The same stream, able to say where it is and to continue from there (torchdata's protocol)."""

    def __init__(self, n: int = N) -> None:
        super().__init__(n)
        self._order: list[int] | None = None
        self._pos = 0
        self._resume: tuple[list[int], int] | None = None

    def __iter__(self) -> Any:
        if self._resume is not None:
            (self._order, self._pos), self._resume = self._resume, None
        else:
            self._order, self._pos = torch.randperm(len(self.x)).tolist(), 0
        while self._pos < len(self._order):
            i = self._order[self._pos]
            self._pos += 1
            yield _item(self.x[i])

    def state_dict(self) -> dict[str, Any]:
        return {"order": self._order, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("order") is not None:
            self._resume = (list(state["order"]), int(state["pos"]))


class Net(pl.LightningModule):
    def __init__(self, interval: str = "epoch", trace: list | None = None) -> None:
        super().__init__()
        self.interval = interval
        self.trace = trace if trace is not None else []
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.trace.append(["train", self.current_epoch, self.global_step, float(x.sum()), float(loss)])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y) + 1e-3 * torch.rand(())  # validation draws too
        self.log("val_loss", loss)
        if not self.trainer.sanity_checking:
            self.trace.append(["val", self.current_epoch, self.global_step, float(x.sum()), float(loss)])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=0.02)
        step = 2 if self.interval == "epoch" else 5
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step, 0.7),
                                                   "interval": self.interval}}


class Preempt(pl.Callback):
    """Sends this process SIGTERM once the given global step is done, as a cluster would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def loaders(config: dict[str, Any]) -> tuple[Any, DataLoader | None]:
    kind = config.get("loader", "shuffle")
    val = DataLoader(Noisy(16), batch_size=BATCH)
    if kind == "iterable":
        return DataLoader(Stream(), batch_size=BATCH), val
    if kind == "iterable_stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(StatefulStream(), batch_size=BATCH), val
    if kind == "torchdata":  # the user's own StatefulDataLoader (torchdata's samplers)
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(Noisy(), batch_size=BATCH, shuffle=True), val
    kw: dict[str, Any] = {}
    if kind == "generator":
        kw["generator"] = torch.Generator().manual_seed(7)
    if kind in ("workers", "persistent"):
        kw["num_workers"] = 2
        kw["persistent_workers"] = kind == "persistent"
    return DataLoader(Noisy(), batch_size=BATCH, shuffle=True, **kw), val


def trainer_and_callback(config: dict[str, Any]) -> tuple[pl.Trainer, CheckpointCallback]:
    trigger = config.get("trigger", "epoch")
    cb_kw: dict[str, Any] = {"dirpath": config["dirpath"], "save_top_k": -1}
    tr_kw: dict[str, Any] = {}
    if trigger == "epoch_noval" or config.get("noval"):
        tr_kw["limit_val_batches"] = 0
    if trigger == "val_every_2":
        tr_kw["check_val_every_n_epoch"] = 2
    elif trigger == "val_half":
        tr_kw["val_check_interval"] = 0.5
    elif trigger == "val_steps":  # every 4 batches, across epoch boundaries
        tr_kw.update(val_check_interval=4, check_val_every_n_epoch=None)
    elif trigger == "steps":
        cb_kw.update(every_n_train_steps=config.get("every", 4), filename="{step}")
    elif trigger == "time":
        cb_kw.update(train_time_interval=timedelta(seconds=config.get("every", 4)), filename="{step}")
    if "save_on_train_epoch_end" in config:
        cb_kw["save_on_train_epoch_end"] = config["save_on_train_epoch_end"]
    callbacks: list[Any] = []
    if trigger == "preempt":
        cb_kw["preemption"] = Preemption(grace_seconds=600)
        if config.get("preempt_at") is not None:
            callbacks.append(Preempt(config["preempt_at"]))
    cb = CheckpointCallback(**cb_kw)
    if trigger == "time":
        # an injected clock: one second per optimizer step, the same in every process
        holder: dict[str, pl.Trainer] = {}
        cb._clock = lambda: float(holder["t"].global_step) if "t" in holder else 0.0
    strategy: Any = "auto"
    devices: Any = 1
    if config.get("loader") == "distributed":
        strategy, devices = "ddp", 2
    if config.get("reload"):
        tr_kw["reload_dataloaders_every_n_epochs"] = config["reload"]
    if config.get("limit_train_batches"):
        tr_kw["limit_train_batches"] = config["limit_train_batches"]
    if config.get("max_steps"):
        tr_kw["max_steps"] = config["max_steps"]
    trainer = pl.Trainer(max_epochs=config.get("epochs", 4), callbacks=[*callbacks, cb], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         strategy=strategy, devices=devices,
                         num_sanity_val_steps=config.get("sanity", 2),
                         accumulate_grad_batches=config.get("accumulate", 1), **tr_kw)
    if trigger == "time":
        holder["t"] = trainer
    return trainer, cb


def main(config: dict[str, Any]) -> None:
    pl.seed_everything(config.get("seed", 1), workers=True, verbose=False)
    trace: list = []
    model = Net(config.get("interval", "epoch"), trace)
    train, val = loaders(config)
    trainer, _ = trainer_and_callback(config)
    trainer.fit(model, train, val, ckpt_path=config.get("ckpt_path"))
    if trainer.is_global_zero:
        sched = trainer.lr_scheduler_configs[0].scheduler.state_dict()
        torch.save({"model": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                    "scheduler": {k: v for k, v in sched.items() if isinstance(v, (int, float))},
                    "step": trainer.global_step, "trace": json.dumps(trace)}, config["out"])


def serve() -> None:
    """Read one config (JSON) per stdin line; run each in a child forked from this pristine process.

    This process only imported the libraries, so every child starts as a fresh process would (own
    pid, no state of an earlier run) without paying the seconds of imports again. Answers one line
    per config: the child's exit status.
    """
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            os.dup2(2, 1)  # the child's prints must not mix with the status lines
            code = 1
            try:
                main(json.loads(line))
                code = 0
            except SystemExit as exc:  # a preemption exits 75
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported on stderr, the status says it failed
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    serve() if sys.argv[1] == "--serve" else main(json.loads(sys.argv[1]))
