"""MNIST as a ``LightningDataModule``, with an offline fallback to scikit-learn's digits.

``source="mnist"`` reads torchvision's MNIST (downloading it into ``data_dir`` when it is not
there); ``source="digits"`` uses the 1,797 8x8 handwritten digits that scikit-learn ships inside
its wheel, upsampled to 28x28 so the same network trains on them; ``source="auto"`` (the
default) tries MNIST and, on any failure — torchvision missing or broken, no network — prints one
line to stderr saying why and falls back to the digits. The network is probed with a short
timeout before any download, so an offline machine falls back in seconds rather than waiting on
a hung connection. Both sources give ``TensorDataset``s of float32 images ``[N, 1, 28, 28]``,
normalised with MNIST's mean and standard deviation, and int64 labels; ``source_used`` tells
which one a run got.
"""

from __future__ import annotations

import socket
import sys
import threading
from types import ModuleType
from typing import Literal
from urllib.parse import urlsplit

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["MNISTDataModule", "MNISTUnavailable"]

Source = Literal["auto", "mnist", "digits"]

# MNIST's training-set statistics; the digits are normalised with the same numbers so that a
# model sees inputs on the same scale whichever source it was trained on.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# Seconds to wait for the MNIST mirror to answer before concluding that there is no network.
PROBE_TIMEOUT_S = 3.0
# Seconds a stalled download may sit without receiving data before it is abandoned.
DOWNLOAD_TIMEOUT_S = 30.0
_DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"


class MNISTUnavailable(RuntimeError):
    """MNIST could not be read from disk nor downloaded; the message says why."""


class MNISTDataModule(LightningDataModule):
    """Train and validation loaders over MNIST, or over scikit-learn's digits when offline.

    Args:
        data_dir: where torchvision keeps (and downloads) MNIST.
        batch_size: the batch size of both loaders.
        num_workers: worker processes per loader; 0 loads in the main process.
        source: ``"mnist"``, ``"digits"``, or ``"auto"`` for MNIST with a fallback to digits.
        limit_samples: when set, each split keeps at most this many samples (a seeded random
            subset), for quick runs.
        seed: seeds the digits' train/validation split and the ``limit_samples`` subset, so
            every run, and every resumed run, sees the same samples.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        source: Source = "auto",
        limit_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in ("auto", "mnist", "digits"):
            raise ValueError(f"source must be 'auto', 'mnist' or 'digits', got {source!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if limit_samples is not None and limit_samples < 1:
            raise ValueError(f"limit_samples must be at least 1 or None, got {limit_samples}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.source = source
        self.limit_samples = limit_samples
        self.seed = seed
        #: ``"mnist"`` or ``"digits"`` once :meth:`setup` has run; ``None`` before.
        self.source_used: Literal["mnist", "digits"] | None = None
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        # Why prepare_data could not get MNIST, kept for the fallback message in setup.
        self._unavailable_reason: str | None = None

    def prepare_data(self) -> None:
        """Download MNIST into ``data_dir`` when it is wanted and not there yet.

        Lightning calls this on one process per node before :meth:`setup`. With
        ``source="mnist"`` a failure raises :class:`MNISTUnavailable`; with ``"auto"`` it is
        remembered and reported when :meth:`setup` falls back.
        """
        if self.source == "digits":
            return
        try:
            download_mnist(self.data_dir)
        except MNISTUnavailable as exc:
            if self.source == "mnist":
                raise
            self._unavailable_reason = str(exc)

    def setup(self, stage: str | None = None) -> None:
        """Build the train and validation datasets from the chosen source (once)."""
        if self.train_set is not None:
            return
        if self.source != "digits":
            try:
                train, val = load_mnist(self.data_dir)
            except MNISTUnavailable as exc:
                if self.source == "mnist":
                    raise
                _announce_fallback(self._unavailable_reason or str(exc))
            else:
                self.source_used = "mnist"
        if self.source_used is None:
            train, val = load_digits(self.seed)
            self.source_used = "digits"
        self.train_set = _limit(train, self.limit_samples, self.seed)
        self.val_set = _limit(val, self.limit_samples, self.seed + 1)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Shuffled training batches of ``(images, labels)``."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Validation batches of ``(images, labels)`` in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader[tuple[Tensor, ...]]:
        if dataset is None:
            raise RuntimeError("MNISTDataModule.setup() must run before its dataloaders are asked for")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def download_mnist(data_dir: str) -> None:
    """Make sure MNIST's train and test files are in ``data_dir``, downloading them if needed.

    Raises:
        MNISTUnavailable: torchvision cannot be imported, the mirror does not answer within
            ``PROBE_TIMEOUT_S``, or the download fails.
    """
    datasets = _import_torchvision_datasets()
    if _mnist_on_disk(datasets, data_dir):
        return
    mirror = getattr(datasets.MNIST, "mirrors", [_DEFAULT_MIRROR])[0]
    offline = _probe(mirror, PROBE_TIMEOUT_S)
    if offline is not None:
        raise MNISTUnavailable(f"it is not in {data_dir!r} and cannot be downloaded ({offline})")
    # torchvision's urllib calls take no timeout; the process-wide default is the only way to
    # stop a stalled transfer from hanging, so it is set for the download and restored after.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        for train in (True, False):
            datasets.MNIST(data_dir, train=train, download=True)
    except Exception as exc:  # any failure (HTTP, checksum, disk) means "fall back", and is reported
        raise MNISTUnavailable(f"downloading it failed: {_brief(exc)}") from exc
    finally:
        socket.setdefaulttimeout(previous)


def load_mnist(data_dir: str) -> tuple[TensorDataset, TensorDataset]:
    """Read MNIST's training and test sets from ``data_dir`` as normalised tensors.

    Raises:
        MNISTUnavailable: torchvision cannot be imported or the files are not in ``data_dir``.
    """
    datasets = _import_torchvision_datasets()
    splits = []
    for train in (True, False):
        try:
            dataset = datasets.MNIST(data_dir, train=train, download=False)
        except RuntimeError as exc:  # torchvision's "Dataset not found"
            raise MNISTUnavailable(f"it is not in {data_dir!r} ({_brief(exc)})") from exc
        # Whole tensors instead of PIL images: no torchvision transforms, and the same
        # TensorDataset type as the digits.
        images = _normalise(dataset.data.unsqueeze(1).to(torch.float32) / 255.0)
        splits.append(TensorDataset(images, dataset.targets.to(torch.int64)))
    return splits[0], splits[1]


def load_digits(seed: int = 0, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits, upsampled to 28x28 and split train/validation.

    The split is a seeded permutation, so the same ``seed`` always gives the same split.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    # Pixel values are 0..16; scale to 0..1 like MNIST's 0..255 before normalising.
    small = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = _normalise(F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False))
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val_idx, train_idx = order[:n_val], order[n_val:]
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[val_idx], labels[val_idx]),
    )


def _normalise(images: Tensor) -> Tensor:
    return (images - MNIST_MEAN) / MNIST_STD


def _limit(dataset: TensorDataset, limit: int | None, seed: int) -> TensorDataset:
    """Keep a seeded random subset of at most ``limit`` samples (all classes stay represented)."""
    size = len(dataset)
    if limit is None or limit >= size:
        return dataset
    keep = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:limit]
    return TensorDataset(*(tensor[keep] for tensor in dataset.tensors))


def _import_torchvision_datasets() -> ModuleType:
    """Import ``torchvision.datasets`` only when MNIST is wanted.

    A broken install (e.g. a torchvision built for another torch or CUDA) can raise almost
    anything on import, not just ``ImportError``; every such failure means "no MNIST".
    """
    try:
        from torchvision import datasets
    except Exception as exc:  # see the docstring: the failure modes are not all ImportError
        raise MNISTUnavailable(f"torchvision cannot be imported: {_brief(exc)}") from exc
    module: ModuleType = datasets
    return module


def _mnist_on_disk(datasets: ModuleType, data_dir: str) -> bool:
    try:
        for train in (True, False):
            datasets.MNIST(data_dir, train=train, download=False)
    except RuntimeError:  # torchvision's "Dataset not found"
        return False
    return True


def _probe(url: str, timeout: float) -> str | None:
    """Return ``None`` if ``url``'s host accepts a TCP connection within ``timeout``, else why not.

    The connection is made in a daemon thread because name resolution ignores socket timeouts
    and can block far longer than ``timeout`` on a machine without network.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"no connection to {host}: {_brief(exc)}")

    thread = threading.Thread(target=connect, name="mnist-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        return f"no answer from {host} within {timeout:g} s"
    return outcome[0]


def _brief(exc: BaseException) -> str:
    """One short line for a message: the exception's type and its first line, truncated."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@rank_zero_only
def _announce_fallback(reason: str) -> None:
    print(
        f"MNIST is not available: {reason}. Falling back to scikit-learn's bundled handwritten "
        "digits (1,797 8x8 images) upsampled to 28x28.",
        file=sys.stderr,
        flush=True,
    )
