"""Retries and error translation for every storage call.

Owns :class:`RetryPolicy` (how often and how long to retry), :func:`is_transient` (what is worth
a retry: resets, timeouts, throttling, 5xx; never a refusal, a missing bucket or a full disk),
:func:`translate` (a backend's raw exception -> our :class:`~lightning_ckpt.errors.CheckpointError`
tree: only a real "not found" becomes :class:`~lightning_ckpt.errors.CheckpointNotFoundError`) and
:func:`call` and :func:`call_async`, the retry loops of whole operations and of single requests
(a part of an upload, a range of a download). Must not do I/O of its own or import fsspec;
backends and the facade call into it, never the other way round.
"""

from __future__ import annotations

import asyncio
import errno
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from lightning_ckpt.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    StorageError,
    StoragePermissionError,
)

__all__ = [
    "RetryPolicy",
    "bucket_missing",
    "call",
    "call_async",
    "causes",
    "is_transient",
    "missing_bucket",
    "refused",
    "translate",
]

T = TypeVar("T")

# how S3 (NoSuchBucket) and Azure (ContainerNotFound) word a missing bucket or container
_NO_BUCKET = ("bucket does not exist", "container does not exist", "containernotfound")
# HTTP statuses of a refusal: Azure's SDK and gcsfs carry them on their exceptions
_REFUSED = {401, 403}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EAGAIN, errno.EPIPE, errno.EBUSY}
_TRANSIENT_WORDS = ("throttl", "slowdown", "slow down", "timeout", "timed out", "503", "500", "502", "504",
                    "internalerror", "serviceunavailable", "connection reset", "connection aborted",
                    # botocore's connection errors are not OSErrors and s3fs does not retry them
                    "endpointconnectionerror", "connectionclosederror", "could not connect")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient storage failures with exponential backoff and jitter.

    Args:
        attempts: total tries per operation (1 disables retrying).
        initial_delay: seconds before the second try.
        max_delay: cap of a single backoff sleep.
    """

    attempts: int = 5
    initial_delay: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(f"RetryPolicy(attempts={self.attempts}) must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("RetryPolicy delays must not be negative")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th failure (1-based)."""
        base = min(self.max_delay, self.initial_delay * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (a network blip, not a refusal or a full disk)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if refused(exc) or missing_bucket(exc):
        return False
    status = getattr(exc, "status_code", None) or getattr(exc, "code", None)  # azure-core / gcsfs HttpError
    if isinstance(status, int) and 400 <= status < 600:
        return status in (408, 429) or status >= 500
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _TRANSIENT_ERRNOS
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT_WORDS)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (adlfs wraps Azure's errors in RuntimeError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def missing_bucket(exc: BaseException) -> bool:
    """Whether the store said the bucket (S3, GCS) or container (Azure) itself does not exist."""
    for e in causes(exc):
        text = str(e).lower()
        if getattr(e, "error_code", None) == "ContainerNotFound" or any(word in text for word in _NO_BUCKET):
            return True
    return False


def refused(exc: BaseException) -> bool:
    """Whether the store refused the credentials or the permission (never worth a retry)."""
    for e in causes(exc):
        if isinstance(e, PermissionError):
            return True
        status = getattr(e, "status_code", None) or getattr(e, "code", None)  # azure-core / gcsfs HttpError
        if isinstance(status, int) and status in _REFUSED:
            return True
        if type(e) is OSError and str(e).startswith("Forbidden: "):  # gcsfs's word for HTTP 403
            return True
    return False


def bucket_missing(bucket: str, url: str) -> BucketNotFoundError:
    return BucketNotFoundError(
        errno.ENOENT, f"the bucket {bucket!r} of {url} does not exist (check the URL and storage_options)"
    )


def translate(exc: BaseException, what: str, target: str) -> Exception:
    """Map a raw filesystem exception to the matching :class:`CheckpointError`."""
    message = f"could not {what} {target}: {type(exc).__name__}: {exc}"
    if missing_bucket(exc):
        return BucketNotFoundError(errno.ENOENT, f"could not {what} {target}: {exc} (check the bucket name)")
    if isinstance(exc, FileNotFoundError):
        return CheckpointNotFoundError(errno.ENOENT, f"could not {what} {target}: not found")
    if refused(exc):
        return StoragePermissionError(errno.EACCES, message)
    err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    return StorageError(err, message)


def call(policy: RetryPolicy, what: str, target: str, fn: Callable[[], T], retry: bool = True) -> T:
    """Run ``fn``, retrying transient failures as ``policy`` says; translate errors into our tree."""
    attempts = policy.attempts if retry else 1
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc, StorageError) else None
            if attempt < attempts and cause is not None and is_transient(cause):
                time.sleep(policy.delay(attempt))  # a whole small write, retried as a unit
                continue
            if isinstance(exc, CheckpointError):  # ours already (a special file, a not found, ...)
                raise
            if attempt < attempts and is_transient(exc):
                time.sleep(policy.delay(attempt))
                continue
            raise translate(exc, what, target) from exc
    raise AssertionError("unreachable")  # pragma: no cover


async def call_async(policy: RetryPolicy, fn: Callable[[], Awaitable[T]]) -> T:
    """Await ``fn()``, retrying transient failures as ``policy`` says (one request of a transfer:
    a part of an upload, a range of a download). Errors are raised as they are, untranslated."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return await fn()
        except Exception as exc:
            if attempt >= policy.attempts or not is_transient(exc):
                raise
            await asyncio.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover
