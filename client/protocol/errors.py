"""Every exception portlease raises, broker and clients alike.

One hierarchy: :class:`PortleaseError` at the root; :class:`LeaseError` for
anything the broker refused (one subclass per :class:`ErrorCode`, so callers can
``except Exhausted``); :class:`BrokerUnavailable` when no broker answers;
:class:`LeaseLost` when a lease could not be reclaimed after a broker restart.
The broker's own configuration and start-up errors are here too, at the end:
they never cross the wire, but the CLI reports them with the rest.
"""

from __future__ import annotations

from typing import ClassVar

from .codes import ErrorCode


class PortleaseError(Exception):
    """Root of every portlease exception."""


class LeaseError(PortleaseError):
    """The broker answered a request with an error reply.

    ``code`` is the stable :class:`ErrorCode`; ``largest`` is set for
    :class:`Exhausted` (the largest count that would have been granted).
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str, *, largest: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.largest = largest

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class BadRequest(LeaseError):
    code = ErrorCode.BAD_REQUEST


class UnknownOp(LeaseError):
    code = ErrorCode.UNKNOWN_OP


class VersionMismatch(LeaseError):
    code = ErrorCode.VERSION


class HelloRequired(LeaseError):
    code = ErrorCode.HELLO_REQUIRED


class LineTooLong(LeaseError):
    code = ErrorCode.LINE_TOO_LONG


class TooLarge(LeaseError):
    code = ErrorCode.TOO_LARGE


class Exhausted(LeaseError):
    code = ErrorCode.EXHAUSTED


class QuotaExceeded(LeaseError):
    code = ErrorCode.QUOTA


class NotFound(LeaseError):
    code = ErrorCode.NOT_FOUND


class InUse(LeaseError):
    code = ErrorCode.IN_USE


class Busy(LeaseError):
    code = ErrorCode.BUSY


class InternalError(LeaseError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[LeaseError]] = {
    cls.code: cls
    for cls in (
        BadRequest, UnknownOp, VersionMismatch, HelloRequired, LineTooLong, TooLarge,
        Exhausted, QuotaExceeded, NotFound, InUse, Busy, InternalError,
    )
}
assert set(_BY_CODE) == set(ErrorCode), "every ErrorCode needs its exception class"


def error_class(code: ErrorCode) -> type[LeaseError]:
    """The exception class that stands for ``code``."""
    return _BY_CODE[code]


class BrokerUnavailable(PortleaseError):
    """No broker answered at the socket path(s) tried.

    ``paths`` lists what was tried; the message says how to start a broker.
    """

    def __init__(self, message: str, *, paths: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.paths = paths


class UnsafeSocket(BrokerUnavailable):
    """The socket was refused before anything was sent: someone else could own it.

    Raised when a per-user socket's directory is not the caller's own (another
    owner, a symlink, writable by group or others), or when the process behind
    a socket runs as another user (``SO_PEERCRED``). The message names the path
    and what is wrong with it.
    """


class ConnectionLost(PortleaseError):
    """The connection to the broker closed while a request was in flight."""


class LeaseLost(PortleaseError):
    """A lease held across a broker restart could not be reclaimed.

    Its ports may now be granted to someone else: stop using them.
    """

    def __init__(self, message: str, *, ports: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ports = ports


class ConfigError(PortleaseError):
    """A configuration (file, flags, environment) or a command's arguments are invalid."""


class StartupError(PortleaseError):
    """The broker cannot start: socket or state already in use, an unsafe directory, a bad inherited fd, …"""


class AlreadyServing(StartupError):
    """Another broker already serves the socket: the autostart that lost a race uses that one."""

    EXIT_STATUS: ClassVar[int] = 75
    """``portlease serve``'s exit status for this case (EX_TEMPFAIL), read by the autostart."""
