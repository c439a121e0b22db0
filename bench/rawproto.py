"""A bare protocol connection for the bench scripts: JSON lines over the Unix socket.

The benches speak the wire protocol directly (not through portlease.client) so
that what they measure or provoke is the broker, not the client library.
"""

from __future__ import annotations

import json
import socket
from typing import Any


class Raw:
    """One connection; ``hello`` sends (and checks) the hello exchange first."""

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

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its reply (or an error the broker could not tie to it)."""
        self.n += 1
        self.sock.sendall(json.dumps({"id": self.n, **msg}).encode() + b"\n")
        while True:
            reply = self.line()
            if reply.get("id") in (self.n, None):
                return reply

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 22)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        self.sock.close()
