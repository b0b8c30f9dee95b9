"""``python -m lightning_ckpt.cli``: the same as the ``lightning-ckpt`` command."""

import sys

from lightning_ckpt.cli import main

sys.exit(main())
