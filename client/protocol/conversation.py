"""The conversation rules: in what order lines may go each way, for the broker and every client.

The messages say *what* is sent; these rules say *when*, and both sides
implement them from here rather than each by hand:

1. **Hello first.** A connection opens with ``hello``. The broker answers any
   other request that arrives before a successful ``hello`` with a
   ``hello-required`` error (:func:`hello_gate`), and a ``hello`` of another
   protocol version with a ``version`` error; a client writes ``hello`` as the
   first line of every new socket.
2. **Replies in request order.** The broker answers the lines of one
   connection one at a time, in the order they arrived, each with exactly one
   reply (blank lines are skipped, not answered). A client may pipeline any
   number of requests and match the replies by id; :class:`Outstanding` keeps
   them in the order they were sent.
3. **A line too long ends the conversation.** A request line longer than
   ``MAX_LINE`` cannot be resynchronised after: the broker answers it with
   :func:`line_too_long` (``id: null``) and closes the connection.
4. **An error with ``id: null`` answers the oldest outstanding request.** The
   broker echoes the id of every line it can read; when it cannot read one
   (not JSON, too long), or refuses the connection before reading anything,
   it answers with ``id: null``. By rule 2 that is the reply to the oldest
   request still unanswered (:meth:`Outstanding.answer`).

The broker's own admission rules (how many connections a uid may hold) are
:meth:`portlease.broker.core.BrokerCore.opened`'s: they are the broker's
limits, not the protocol's.

Pure: no sockets, clock or threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from .bounds import MAX_LINE, PROTOCOL_VERSION
from .codes import ErrorCode
from .messages import AnyReply, Error, Hello, Request, RequestId

T = TypeVar("T")

HELLO_REQUIRED_MESSAGE = f'send {{"op":"hello","id":0,"version":{PROTOCOL_VERSION}}} first'
"""The text of the ``hello-required`` error: it shows the line to send."""


def hello_gate(said_hello: bool, request: Request) -> Error | None:
    """The broker's rule 1: the error that refuses ``request``, or None when it may be carried out.

    ``said_hello``: a ``hello`` was welcomed on this connection before. A
    ``hello`` itself is refused only for its version (it may be repeated); any
    other request is refused until one was welcomed.
    """
    if isinstance(request, Hello):
        if request.version != PROTOCOL_VERSION:
            return Error(
                id=request.id, code=ErrorCode.VERSION,
                message=f"protocol version {request.version} is not spoken here; "
                f"this broker speaks version {PROTOCOL_VERSION}",
            )
        return None
    if not said_hello:
        return Error(id=request.id, code=ErrorCode.HELLO_REQUIRED, message=HELLO_REQUIRED_MESSAGE)
    return None


def line_too_long() -> Error:
    """The broker's rule 3: the reply to a line over ``MAX_LINE``; the connection closes after it."""
    return Error(id=None, code=ErrorCode.LINE_TOO_LONG,
                 message=f"line longer than {MAX_LINE} bytes; closing the connection")


class Outstanding(Generic[T]):
    """A client's requests sent and not yet answered, oldest first (rules 2 and 3).

    Each request id maps to what the client keeps about it (a call, say).
    """

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        # dicts keep insertion order: the first key is the oldest request.
        self._by_id: dict[RequestId, T] = {}

    def sent(self, request_id: RequestId, item: T) -> None:
        """``request_id`` went out, after every request already outstanding."""
        if request_id in self._by_id:
            raise ValueError(f"request id {request_id!r} is already outstanding")
        self._by_id[request_id] = item

    def answer(self, reply: AnyReply) -> T | None:
        """Take out and return the request ``reply`` answers, or None when it answers none of ours.

        A reply answers the request with its id; an :class:`Error` with a null
        id answers the oldest one (rule 3).
        """
        if reply.id is not None:
            return self._by_id.pop(reply.id, None)
        if isinstance(reply, Error) and self._by_id:
            return self._by_id.pop(next(iter(self._by_id)))
        return None

    def oldest(self) -> T | None:
        """The request an ``id: null`` error would answer now, if any."""
        return next(iter(self._by_id.values()), None)

    def clear(self) -> list[T]:
        """The socket is gone: no reply will come. Returns what was outstanding, oldest first."""
        items, self._by_id = list(self._by_id.values()), {}
        return items

    def __len__(self) -> int:
        return len(self._by_id)

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def __iter__(self) -> Iterator[T]:
        """What is outstanding, oldest first."""
        return iter(list(self._by_id.values()))


__all__ = ["HELLO_REQUIRED_MESSAGE", "Outstanding", "hello_gate"]
