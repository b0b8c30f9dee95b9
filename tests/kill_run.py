"""A training run for the kill campaign (benchmarks/kill_campaign.py), one process per attempt.

    python kill_run.py DIRPATH MAX_STEPS OUT [--options JSON] [--slow SECONDS] [--pad-mb MB]

The exact-resume run of tests/exact_run.py (dropout MLP, shuffling loader, numpy/python
randomness, StepLR, validation every 5 steps) saving a checkpoint at every step and always
resuming with ``ckpt_path="last"``. ``--pad-mb`` adds a constant buffer so each payload is that
much larger (a wider write window); ``--slow`` routes storage through the fault-injecting
``faulty://`` filesystem with every payload write and every manifest commit slowed, so a kill
lands inside a write or inside the commit often. The numbers trained are the same either way.

On train start it prints ``READY step=<global step> resumed_from=<url or None>`` and waits for a
line on stdin before training, so the campaign can inspect the directory after this run's
cleanup and before its first save. At the end it writes the model and optimizer state to OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from exact_run import Net, NoisyData
from torch.utils.data import DataLoader

from lightning_ckpt import CheckpointCallback, Incremental


class PaddedNet(Net):
    def __init__(self, pad_mb: float) -> None:
        super().__init__()
        # constant (never trained), so it widens the write window without changing the numbers
        self.register_buffer("pad", torch.zeros(int(pad_mb * 2**20 / 4)))


class Handshake(pl.Callback):
    def __init__(self, cb: CheckpointCallback) -> None:
        self.cb = cb
        self.done = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wait(trainer)

    def wait(self, trainer: pl.Trainer) -> None:
        if not self.done:  # (a run resumed at max_steps never starts training: called after fit)
            self.done = True
            print(f"READY step={trainer.global_step} resumed_from={self.cb.resumed_from}", flush=True)
            sys.stdin.readline()


def storage(dirpath: str, options: dict[str, Any], slow: float) -> tuple[str, dict[str, Any]]:
    """The URL and options to use: the plain ones, or a slowed ``faulty://`` view of them."""
    if slow <= 0:
        return dirpath, options
    from faulty_fs import Fault, FaultPlan, register

    register()
    plan = FaultPlan(
        Fault(op="write", kind="slow", delay=slow, path="*.ckpt", times=None),
        Fault(op="write", kind="slow", delay=slow, path="*~lckpt-pack-*", times=None),  # incremental pieces
        Fault(op="close", kind="slow", delay=slow * 5, path="*.ckpt", times=None),
        Fault(op="close", kind="slow", delay=slow * 5, path="*.manifest.json", times=None),
    )
    protocol, _, path = dirpath.rpartition("://")
    if not protocol:
        return f"faulty://{path}", {"target_protocol": "file", "plan": plan}
    return f"faulty://{path}", {"target_protocol": protocol, "target_options": options, "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dirpath")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("out")
    parser.add_argument("--options", default="{}")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--pad-mb", type=float, default=0.0)
    parser.add_argument("--incremental", action="store_true", help="incremental saves (the pad is shared)")
    args = parser.parse_args()
    url, options = storage(args.dirpath, json.loads(args.options), args.slow)
    pl.seed_everything(1, workers=True, verbose=False)
    model = PaddedNet(args.pad_mb)
    train = DataLoader(NoisyData(), batch_size=8, shuffle=True)
    val = DataLoader(NoisyData(16), batch_size=8)
    cb = CheckpointCallback(dirpath=url, storage_options=options or None, every_n_train_steps=1, save_top_k=-1,
                            filename="{step}", save_last=True,  # last.ckpt: a name replaced at every step
                            incremental=Incremental(min_bytes=1024) if args.incremental else False)
    handshake = Handshake(cb)
    trainer = pl.Trainer(max_steps=args.max_steps, val_check_interval=5, num_sanity_val_steps=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=[cb, handshake])
    trainer.fit(model, train, val, ckpt_path="last")
    handshake.wait(trainer)
    state = {k: v for k, v in model.state_dict().items() if k != "pad"}
    torch.save({"model": state, "optimizer": trainer.optimizers[0].state_dict(), "step": trainer.global_step},
               args.out)
    print(f"DONE step={trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()
