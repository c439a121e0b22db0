"""The portlease wire protocol's messages: one JSON object per line over a Unix stream socket.

This module is the single definition of every message, shared by the broker and
every client. It depends on msgspec only, so that the sync client, the CLI
wrapper and the pytest plugin stay light.

Requests carry ``op`` as their tag and replies carry ``reply``; both carry the
request's ``id``. See ``docs/protocol.md`` for examples and a socat transcript.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from .bounds import MAX_COUNT, MAX_NOTE, MAX_STATUS_LEASES, MAX_TOKEN, MAX_TTL, MIN_TTL
from .codes import ErrorCode

RequestId = int | str
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
Seconds = Annotated[float, msgspec.Meta(ge=MIN_TTL, le=MAX_TTL)]
Note = Annotated[str, msgspec.Meta(max_length=MAX_NOTE)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOKEN)]


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


def to_builtins(message: Any) -> Any:
    """Plain dicts/lists for printing (``--json`` output)."""
    return msgspec.to_builtins(message)
