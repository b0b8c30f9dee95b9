"""A slow training run for the preemption tests (signals are sent by the test).

    python preempt_run.py DIRPATH MAX_EPOCHS READY_FILE OUT [PREEMPTION_JSON] [CKPT_PATH] [RUN_JSON]

Touches READY_FILE once global step 20 is reached (after the first epoch's save), then keeps
training slowly. Writes {"start_step": ..., "end_step": ..., "sha": ...} to OUT when fit returns
(``sha``: a hash of the model's weights). RUN_JSON changes the run:

- ``ready``: ``"sanity"`` touches READY_FILE when the sanity check starts (whose batches are then
  slow), ``"load"`` while the checkpoint loads (which then takes ``load_seconds``);
- ``sanity_steps``, ``val_check_interval``: as the Trainer's (default 0 and 1.0);
- ``signal_at_step``: the run sends itself SIGTERM when that global step ends;
- ``shuffle``: shuffle the train data; ``val_draws``: validation draws from the global RNG (as
  random augmentations do), so skipping one changes what follows.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyModel, data  # noqa: E402

from lightning_ckpt import CheckpointCallback  # noqa: E402
from lightning_ckpt.preemption import Preemption  # noqa: E402


class Model(TinyModel):
    def __init__(self, val_draws: bool = False) -> None:
        super().__init__()
        self.val_draws = val_draws

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.val_draws:
            torch.rand(1)
        super().validation_step(batch, batch_idx)


class Slow(pl.Callback):
    def __init__(self, ready: str, run: dict[str, Any]) -> None:
        self.ready = Path(ready)
        self.run = run
        self.start_step: int | None = None

    def _touch(self, what: str) -> None:
        if not self.ready.exists():
            self.ready.write_text(what)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):  # noqa: ANN001, ANN201
        if self.run.get("ready") == "load":
            self._touch("load")
            time.sleep(self.run.get("load_seconds", 5))

    def on_sanity_check_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        if self.run.get("ready") == "sanity":
            self._touch("sanity")

    def on_validation_batch_end(self, trainer, *args):  # noqa: ANN001, ANN002, ANN201
        if trainer.sanity_checking:
            time.sleep(1.0)

    def on_train_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        if self.run.get("ready", "step") == "step" and trainer.global_step >= 20:
            self._touch(str(trainer.global_step))
        if trainer.global_step == self.run.get("signal_at_step"):
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.02)


def main() -> None:
    dirpath, max_epochs, ready, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] else {}
    ckpt_path = sys.argv[6] if len(sys.argv) > 6 and sys.argv[6] else None
    run = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    pl.seed_everything(0, verbose=False)
    slow = Slow(ready, run)
    cb = CheckpointCallback(dirpath=dirpath, save_top_k=-1, preemption=Preemption(**options))
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[slow, cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=run.get("sanity_steps", 0),
                         val_check_interval=run.get("val_check_interval", 1.0), accelerator="cpu")
    train, val = data(n=128, batch_size=8)
    if run.get("shuffle"):
        train = DataLoader(train.dataset, batch_size=8, shuffle=True)
    model = Model(run.get("val_draws", False))
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    sha = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.state_dict().values())).hexdigest()
    Path(out).write_text(json.dumps({"start_step": slow.start_step, "end_step": trainer.global_step, "sha": sha}))


if __name__ == "__main__":
    main()
