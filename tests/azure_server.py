"""A real Azure Blob server for the tests: Azurite (``azurite-blob``) on a free loopback port.

:class:`Azurite` starts one ``azurite-blob`` process (Microsoft's emulator of the Blob service,
block blobs with staged and committed blocks included) in its own process group, on a port
chosen free on 127.0.0.1, with its data in a private temporary directory and its debug log beside
it. Azurite checks Shared Key signatures of the well-known development account
(``devstoreaccount1``): a wrong account key is refused with ``403 AuthenticationFailed``.
``start()`` returns only once a container can be created and a blob written and read back
through adlfs, and a wrong key is refused; ``stop()`` kills the process group and removes the
directory (the process handling is :class:`~server_process.LoopbackServer`'s).

The binary comes from npm (``npm install -g azurite``); Node.js 18 or later must be installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Any

from server_process import Emulator

__all__ = ["ACCOUNT", "ACCOUNT_KEY", "Azurite", "AzuriteError", "find_azurite"]

#: the development account every Azurite knows (public, documented by Microsoft)
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
#: a well-formed key that is not the account's
WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="


class AzuriteError(RuntimeError):
    """The server could not be started; the message ends with the tail of its log."""


def find_azurite() -> str | None:
    """The ``azurite-blob`` executable on ``PATH`` (``npm install -g azurite``), or ``None``."""
    return shutil.which("azurite-blob")


class Azurite(Emulator):
    """One Azurite Blob server on loopback, for tests; use as a context manager or start/stop.

    Attributes of interest once started: :attr:`endpoint_url`, :attr:`storage_options` (for
    ``fsspec``/adlfs), :attr:`startup_seconds`, :attr:`log_path`.
    """

    label, error, prefix, log_name = "Azurite", AzuriteError, "azurite-", "azurite.log"
    missing = "no azurite-blob executable (npm install -g azurite)"

    def __init__(self, *, binary: str | None = None, startup_timeout: float = 30.0, port_attempts: int = 3) -> None:
        super().__init__(binary or find_azurite(), startup_timeout=startup_timeout, port_attempts=port_attempts)

    @property
    def endpoint_url(self) -> str:
        return f"{self.base_url}/{ACCOUNT}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """adlfs keyword arguments for the development account (a fresh dict on every access)."""
        return self.storage_options_for(ACCOUNT_KEY)

    def storage_options_for(self, key: str) -> dict[str, Any]:
        """adlfs keyword arguments with any account key, e.g. a wrong one to test refusals."""
        return {"connection_string": f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
                                     f"BlobEndpoint={self.endpoint_url};"}

    def filesystem(self, **overrides: Any) -> Any:
        """A new, uncached adlfs filesystem on this server (for checks beside the code under test)."""
        import adlfs

        return adlfs.AzureBlobFileSystem(skip_instance_cache=True, **{**self.storage_options, **overrides})

    def make_container(self, name: str | None = None) -> str:
        """Create a container (a unique name if none is given) and return ``az://<name>``."""
        container = name or f"c-{uuid.uuid4().hex[:16]}"
        self.filesystem().mkdir(container)
        return f"az://{container}"

    # -- what LoopbackServer needs -----------------------------------------------------------------
    def _command(self) -> list[str]:
        return [self.binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                "--location", self.data_dir, "--silent", "--disableTelemetry",
                # the Python SDK may be newer than the emulator; the API subset we use is old
                "--skipApiVersionCheck"]

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("AZURITE_")}

    def _round_trip(self) -> bool:
        fs = self.filesystem()
        with contextlib.suppress(FileExistsError):
            fs.mkdir("readiness-probe")
        payload = b"ready " + uuid.uuid4().hex.encode()
        fs.pipe_file("readiness-probe/probe", payload)
        if fs.cat_file("readiness-probe/probe") != payload:
            return False
        try:
            self.filesystem(**self.storage_options_for(WRONG_KEY)).cat_file("readiness-probe/probe")
        except Exception:  # noqa: BLE001 - refused, as it must be
            fs.rm("readiness-probe", recursive=True)
            return True
        raise AzuriteError("a request with a wrong account key was not refused")
