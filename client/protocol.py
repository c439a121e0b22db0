"""The portlease wire protocol: one JSON object per line over a Unix stream socket.

This module is the single definition of every message, shared by the broker and
every client. It depends on msgspec only, so that the sync client, the CLI
wrapper and the pytest plugin stay light.

Requests carry ``op`` as their tag and replies carry ``reply``; both carry the
request's ``id``. See ``docs/protocol.md`` for examples and a socat transcript.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final

import msgspec

PROTOCOL_VERSION: Final = 1
"""The version a client names in ``hello``; the broker answers ``version`` to others."""

MAX_LINE: Final = 8192
"""Longest accepted request line in bytes, not counting the newline. The largest
valid request (a note of MAX_NOTE characters, every one escaped) fits well
within it; the bound is what a connection may make the broker buffer."""

MAX_REPLY_LINE: Final = 16 << 20
"""Longest reply line a client accepts (a ``status`` page is the largest reply)."""

RequestId = int | str
TOKEN_BYTES: Final = 16  # 128-bit lease tokens, sent as 32 hex digits

Count = Annotated[int, msgspec.Meta(ge=1, le=65535)]
MIN_TTL: Final = 1.0
"""Shortest TTL a lease may ask for: below a second a detached lease would lapse
between two renewals of any real client."""
MAX_TTL: Final = 86400.0
"""Longest TTL: a day at most, so a detached lease cannot squat on ports for months."""
Seconds = Annotated[float, msgspec.Meta(ge=MIN_TTL, le=MAX_TTL)]
MAX_NOTE: Final = 1024
Note = Annotated[str, msgspec.Meta(max_length=MAX_NOTE)]
MAX_STATUS_LEASES: Final = 1000
"""Most leases one ``status`` reply carries; ask again with ``after`` for the rest."""
STATUS_TEXT_MAX: Final = 256
"""Characters of a command line or note that ``status`` shows; longer ones are cut,
ending in an ellipsis."""
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class ErrorCode(enum.StrEnum):
    """Every error a broker can answer with. Stable: clients match on the value."""

    BAD_REQUEST = "bad-request"
    """The line is not JSON, not an object, or a field has the wrong type or value."""
    UNKNOWN_OP = "unknown-op"
    """The ``op`` field names no operation this broker knows."""
    VERSION = "version"
    """``hello`` named a protocol version this broker does not speak."""
    HELLO_REQUIRED = "hello-required"
    """An operation was sent before a successful ``hello``."""
    LINE_TOO_LONG = "line-too-long"
    """The line exceeded MAX_LINE bytes; the broker closes the connection after this."""
    TOO_LARGE = "too-large"
    """``count`` is above the per-request limit or larger than the whole port range."""
    EXHAUSTED = "exhausted"
    """No run of ``count`` free, bindable ports exists now; ``largest`` says what would fit."""
    QUOTA = "quota"
    """The caller's uid or connection already holds as much as the limits allow."""
    NOT_FOUND = "not-found"
    """No lease has this token (never granted, released, or expired)."""
    IN_USE = "in-use"
    """``reclaim`` of a lease that is still held by another live connection."""
    BUSY = "busy"
    """The broker is out of a resource (file descriptors) or stopping; try again."""
    INTERNAL = "internal"
    """A bug in the broker; the request was not carried out. Please report it."""


# ---------------------------------------------------------------- requests


class Request(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, omit_defaults=True):
    """Base of every request; ``id`` is echoed in the reply."""

    id: RequestId


class Hello(Request, tag="hello"):
    """First message on a connection: names the protocol version."""

    version: int
    client: Annotated[str, msgspec.Meta(max_length=256)] = ""


class Lease(Request, tag="lease"):
    """Ask for ``count`` consecutive ports.

    The lease is bound to this connection unless ``detach`` is true, in which
    case it lives for ``ttl`` seconds (default: the broker's TTL) and must be
    renewed or released by token.
    """

    count: Count = 1
    ttl: Seconds | None = None
    note: Note | None = None
    detach: bool = False


class Release(Request, tag="release"):
    """End a lease now; its ports become grantable again."""

    token: Token


class Renew(Request, tag="renew"):
    """Push a detached or orphaned lease's expiry to now + its TTL."""

    token: Token


class Detach(Request, tag="detach"):
    """Unbind a lease from this connection: it then expires after its TTL unless renewed."""

    token: Token


class Reclaim(Request, tag="reclaim"):
    """Bind a detached or orphaned lease (e.g. after a broker restart) to this connection."""

    token: Token


class Status(Request, tag="status"):
    """List leases (sorted by first port) and a summary of the port range.

    One reply carries at most ``limit`` leases (and never more than
    MAX_STATUS_LEASES); ``more`` in the reply says there are others: ask again
    with ``after`` set to the last port shown. ``uid`` shows only that uid's leases.
    """

    uid: Annotated[int, msgspec.Meta(ge=0)] | None = None
    after: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_STATUS_LEASES)] = MAX_STATUS_LEASES


class Metrics(Request, tag="metrics"):
    """The broker's metrics in the OpenMetrics text format."""


class Ping(Request, tag="ping"):
    """Liveness check; answered with ``pong``."""


AnyRequest = Hello | Lease | Release | Renew | Detach | Reclaim | Status | Metrics | Ping

# ---------------------------------------------------------------- replies


class Reply(msgspec.Struct, tag_field="reply", omit_defaults=True):
    """Base of every reply; ``id`` is the request's (null when it could not be read)."""

    id: RequestId | None


class Welcome(Reply, tag="hello"):
    """The answer to ``hello``: the broker's protocol version, name and pid."""

    version: int
    broker: str
    pid: int


class Granted(Reply, tag="granted"):
    """A new lease. ``expires`` is null while the lease is bound to its connection."""

    ports: list[int]
    token: str
    ttl: float
    expires: float | None = None


class Released(Reply, tag="released"):
    """The lease is gone; ``ports`` were its ports."""

    ports: list[int]


class Renewed(Reply, tag="renewed"):
    """The lease's new expiry (null while it is bound to a live connection)."""

    ports: list[int]
    expires: float | None = None


class Detached(Reply, tag="detached"):
    """The lease now lives by its TTL alone, until ``expires`` unless renewed."""

    ports: list[int]
    expires: float


class Reclaimed(Reply, tag="reclaimed"):
    """The lease is bound to this connection again."""

    ports: list[int]


class LeaseInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One lease as ``status`` shows it (never its token)."""

    ports: list[int]
    state: str  # "attached", "detached" or "orphaned"
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    cmdline: str | None = None
    note: str | None = None
    granted: float
    expires: float | None = None


class Summary(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The port range as ``status`` sees it, over every lease (not only those shown)."""

    range: tuple[int, int]
    leases: int
    ports_held: int
    ports_free: int
    largest_free_run: int
    clients: int
    ttl: float
    notice: str | None = None
    """Why part of the range is never granted (the kernel's ephemeral or reserved ports), if so."""


class StatusReply(Reply, tag="status"):
    """The answer to ``status``: a summary and one page of leases."""

    summary: Summary
    leases: list[LeaseInfo]
    more: bool = False
    """More leases follow the last one shown: ask again with ``after``."""


class MetricsReply(Reply, tag="metrics"):
    """The answer to ``metrics``."""

    text: str
    """OpenMetrics exposition, ending in ``# EOF``."""


class Pong(Reply, tag="pong"):
    """The answer to ``ping``."""


class Error(Reply, tag="error"):
    """A request failed; the connection stays usable unless ``code`` is line-too-long."""

    code: ErrorCode
    message: str
    largest: int | None = None
    """With ``exhausted``: the largest count that would be granted now."""


AnyReply = (
    Welcome | Granted | Released | Renewed | Detached | Reclaimed | StatusReply | MetricsReply | Pong | Error
)


class _IdOnly(msgspec.Struct):
    id: RequestId | None = None


_request_decoder: Final[msgspec.json.Decoder[AnyRequest]] = msgspec.json.Decoder(AnyRequest)
_reply_decoder: Final[msgspec.json.Decoder[AnyReply]] = msgspec.json.Decoder(AnyReply)
_id_decoder: Final = msgspec.json.Decoder(_IdOnly)
_encoder: Final = msgspec.json.Encoder()


def encode(message: Request | Reply) -> bytes:
    """Encode one message as a line, newline included."""
    out = _encoder.encode(message)
    return out + b"\n"


def decode_request(line: bytes) -> AnyRequest:
    """Decode one request line (without its newline).

    Raises ``msgspec.ValidationError`` or ``msgspec.DecodeError`` only; use
    :func:`error_for_bad_line` to turn that into an error reply.
    """
    try:
        return _request_decoder.decode(line)
    except UnicodeDecodeError as exc:
        # msgspec lets this one through for invalid UTF-8 inside some strings.
        raise msgspec.DecodeError(f"invalid UTF-8: {exc}") from None
    except RecursionError:
        raise msgspec.DecodeError("the request is nested too deeply") from None


def decode_reply(line: bytes) -> AnyReply:
    """Decode one reply line (without its newline); raises only msgspec's errors."""
    try:
        return _reply_decoder.decode(line)
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"invalid UTF-8: {exc}") from None


def error_for_bad_line(line: bytes, exc: Exception) -> Error:
    """The error reply for a line that did not decode, echoing its id when readable."""
    try:
        request_id = _id_decoder.decode(line).id
    except Exception:
        # Anything: not JSON, invalid UTF-8, nesting too deep for the decoder
        # (RecursionError). The reply then carries a null id.
        request_id = None
    if isinstance(exc, RecursionError):
        exc = msgspec.DecodeError("the request is nested too deeply")
    text = str(exc)
    code = ErrorCode.BAD_REQUEST
    if isinstance(exc, msgspec.ValidationError) and "Invalid value" in text and "$.op" in text:
        code = ErrorCode.UNKNOWN_OP
    return Error(id=request_id, code=code, message=f"cannot read request: {text}")


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


def to_builtins(message: Any) -> Any:
    """Plain dicts/lists for printing (``--json`` output)."""
    return msgspec.to_builtins(message)
