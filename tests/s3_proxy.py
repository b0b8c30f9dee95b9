"""A loopback HTTP proxy in front of an S3 server that injects the failures object stores really send.

:class:`FaultyProxy` listens on a free 127.0.0.1 port and forwards every request to ``upstream``
(one request per connection: it answers ``Connection: close``). ``faults(n, method, path)`` decides
what the ``n``-th request (1-based, counted over all connections) meets instead:

* ``"503"``: ``503 SlowDown`` (S3's throttling answer), after the whole request body was read,
  so the client has consumed the body it must resend;
* ``"500"``: ``500 InternalError``, likewise;
* ``"503-early"``: ``503 SlowDown`` before the body is read (S3's answer to ``Expect: 100-continue``
  when it throttles): the client may have sent part of it;
* ``"reset"``: the connection is reset (RST) half-way through reading the body;
* ``None``: forwarded untouched.

``requests`` records ``(method, path, fault)`` of every request, so a test can show that the
failures really happened. Stopped by :meth:`stop` (or as a context manager).
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = ["FaultyProxy", "every"]

Faults = Callable[[int, str, str], "str | None"]

_ERRORS = {
    "503": (b"503 Slow Down", b"SlowDown", b"Please reduce your request rate."),
    "500": (b"500 Internal Server Error", b"InternalError", b"We encountered an internal error. Please try again."),
}


def every(n: int, fault: str, methods: tuple[str, ...] = ("PUT", "POST")) -> Faults:
    """Fault every ``n``-th request whose method is one of ``methods`` (writes, by default)."""
    seen = [0]
    lock = threading.Lock()

    def decide(_: int, method: str, path: str) -> str | None:
        if method not in methods:
            return None
        with lock:
            seen[0] += 1
            return fault if seen[0] % n == 0 else None

    return decide


class FaultyProxy:
    def __init__(self, upstream: str, faults: Faults) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults = faults
        self.requests: list[tuple[str, str, str | None]] = []
        self._count = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def storage_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` (for the upstream server) pointed at this proxy instead."""
        client = {**options.get("client_kwargs", {}), "endpoint_url": self.endpoint_url}
        return {**options, "client_kwargs": client}

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def faulted(self, fault: str) -> int:
        return sum(1 for *_, f in self.requests if f is not None and f.startswith(fault))

    # -- one request ----------------------------------------------------------------------------

    def _handle(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = reader.readline(65536)
            if not line:
                return
            head += line
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = [h for h in header_lines if h]
        lower = {h.split(":", 1)[0].strip().lower(): h.split(":", 1)[1].strip() for h in headers}
        with self._lock:
            self._count += 1
            number = self._count
        fault = self.faults(number, method, path)
        self.requests.append((method, path, fault))
        early = fault == "503-early"  # answered before the body, as S3 answers an Expect: 100-continue
        if early:
            fault = "503"
        elif lower.get("expect", "").lower() == "100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        length = int(lower.get("content-length", "0") or 0)
        chunked = "chunked" in lower.get("transfer-encoding", "").lower()
        if fault == "reset":
            if length:
                reader.read(length // 2)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        body = b"" if early else _read_chunked(reader) if chunked else reader.read(length)
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            xml = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>" + code + b"</Code><Message>" + message + \
                  b"</Message><RequestId>proxy</RequestId></Error>"
            client.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\nContent-Length: " +
                           str(len(xml)).encode() + b"\r\nConnection: close\r\n\r\n" + xml)
            client.close()
            return
        forwarded = [h for h in headers if h.split(":", 1)[0].strip().lower() not in ("expect", "connection")]
        out = (request_line + "\r\n" + "\r\n".join([*forwarded, "Connection: close"]) + "\r\n\r\n").encode("latin-1")
        with socket.create_connection(self.upstream, timeout=60) as upstream:
            upstream.sendall(out + body)
            while data := upstream.recv(1 << 16):
                client.sendall(data)
        client.close()


def _read_chunked(reader: Any) -> bytes:
    """The raw bytes of a chunked body, exactly as sent (forwarded as they are)."""
    raw = b""
    while True:
        line = reader.readline(65536)
        raw += line
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = reader.readline(65536)
                raw += trailer
                if trailer in (b"\r\n", b"\n", b""):
                    return raw
        raw += reader.read(size + 2)
