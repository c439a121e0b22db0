"""A bare protocol connection: JSON lines over the Unix socket, for the tests and the benches.

Both speak the wire protocol directly, not through portlease.client, so that what
they measure or provoke is the broker, not the client library. This is the one
such helper: ``tests/brokerproc.py`` re-exports it.
"""

from __future__ import annotations

import json
import socket
from typing import Any


class Closed(ConnectionError, EOFError):
    """The broker closed the connection (a ``ConnectionError`` and an ``EOFError``)."""


class Raw:
    """One connection; with ``hello`` the hello exchange is made (and checked) first."""

    def __init__(self, path: str, timeout: float = 10.0, *, hello: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buf = b""
        self.n = 0
        if hello:
            reply = self.call({"op": "hello", "version": 1})
            if reply.get("reply") != "hello":
                self.sock.close()
                raise ConnectionError(f"hello refused: {reply}")

    def send(self, data: bytes) -> None:
        """Write raw bytes (lines, or anything else)."""
        self.sock.sendall(data)

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request (the next id) and return its reply, or an error the broker
        could not tie to a request (``"id": null``)."""
        self.n += 1
        self.send(json.dumps({"id": self.n, **msg}).encode() + b"\n")
        while True:
            reply = self.line()
            if reply.get("id") in (self.n, None):
                return reply

    def line(self) -> dict[str, Any]:
        """The next reply line, decoded."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 22)
            if not chunk:
                raise Closed(f"the broker closed the connection; pending {self.buf[:200]!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    def closed_by_peer(self) -> bool:
        """Whether the broker has closed the connection (reads one byte)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
