"""The one line framer of the protocol, shared by the broker and both clients."""

from __future__ import annotations

from .bounds import MAX_LINE


class LineTooLongError(ValueError):
    """A line grew past the framer's limit without a newline."""


class LineFramer:
    """The one line framer of the protocol, for the broker and both clients.

    Feed it bytes as they arrive and take whole lines out. It remembers how far
    it has looked for a newline, so a reply that arrives in many pieces (a large
    ``status``) is scanned once, not once per piece.
    """

    __slots__ = ("_buf", "_limit", "_scanned")

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._scanned = 0
        self._limit = limit

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    def next_line(self) -> bytes | None:
        """The next complete line without its newline, or None until one has arrived.

        Raises :class:`LineTooLongError` once more than ``limit`` bytes are
        buffered with no newline among them (or a line longer than ``limit``
        has arrived); the stream cannot be resynchronised after that.
        """
        buf = self._buf
        nl = buf.find(b"\n", self._scanned)
        if nl < 0:
            self._scanned = len(buf)
            if len(buf) > self._limit:
                raise LineTooLongError(f"line longer than {self._limit} bytes")
            return None
        if nl > self._limit:
            raise LineTooLongError(f"line longer than {self._limit} bytes")
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        self._scanned = 0
        return line

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as lines."""
        return len(self._buf)

    def clear(self) -> None:
        """Forget everything buffered (the connection was replaced)."""
        self._buf.clear()
        self._scanned = 0
