"""A real Azure Blob server for the tests: Azurite (``azurite-blob``) on a free loopback port.

:class:`Azurite` starts one ``azurite-blob`` process (Microsoft's emulator of the Blob service,
block blobs with staged and committed blocks included) in its own process group, on a port
chosen free on 127.0.0.1, with its data in a private temporary directory and its debug log beside
it. Azurite checks Shared Key signatures of the well-known development account
(``devstoreaccount1``): a wrong account key is refused with ``403 AuthenticationFailed``.
``start()`` returns only once a container can be created and a blob written and read back
through adlfs, and a wrong key is refused; ``stop()`` kills the process group and removes the
directory.

The binary comes from npm (``npm install -g azurite``); Node.js 18 or later must be installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from gcs_server import free_port, port_open
from s3_server import _die_with_parent

if TYPE_CHECKING:
    from typing_extensions import Self

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


class Azurite:
    """One Azurite Blob server on loopback, for tests; use as a context manager or start/stop.

    Attributes of interest once started: :attr:`endpoint_url`, :attr:`storage_options` (for
    ``fsspec``/adlfs), :attr:`startup_seconds`, :attr:`log_path`.
    """

    def __init__(self, *, binary: str | None = None, startup_timeout: float = 30.0, port_attempts: int = 3) -> None:
        found = binary or find_azurite()
        if found is None:
            raise AzuriteError("no azurite-blob executable (npm install -g azurite)")
        self.binary = found
        self.startup_timeout = startup_timeout
        self.port_attempts = port_attempts
        self.root: str | None = None
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise AzuriteError("the server was never started")
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def log_path(self) -> str:
        if self.root is None:
            raise AzuriteError("the server was never started or is already stopped")
        return os.path.join(self.root, "azurite.log")

    @property
    def storage_options(self) -> dict[str, Any]:
        """adlfs keyword arguments for the development account (a fresh dict on every access)."""
        return self.storage_options_for(ACCOUNT_KEY)

    def storage_options_for(self, key: str) -> dict[str, Any]:
        """adlfs keyword arguments with any account key, e.g. a wrong one to test refusals."""
        return {"connection_string": f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
                                     f"BlobEndpoint={self.endpoint_url};"}

    def start(self) -> Self:
        if self.running:
            raise AzuriteError("the server is already running")
        self.root = tempfile.mkdtemp(prefix="azurite-")
        os.makedirs(os.path.join(self.root, "data"))
        began = time.monotonic()
        for attempt in range(1, self.port_attempts + 1):
            self.port = free_port()
            self._spawn()
            try:
                self._wait_ready(began + self.startup_timeout)
            except AzuriteError:
                taken = "eaddrinuse" in self.log_tail().lower()
                self._kill()
                if taken and attempt < self.port_attempts:
                    continue
                self.stop()
                raise
            self.startup_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Kill the process group and delete the temporary directory. Safe to call twice."""
        self._kill()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def filesystem(self, **overrides: Any) -> Any:
        """A new, uncached adlfs filesystem on this server (for checks beside the code under test)."""
        import adlfs

        return adlfs.AzureBlobFileSystem(skip_instance_cache=True, **{**self.storage_options, **overrides})

    def make_container(self, name: str | None = None) -> str:
        """Create a container (a unique name if none is given) and return ``az://<name>``."""
        container = name or f"c-{uuid.uuid4().hex[:16]}"
        self.filesystem().mkdir(container)
        return f"az://{container}"

    def log_tail(self, lines: int = 40) -> str:
        if self.root is None:
            return ""
        try:
            text = Path(self.log_path).read_bytes()[-64 * 1024 :].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ------------------------------------------------------------------------------
    def _spawn(self) -> None:
        assert self.root is not None
        command = [self.binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                   "--location", os.path.join(self.root, "data"), "--silent", "--disableTelemetry",
                   # the Python SDK may be newer than the emulator; the API subset we use is old
                   "--skipApiVersionCheck"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AZURITE_")}
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env,
                start_new_session=True, preexec_fn=_die_with_parent(),  # noqa: PLW1509 - see s3_server
            )

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def _wait_ready(self, deadline: float) -> None:
        payload = b"ready " + uuid.uuid4().hex.encode()
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.running:
                code = None if self._process is None else self._process.poll()
                raise AzuriteError(f"azurite exited early (code {code}):\n{self.log_tail()}")
            if not port_open(self.port):
                time.sleep(0.05)
                continue
            try:
                fs = self.filesystem()
                with contextlib.suppress(FileExistsError):
                    fs.mkdir("readiness-probe")
                fs.pipe_file("readiness-probe/probe", payload)
                if fs.cat_file("readiness-probe/probe") == payload:
                    try:
                        self.filesystem(**self.storage_options_for(WRONG_KEY)).cat_file("readiness-probe/probe")
                    except Exception:  # noqa: BLE001 - refused, as it must be
                        fs.rm("readiness-probe", recursive=True)
                        return
                    raise AzuriteError("a request with a wrong account key was not refused")
            except AzuriteError:
                raise
            except Exception as exc:  # noqa: BLE001 - polled until the deadline, then reported
                last = exc
            time.sleep(0.1)
        raise AzuriteError(f"Azurite not ready after {self.startup_timeout:.0f} s (last error: {last!r}):\n"
                           f"{self.log_tail()}")
