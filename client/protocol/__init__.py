"""The protocol layer: what the broker and every client agree on, and nothing else.

- :mod:`.bounds`: every bound as a named constant;
- :mod:`.codes`: every error code, in one enum;
- :mod:`.errors`: every exception, one per error code plus the client's own;
- :mod:`.messages`: every request and reply (msgspec structs, tagged unions);
- :mod:`.framing`: the one line framer;
- :mod:`.conversation`: the conversation rules (hello first, replies in
  request order, an ``id: null`` error answers the oldest request);

It imports msgspec and the standard library only, and nothing of
:mod:`portlease.client` or :mod:`portlease.broker`: both import it.
``from portlease.client import protocol as p`` gives every name below.
"""

from __future__ import annotations

from .bounds import (
    DEFAULT_PORTS_PER_REQUEST,
    MAX_COUNT,
    MAX_LINE,
    MAX_NOTE,
    MAX_REPLY_LINE,
    MAX_STATUS_LEASES,
    MAX_TOKEN,
    MAX_TTL,
    MIN_TTL,
    PROTOCOL_VERSION,
    STATUS_TEXT_MAX,
    TOKEN_BYTES,
)
from .codes import (
    ErrorCode,
)
from .conversation import (
    HELLO_REQUIRED_MESSAGE,
    Outstanding,
    hello_gate,
    line_too_long,
)
from .framing import (
    LineFramer,
    LineTooLongError,
)
from .messages import (
    AnyReply,
    AnyRequest,
    Count,
    Detach,
    Detached,
    Error,
    Granted,
    Hello,
    Lease,
    LeaseInfo,
    Metrics,
    MetricsReply,
    Note,
    Ping,
    Pong,
    Reclaim,
    Reclaimed,
    Release,
    Released,
    Renew,
    Renewed,
    Reply,
    Request,
    RequestId,
    Seconds,
    Status,
    StatusReply,
    Summary,
    Token,
    Welcome,
    decode_reply,
    decode_request,
    encode,
    error_for_bad_line,
    to_builtins,
)

__all__ = [
    "DEFAULT_PORTS_PER_REQUEST",
    "HELLO_REQUIRED_MESSAGE",
    "MAX_COUNT",
    "MAX_LINE",
    "MAX_NOTE",
    "MAX_REPLY_LINE",
    "MAX_STATUS_LEASES",
    "MAX_TOKEN",
    "MAX_TTL",
    "MIN_TTL",
    "PROTOCOL_VERSION",
    "STATUS_TEXT_MAX",
    "TOKEN_BYTES",
    "AnyReply",
    "AnyRequest",
    "Count",
    "Detach",
    "Detached",
    "Error",
    "ErrorCode",
    "Granted",
    "Hello",
    "Lease",
    "LeaseInfo",
    "LineFramer",
    "LineTooLongError",
    "Metrics",
    "MetricsReply",
    "Note",
    "Outstanding",
    "Ping",
    "Pong",
    "Reclaim",
    "Reclaimed",
    "Release",
    "Released",
    "Renew",
    "Renewed",
    "Reply",
    "Request",
    "RequestId",
    "Seconds",
    "Status",
    "StatusReply",
    "Summary",
    "Token",
    "Welcome",
    "decode_reply",
    "decode_request",
    "encode",
    "error_for_bad_line",
    "hello_gate",
    "line_too_long",
    "to_builtins",
]
