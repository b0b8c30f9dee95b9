"""Train, interrupt, resume: the whole checkpoint story in one command, offline.

``python -m examples.mnist.demo [--dirpath DIR] [--epochs N]`` trains the MNIST classifier on
scikit-learn's bundled digits (no download; it says so) with a ``lightning_ckpt.CheckpointCallback``. Run 1
calls ``fit(ckpt_path="last")``, starts fresh because ``DIR`` is empty, and is stopped after its
first epoch as a crash or a pre-empted job would stop it. Run 2 is a new ``Trainer`` — as in a
new process — with the same checkpoint configuration and the same ``ckpt_path="last"``; it finds
run 1's last checkpoint, resumes at the epoch and global step where run 1 stopped, and trains on
to ``N`` epochs. Finally the demo lists the files in ``DIR``. It takes about ten seconds on a
two-core CPU.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

import fsspec
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from examples.mnist.data import MNISTDataModule
from examples.mnist.model import MNISTClassifier
from examples.mnist.report import PREFIX, ResumeReport, checkpoint_summary
from lightning_ckpt import CheckpointCallback

__all__ = ["SimulatedInterruption", "main"]

DEFAULT_DIRPATH = "checkpoints/mnist-demo"


class SimulatedInterruption(Callback):
    """Stop training after ``after_epochs`` epochs, standing in for a crash or a pre-emption.

    It asks the trainer to stop rather than raising, so the demo stays one quiet process; the
    checkpoint of the last finished epoch has been written by then either way.
    """

    def __init__(self, after_epochs: int = 1) -> None:
        self.after_epochs = after_epochs

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Ask the trainer to stop once ``after_epochs`` epochs are done."""
        if trainer.current_epoch + 1 >= self.after_epochs:
            print(f"{PREFIX} simulating an interruption after epoch {trainer.current_epoch}", flush=True)
            trainer.should_stop = True


def main(argv: Sequence[str] | None = None) -> None:
    """Run the demo with the command-line arguments ``argv`` (default: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.mnist.demo",
        description="Train, interrupt and resume the MNIST example on scikit-learn's bundled digits.",
    )
    parser.add_argument("--dirpath", default=DEFAULT_DIRPATH, help="where checkpoints go (a path or URL)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs in all, at least 2 (default: 3)")
    parser.add_argument(
        "--limit-samples",
        type=int,
        default=None,
        help="at most this many samples per split (default: all 1,797 digits, about 10 s on two cores)",
    )
    parser.add_argument(
        "--clean", action="store_true", help="delete what DIRPATH already holds before starting"
    )
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: one before the interruption, one after")

    fs, path = fsspec.core.url_to_fs(args.dirpath)
    if fs.exists(path) and fs.ls(path):
        if not args.clean:
            # Run 1 would resume from these instead of starting fresh, which is not the story
            # this demo tells; deleting a directory the user named needs their say-so.
            parser.error(
                f"{args.dirpath} is not empty; pass --clean to delete it first, or pick another --dirpath"
            )
        print(f"{PREFIX} deleting the earlier contents of {args.dirpath}")
        fs.rm(path, recursive=True)

    seed_everything(0, workers=True)
    print(
        f"{PREFIX} data: scikit-learn's bundled handwritten digits (1,797 8x8 images, upsampled to 28x28), "
        "no download; `python -m examples.mnist.train` trains on real MNIST (pip install -e '.[mnist]')",
        flush=True,
    )
    with warnings.catch_warnings():
        # Single-process loading and few batches per epoch are deliberate here; Lightning's
        # advice about them would only bury the demo's own output.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
        # Lightning 2.6 on a newer torch, with or without this library: nothing a user can act on
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        _train_interrupt_resume(args.dirpath, args.epochs, args.limit_samples)

    print(f"\n{PREFIX} files in {args.dirpath}:")
    for name, info in sorted(fs.find(path, detail=True).items()):
        print(f"{PREFIX}   {name[len(path) :].lstrip('/'):<48} {info.get('size', 0):>10,} bytes")


def _train_interrupt_resume(dirpath: str, epochs: int, limit_samples: int | None) -> None:
    print(f"\n{PREFIX} === run 1: fit(ckpt_path='last') into an empty {dirpath} ===", flush=True)
    trainer = _trainer(dirpath, epochs, SimulatedInterruption(after_epochs=1))
    trainer.fit(MNISTClassifier(), datamodule=_data(limit_samples), ckpt_path="last")
    print(checkpoint_summary(trainer), flush=True)

    print(f"\n{PREFIX} === run 2: a new Trainer, the same fit(ckpt_path='last') ===", flush=True)
    trainer = _trainer(dirpath, epochs)
    trainer.fit(MNISTClassifier(), datamodule=_data(limit_samples), ckpt_path="last")
    print(checkpoint_summary(trainer), flush=True)


def _trainer(dirpath: str, epochs: int, *extra: Callback) -> Trainer:
    """A CPU-friendly trainer whose checkpoint configuration is the same in both runs."""
    checkpoints = CheckpointCallback(
        dirpath=dirpath,
        filename="{epoch}-{val_loss:.3f}",
        monitor="val_loss",
        mode="min",
        save_top_k=2,
        save_last=True,
    )
    return Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
        callbacks=[checkpoints, ResumeReport(), *extra],
    )


def _data(limit_samples: int | None) -> MNISTDataModule:
    return MNISTDataModule(source="digits", batch_size=64, limit_samples=limit_samples)


if __name__ == "__main__":
    main()
