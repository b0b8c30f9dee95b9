"""Command-line entry point of the MNIST example, built on ``LightningCLI``.

Run ``python -m examples.mnist.train fit --config configs/mnist.yaml`` from the repository root.
Everything — the trainer, the ``lightning_ckpt.CheckpointCallback`` and its storage, the model,
the data — comes from the YAML file, and any value can be overridden on the command line
(``--trainer.max_epochs=5``). With ``ckpt_path: last`` in the config, rerunning the same command
resumes from the newest checkpoint; rerun after training past the config's ``max_epochs`` (with
``--trainer.max_epochs=5``, say), it says there is nothing to train instead of failing. At the
end of ``fit`` the run prints where its checkpoints went, the best and the last one, and what it
resumed from.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from examples.mnist.data import MNISTDataModule
from examples.mnist.model import MNISTClassifier
from examples.mnist.report import PREFIX, ResumeReport, checkpoint_summary

__all__ = ["MNISTCLI", "main"]


class MNISTCLI(LightningCLI):
    """``LightningCLI`` that reports the run's checkpoints after ``fit``."""

    def after_fit(self) -> None:
        """Print where the checkpoints went and what the run resumed from."""
        if self.trainer.is_global_zero:
            print(checkpoint_summary(self.trainer), flush=True)


def main(args: ArgsType = None) -> LightningCLI:
    """Parse ``args`` (default: ``sys.argv[1:]``), run the subcommand, and return the CLI.

    Returning the CLI lets a caller, such as a test, inspect ``cli.trainer`` after the run.
    """
    try:
        return MNISTCLI(
            MNISTClassifier,
            MNISTDataModule,
            save_config_kwargs={"overwrite": True},
            # Added to the callbacks of the config, not replacing them: it only prints.
            trainer_defaults={"callbacks": [ResumeReport()]},
            args=args,
        )
    except MisconfigurationException as exc:
        # The same command rerun after a longer continuation (--trainer.max_epochs=5, then the
        # config's 3): the newest checkpoint is past this run's max_epochs, and Lightning refuses
        # with a traceback. There is nothing to train; say so and how to go on, and end normally.
        if "restored a checkpoint" not in str(exc) or "max_epochs" not in str(exc):
            raise
        print(
            f"{PREFIX} nothing to train: {exc} The newest checkpoint is already past this run's "
            "max_epochs; pass a larger --trainer.max_epochs to train on, or delete the checkpoint "
            "directory (checkpoints/mnist in configs/mnist.yaml) to start over.",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(0) from None


if __name__ == "__main__":
    main()
