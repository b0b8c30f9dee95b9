"""What every test server shares: one emulator process on loopback, its own process group, a
private temporary directory with its log, port retries, readiness polling, and a kill that leaves
nothing running.

:class:`LoopbackServer` is the base of :class:`~s3_server.SeaweedS3`, :class:`~gcs_server.FakeGCS`
and :class:`~azure_server.Azurite`; each says only what differs: its ports, its command line, the
probe that tells it is ready, and the errors that mean "not yet". ``start()`` returns once the
probe passes (a port another process took between choosing and binding is retried with new ports);
``stop()`` kills the process group and removes the directory; ``kill()`` + ``start()`` restarts on
the same ports and data, to test what survives a crash. Nothing here is global: each instance owns
its process, ports and directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Emulator", "LoopbackServer", "die_with_parent", "free_port", "port_open"]


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


def die_with_parent() -> Callable[[], object] | None:
    """A ``preexec_fn`` that has the child get SIGKILL when the test process dies, however it dies.

    Without it a test run killed hard (``os._exit`` from a timeout, SIGKILL) would leave the
    server running: it is in its own session and never sees the terminal's signals. The libc
    function is looked up here, in the parent, so that the forked child runs no Python code but
    one foreign call (``preexec_fn`` is unsafe when it imports or takes locks). Linux only.
    """
    if not sys.platform.startswith("linux"):
        return None
    pr_set_pdeathsig = 1
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return functools.partial(prctl, pr_set_pdeathsig, int(signal.SIGKILL))


class LoopbackServer:
    """One server process on loopback, for tests; use as a context manager or start/stop."""

    #: what the server is called in messages, and its error type (a RuntimeError)
    label: ClassVar[str] = "server"
    error: ClassVar[type[RuntimeError]] = RuntimeError
    #: the temporary directory's prefix and the log's name inside it
    prefix: ClassVar[str] = "server-"
    log_name: ClassVar[str] = "server.log"
    #: log text that says a port was taken before the server bound it (lower case)
    port_taken: ClassVar[Sequence[str]] = ("address already in use", "eaddrinuse")

    def __init__(self, *, startup_timeout: float, port_attempts: int, stop_timeout: float = 0.0) -> None:
        if startup_timeout <= 0 or stop_timeout < 0 or port_attempts < 1:
            raise ValueError("timeouts must be positive and port_attempts >= 1")
        self.startup_timeout = startup_timeout
        self.port_attempts = port_attempts
        #: how long SIGTERM gets before SIGKILL (0: SIGKILL at once, an emulator has nothing to flush)
        self.stop_timeout = stop_timeout
        self.root: str | None = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # -- what each server says -------------------------------------------------------------------
    def _pick_ports(self) -> None:
        """Choose free ports for a first start (kept for a restart)."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Fill the fresh temporary directory (data, configuration) before the first start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        """The server's environment (None: this process's)."""
        return None

    def _probe(self) -> bool:
        """True once the server works end to end; an error of :meth:`_not_ready` means "not yet"."""
        raise NotImplementedError

    def _not_ready(self) -> tuple[type[BaseException], ...]:
        return (Exception,)

    def _after_kill(self) -> None:
        """Clean up what the process leaves outside its directory."""

    # -- shared ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The server's process id, which is also its process-group id."""
        if self._process is None:
            raise self.error("the server was never started")
        return self._process.pid

    @property
    def log_path(self) -> str:
        """The file that receives the server's stdout and stderr."""
        return os.path.join(self._require_root(), self.log_name)

    def start(self) -> Self:
        """Start the server and wait until its probe passes; return ``self``.

        Raises :attr:`error` with the log tail if it is not ready within ``startup_timeout`` or
        exits early. After :meth:`kill` this restarts on the same ports and directory.
        """
        if self.running:
            raise self.error("the server is already running")
        restart = self.root is not None
        if not restart:
            self.root = tempfile.mkdtemp(prefix=self.prefix)
            self._prepare()
        began = time.monotonic()
        for attempt in range(1, self.port_attempts + 1):
            if not restart:
                self._pick_ports()
            self._spawn()
            try:
                self._wait_ready(began + self.startup_timeout)
            except self.error:
                taken = any(mark in self.log_tail().lower() for mark in self.port_taken)
                self.kill()
                if taken and not restart and attempt < self.port_attempts:
                    continue  # another process took a port between choosing and binding: new ports
                if not restart:
                    self.stop()  # a first start leaves nothing behind; the error holds the log
                raise
            self.startup_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def kill(self, *, hard: bool = False) -> None:
        """Stop the process group, keeping ports and data for a restart.

        SIGTERM first and SIGKILL after ``stop_timeout``; ``hard=True`` (or a zero
        ``stop_timeout``) sends SIGKILL at once, a crash with no chance to finish requests.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if not hard and self.stop_timeout > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=self.stop_timeout)
        # SIGKILL the group even when the leader exited: anything it forked must go too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self._after_kill()

    def restart(self) -> Self:
        """Kill the server and start it again on the same ports and directory."""
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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log, for error messages."""
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

    def _require_root(self) -> str:
        if self.root is None:
            raise self.error("the server was never started or is already stopped")
        return self.root

    def _spawn(self) -> None:
        root = self._require_root()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                env=self._env(), start_new_session=True,
                preexec_fn=die_with_parent(),  # noqa: PLW1509 - one foreign call, see there
            )

    def _wait_ready(self, deadline: float) -> None:
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.running:
                code = None if self._process is None else self._process.poll()
                raise self.error(f"{self.label} exited early (code {code}):\n{self.log_tail()}")
            try:
                if self._probe():
                    return
            except self._not_ready() as exc:
                last = exc
            time.sleep(0.1)
        raise self.error(f"{self.label} not ready after {self.startup_timeout:.0f} s (last error: {last!r}):\n"
                         f"{self.log_tail()}")


class Emulator(LoopbackServer):
    """An emulator on one port with its data in ``<root>/data`` (fake-gcs-server, Azurite)."""

    #: the message when no binary is found (what to install)
    missing: ClassVar[str] = "no server binary"

    def __init__(self, binary: str | None, *, startup_timeout: float, port_attempts: int) -> None:
        if binary is None:
            raise self.error(self.missing)
        super().__init__(startup_timeout=startup_timeout, port_attempts=port_attempts)
        self.binary = binary
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        if self.port is None:
            raise self.error("the server was never started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> str:
        return os.path.join(self._require_root(), "data")

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _prepare(self) -> None:
        os.makedirs(self.data_dir)

    def _probe(self) -> bool:
        # the SDKs back off for seconds on a refused connection: wait for the port first
        return port_open(self.port) and self._round_trip()

    def _round_trip(self) -> bool:
        """True once an object can be written and read back (and whatever else must hold)."""
        raise NotImplementedError
