"""A slow training run for the preemption tests (signals are sent by the test).

    python preempt_run.py DIRPATH MAX_EPOCHS READY_FILE OUT [PREEMPTION_JSON] [CKPT_PATH]

Touches READY_FILE once global step 20 is reached (after the first epoch's save), then keeps
training slowly. Writes {"start_step": ..., "end_step": ...} to OUT when fit returns.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyModel, data  # noqa: E402

from lightning_ckpt import CheckpointCallback  # noqa: E402
from lightning_ckpt.preemption import Preemption  # noqa: E402


class Slow(pl.Callback):
    def __init__(self, ready: str) -> None:
        self.ready = Path(ready)
        self.start_step: int | None = None

    def on_train_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        if trainer.global_step >= 20 and not self.ready.exists():
            self.ready.write_text(str(trainer.global_step))
        time.sleep(0.02)


def main() -> None:
    dirpath, max_epochs, ready, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] else {}
    ckpt_path = sys.argv[6] if len(sys.argv) > 6 else None
    pl.seed_everything(0, verbose=False)
    slow = Slow(ready)
    cb = CheckpointCallback(dirpath=dirpath, save_top_k=-1, preemption=Preemption(**options))
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[slow, cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    train, val = data(n=128, batch_size=8)
    trainer.fit(TinyModel(), train, val, ckpt_path=ckpt_path)
    Path(out).write_text(json.dumps({"start_step": slow.start_step, "end_step": trainer.global_step}))


if __name__ == "__main__":
    main()
