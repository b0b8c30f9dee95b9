"""Command-line entry point of the MNIST example, built on ``LightningCLI``.

Run ``python -m examples.mnist.train fit --config configs/mnist.yaml`` from the repository root.
Everything — the trainer, the ``lightning_ckpt.CheckpointCallback`` and its storage, the model,
the data — comes from the YAML file, and any value can be overridden on the command line
(``--trainer.max_epochs=5``). With ``ckpt_path: last`` in the config, rerunning the same command
resumes from the newest checkpoint. At the end of ``fit`` the run prints where its checkpoints
went, the best and the last one, and what it resumed from.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI

from examples.mnist.data import MNISTDataModule
from examples.mnist.model import MNISTClassifier
from examples.mnist.report import ResumeReport, checkpoint_summary

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
    return MNISTCLI(
        MNISTClassifier,
        MNISTDataModule,
        save_config_kwargs={"overwrite": True},
        # Added to the callbacks of the config, not replacing them: it only prints.
        trainer_defaults={"callbacks": [ResumeReport()]},
        args=args,
    )


if __name__ == "__main__":
    main()
