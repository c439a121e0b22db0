"""The client session core: everything a client knows, with no I/O of its own.

Both shells (:mod:`portlease.client.sync` and :mod:`portlease.client.aio`)
drive one :class:`Session` per connection. The session owns the request ids,
the map of requests awaiting their replies, the leases held on the connection,
the queue of leases lost across a broker restart, the one place where an error
reply becomes an exception, the reconnect backoff and the reclaim plan. It
never touches a socket, a thread, an event loop or a clock: the shells hand it
the lines they read and the time it is, and write the bytes it returns.

A new connection costs one round trip: the first write on it carries ``hello``,
a ``reclaim`` for every lease held (after a broker restart) and the caller's
request, pipelined; the broker answers them in order.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

from . import protocol as p
from .grant import Lease, LostCallback, report_lost
from .protocol.errors import ConnectionLost, LeaseError, LeaseLost, UnsafeSocket, error_class

T = TypeVar("T")

RECONNECT_FIRST_DELAY = 0.02
"""First pause before retrying a broker that went away."""
RECONNECT_MAX_DELAY = 0.1
"""Longest pause between attempts to reach a restarting broker. A refused
connect on a Unix socket costs microseconds, and every pause is time the
leases spend as orphans, so the clients keep knocking often."""
SETTLE_MAX = 5.0
"""Longest a closing connection waits for the replies that may carry a grant
nobody waits for any more (see :attr:`Session.unsettled`); a broker that is
stopped must not hold up the caller's cancellation for longer."""


def default_note() -> str | None:
    """What identifies the caller to an operator: runner and job when CI sets them."""
    parts = []
    for var in ("RUNNER_NAME", "GITHUB_JOB"):
        value = os.environ.get(var)
        if value:
            parts.append(f"{var.lower()}={value}")
    return " ".join(parts) or None


def error_from_reply(reply: p.Error) -> LeaseError:
    """The exception an error reply stands for; the one place that builds it."""
    return error_class(reply.code)(reply.message, largest=reply.largest)


def _token(lease: Lease | str) -> str:
    return lease if isinstance(lease, str) else lease.token


# Plain classes with __slots__ rather than dataclasses: importing dataclasses
# (and inspect behind it) costs the CLI about 8 ms of its start-up, and this
# module is on every client's import path (bench/cli_start.py).
class Call(Generic[T]):
    """One request and what to make of its reply.

    A shell sends :attr:`request` (through :meth:`Session.send`), waits until
    :attr:`reply` or :attr:`error` is set, then calls :meth:`result`.
    :attr:`waiter` is the shell's own (an event, say); the session never reads it.
    """

    __slots__ = ("abandoned", "error", "expect", "finish", "not_found_ok", "reply", "request", "waiter")

    def __init__(self, request: p.Request, finish: Callable[[Any], T], expect: type[p.Reply], *,
                 not_found_ok: bool = False, abandoned: bool = False) -> None:
        self.request = request
        self.finish = finish
        self.expect = expect
        self.reply: p.AnyReply | None = None
        self.error: BaseException | None = None
        self.not_found_ok = not_found_ok
        self.abandoned = abandoned
        self.waiter: Any = None

    @property
    def done(self) -> bool:
        """A reply or an error is in: :meth:`result` no longer waits on anything."""
        return self.reply is not None or self.error is not None

    def result(self) -> T:
        """The call's value; raises the broker's refusal or the connection's loss."""
        if self.error is not None:
            raise self.error
        reply = self.reply
        if isinstance(reply, p.Error):
            if self.not_found_ok and reply.code is p.ErrorCode.NOT_FOUND:
                return self.finish(None)
            raise error_from_reply(reply)
        if not isinstance(reply, self.expect):
            raise ConnectionLost(f"unexpected reply {reply!r}")
        return self.finish(reply)


class Backoff:
    """When to try a vanished broker again, and when to stop trying.

    The deadline is the longest TTL of the leases at stake (the broker keeps
    orphans that long, so trying later is pointless), and at least the
    connection's timeout.
    """

    __slots__ = ("deadline", "delay")

    def __init__(self, now: float, span: float) -> None:
        self.deadline = now + span
        self.delay = RECONNECT_FIRST_DELAY

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next attempt, or None once the deadline passed."""
        if now >= self.deadline:
            return None
        delay = min(self.delay, self.deadline - now)
        self.delay = min(self.delay * 2, RECONNECT_MAX_DELAY)
        return delay


class GiveUp:
    """A reconnect round's last step: stop trying and raise :attr:`error`.

    The leases at stake were reported lost (:meth:`Session.give_up`) before
    this step is returned.
    """

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Reconnect:
    """A round of reaching a vanished broker again: the one policy of every shell.

    A shell runs it as a short loop: connect (one attempt, no waiting: the
    round has its own schedule); on success install the socket and say hello
    (which carries the reclaims); on a failure ask :meth:`after_failure`,
    which answers the seconds to sleep before connecting again, or
    :class:`GiveUp`. The round lasts until a hello is answered on a new socket
    (the shell then drops it), so a broker that accepts and hangs up at once
    still meets the deadline.
    """

    __slots__ = ("_backoff", "_session")

    def __init__(self, session: Session, now: float) -> None:
        self._session = session
        self._backoff = session.reconnect_backoff(now)

    def after_failure(self, exc: BaseException, now: float) -> float | GiveUp:
        """Connecting, or saying hello, failed with ``exc``: seconds to sleep, or give up.

        An unsafe socket ends the round at once (trying it again will not make
        it safe); anything else is retried until the deadline.
        """
        if isinstance(exc, UnsafeSocket):
            self._session.give_up(str(exc))
            return GiveUp(exc)
        delay = self._backoff.next_delay(now)
        if delay is None:
            self._session.give_up(str(exc))
            return GiveUp(ConnectionLost(f"broker unreachable: {exc}"))
        return delay


class Retry:
    """Whether a request that met a dropped socket goes out again, for both shells.

    One more try is worth it, with ``reclaim`` on or when the request opened
    a new socket (``fresh``): an autostarted broker at its idle exit may close
    just as the request arrives, and a restarting broker drops what was in
    flight. After that only a fresh socket with ``reclaim`` on goes on, on the
    reconnect schedule: a new socket that drops before its hello is answered
    reached a broker on its way down (socket activation queues connections
    for one that is being replaced).

    A shell makes one when a call first meets a drop, so that the calls that
    never do pay nothing for it.
    """

    __slots__ = ("_backoff", "_reclaim", "_session", "_tried")

    def __init__(self, session: Session, *, reclaim: bool) -> None:
        self._session = session
        self._reclaim = reclaim
        self._backoff: Backoff | None = None
        self._tried = False

    def after_drop(self, *, fresh: bool, now: float) -> float | None:
        """Seconds to wait before sending again (0 for at once), or None to give up."""
        if not (self._reclaim or fresh):
            return None
        delay = 0.0
        if self._tried:
            if not (fresh and self._reclaim):
                return None
            self._backoff = self._backoff or self._session.reconnect_backoff(now)
            next_delay = self._backoff.next_delay(now)
            if next_delay is None:
                return None
            delay = next_delay
        self._tried = True
        return delay


class _Handshake:
    __slots__ = ("hello_id", "reclaims")

    def __init__(self, hello_id: p.RequestId) -> None:
        self.hello_id = hello_id
        self.reclaims: dict[p.RequestId, Lease] = {}


class Session:
    """State of one client connection across any number of sockets (reconnects).

    ``client`` is the name sent in ``hello``; ``on_lost`` is told of each lease
    that could not be kept; ``timeout`` bounds every wait and the reconnect
    deadline from below.
    """

    def __init__(
        self, client: str, *, on_lost: LostCallback | None = None, timeout: float = 30.0
    ) -> None:
        self.client = client
        self.timeout = timeout
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._pending: p.Outstanding[Call[Any]] = p.Outstanding()
        self._handshake: _Handshake | None = None
        self._hello_due = False
        self._framer = p.LineFramer(p.MAX_REPLY_LINE)
        self._undos: list[Call[Any]] = []
        self.leases: dict[str, Lease] = {}
        """Leases bound to the connection, by token: what a reconnect reclaims."""
        self.lost: deque[LeaseLost] = deque()
        self.broker_pid: int | None = None
        """Pid of the broker this session last said hello to."""
        self.welcomed = False
        """The broker answered ``hello`` on the current socket."""

    # ------------------------------------------------------------- connection

    def new_socket(self) -> None:
        """A fresh socket replaces whatever there was: its first write says hello."""
        self._framer.clear()
        self._hello_due = True
        self._handshake = None
        self.welcomed = False

    def connection_lost(self, why: str, *, retry: bool) -> list[Call[Any]]:
        """The socket is gone: fail every call in flight, and return those that were waited for.

        ``retry`` picks the exception: a :class:`Dropped` a shell may retry once
        on a new socket, or a plain :class:`ConnectionLost`.
        """
        self._framer.clear()
        self._handshake = None
        self.welcomed = False
        failed = []
        for call in self._pending.clear():
            if call.abandoned:
                # Nobody waits for it. What the broker granted on this socket
                # ends with it; a detached grant the shell did not settle
                # (:attr:`unsettled`) lives until its TTL.
                continue
            call.error = (Dropped if retry else ConnectionLost)(f"connection to the broker lost: {why}")
            failed.append(call)
        return failed

    @property
    def pending(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    def reconnect_backoff(self, now: float) -> Backoff:
        """The retry schedule for reaching the broker again, starting ``now``."""
        return Backoff(now, max([held.ttl for held in self.leases.values()] + [self.timeout]))

    def give_up(self, why: str) -> None:
        """The broker stayed away past the deadline: every held lease is lost."""
        for held in list(self.leases.values()):
            self._lose(held, f"broker unreachable until the TTL lapsed: {why}")

    # ------------------------------------------------------------- sending

    def send(self, *calls: Call[Any]) -> bytes:
        """Register ``calls`` and return the bytes to write, in one write.

        On a socket's first write this is ``hello`` + a ``reclaim`` per held
        lease + the calls: one round trip however many there are.
        """
        requests: list[p.Request] = []
        if self._hello_due:
            self._hello_due = False
            hello = p.Hello(id=next(self._ids), version=p.PROTOCOL_VERSION, client=self.client)
            hs = _Handshake(hello.id)
            requests.append(hello)
            for held in self.leases.values():
                reclaim = p.Reclaim(id=next(self._ids), token=held.token)
                hs.reclaims[reclaim.id] = held
                requests.append(reclaim)
            self._handshake = hs
        for call in calls:
            call.request.id = next(self._ids)
            self._pending.sent(call.request.id, call)
            requests.append(call.request)
        return b"".join(p.encode(r) for r in requests)

    @property
    def hello_due(self) -> bool:
        """The next write opens the conversation (a socket that never said hello)."""
        return self._hello_due

    # ------------------------------------------------------------- receiving

    def feed(self, data: bytes) -> None:
        """Bytes read from the socket."""
        self._framer.feed(data)

    def next_event(self) -> Call[Any] | bool | None:
        """Handle the next complete reply line.

        Returns the :class:`Call` it completed, ``True`` when a line was
        consumed without completing a waited-for call (hello, reclaim, an
        abandoned call), or ``None`` when no whole line is buffered. Raises the
        broker's refusal of ``hello`` (the socket is then useless), and
        :class:`ConnectionLost` on a line too long to be a reply.
        """
        try:
            line = self._framer.next_line()
        except p.LineTooLongError as exc:
            raise ConnectionLost(f"the broker sent a line too long: {exc}") from None
        if line is None:
            return None
        return self.receive(line)

    def receive(self, line: bytes) -> Call[Any] | bool:
        """Handle one reply line; see :meth:`next_event`."""
        try:
            reply = p.decode_reply(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return True  # not ours to interpret; the protocol has no unsolicited messages
        hs = self._handshake
        if hs is not None and reply.id is not None:
            if reply.id == hs.hello_id:
                return self._welcome(reply)
            held = hs.reclaims.pop(reply.id, None)
            if held is not None:
                if isinstance(reply, p.Error) and held.token in self.leases:
                    self._lose(held, f"reclaim refused: {reply.code.value}: {reply.message}")
                return True
        # The handshake is matched above by id (its lines are ours, always
        # readable): an id-null error, the broker's refusal of a line or of the
        # connection itself, goes to the oldest call (protocol.conversation).
        call = self._pending.answer(reply)
        if call is None:
            return True
        call.reply = reply
        if call.abandoned:
            self._undo(call)
            return True
        return call

    def _welcome(self, reply: p.AnyReply) -> bool:
        if isinstance(reply, p.Error):
            raise error_from_reply(reply)
        if not isinstance(reply, p.Welcome):
            raise ConnectionLost(f"unexpected reply to hello: {reply!r}")
        self.broker_pid = reply.pid
        self.welcomed = True
        return True

    # ------------------------------------------------------------- cancellation

    def abandon(self, call: Call[Any]) -> None:
        """Nobody waits for ``call`` any more (cancelled, timed out).

        Whatever the broker grants it is given back: at once if its reply is
        already in, else when the reply arrives (see :meth:`data_to_send`).
        """
        if call.reply is not None:
            self._undo(call)
        elif call.error is None:
            call.abandoned = True

    def _undo(self, call: Call[Any]) -> None:
        reply, request = call.reply, call.request
        undo: p.Request
        if isinstance(reply, p.Granted):
            undo = p.Release(id=0, token=reply.token)
        elif isinstance(reply, p.Reclaimed) and isinstance(request, p.Reclaim):
            # Put it back the way it was: living by its TTL, reclaimable again.
            undo = p.Detach(id=0, token=request.token)
            self.leases.pop(request.token, None)
        else:
            return
        self._undos.append(Call(undo, _ignore, p.Reply, abandoned=True))

    @property
    def unsettled(self) -> bool:
        """Closing the socket now could strand something nobody will hear of.

        True while a request nobody waits for any more is unanswered and its
        effect would outlive the socket (a detached lease, a reclaim, a
        release or detach), or while undoing an abandoned grant is yet to be
        sent or answered. A shell about to close the socket on purpose first
        reads replies and sends :meth:`data_to_send` until this turns False
        (for at most :data:`SETTLE_MAX` seconds): connection-bound grants end
        with the socket anyway, a detached one would be held until its TTL.
        """
        return bool(self._undos) or any(
            call.abandoned and _outlives_socket(call.request) for call in self._pending
        )

    @property
    def has_data_to_send(self) -> bool:
        """Whether :meth:`data_to_send` has something."""
        return bool(self._undos)

    def data_to_send(self) -> bytes:
        """Requests the session itself wants sent (undoing abandoned grants); may be empty."""
        undos = self._undos
        if not undos:
            return b""
        calls, undos[:] = list(undos), []
        return self.send(*calls)

    # ------------------------------------------------------------- operations

    def raise_lost(self) -> None:
        """Raise the oldest lease lost across a restart and not yet acknowledged."""
        if self.lost:
            raise self.lost.popleft()

    def lease(
        self, count: int = 1, *, ttl: float | None = None, note: str | None = None,
        detach: bool = False,
    ) -> Call[Lease]:
        """A ``lease`` call; raises a pending :class:`LeaseLost` first."""
        self.raise_lost()

        def finish(reply: p.Granted) -> Lease:
            held = Lease(tuple(reply.ports), reply.token, reply.ttl, reply.expires)
            if not detach:
                self.leases[held.token] = held
            return held

        request = p.Lease(id=0, count=count, ttl=ttl, detach=detach,
                          note=note if note is not None else default_note())
        return Call(request, finish, p.Granted)

    def release(self, lease: Lease | str) -> Call[None] | None:
        """A ``release`` call, or None when there is nothing to send.

        Releasing a lost lease only acknowledges the loss (the broker no longer
        knows its token), so the next :meth:`lease` won't raise it. Releasing
        twice is not an error, unless a bare token was never ours.
        """
        token = _token(lease)
        if isinstance(lease, Lease) and lease.lost is not None:
            if lease.lost in self.lost:
                self.lost.remove(lease.lost)
            lease.end()
            return None
        # Forgotten first: a reconnect meanwhile must not reclaim it.
        held = self.leases.pop(token, None)

        def finish(reply: p.Released | None) -> None:
            for obj in (held, lease):
                if isinstance(obj, Lease):
                    obj.end()

        return Call(p.Release(id=0, token=token), finish, p.Released,
                    not_found_ok=held is not None or isinstance(lease, Lease))

    def renew(self, lease: Lease | str) -> Call[float | None]:
        """A ``renew`` call: pushes a detached lease's expiry forward."""

        def finish(reply: p.Renewed) -> float | None:
            if isinstance(lease, Lease):
                lease.expires = reply.expires
            return reply.expires

        return Call(p.Renew(id=0, token=_token(lease)), finish, p.Renewed)

    def detach(self, lease: Lease | str) -> Call[float]:
        """A ``detach`` call: the lease then lives by its TTL alone."""
        token = _token(lease)

        def finish(reply: p.Detached) -> float:
            self.leases.pop(token, None)
            if isinstance(lease, Lease):
                lease.expires = reply.expires
            return reply.expires

        return Call(p.Detach(id=0, token=token), finish, p.Detached)

    def reclaim(self, token: str) -> Call[Lease]:
        """A ``reclaim`` call: binds a detached or orphaned lease to this connection."""

        def finish(reply: p.Reclaimed) -> Lease:
            held = Lease(tuple(reply.ports), token, 0.0, None)
            self.leases[token] = held
            return held

        return Call(p.Reclaim(id=0, token=token), finish, p.Reclaimed)

    def status(self, **query: Any) -> Call[p.StatusReply]:
        """A ``status`` call (``uid``, ``after``, ``limit`` as in the protocol)."""
        return Call(p.Status(id=0, **query), _same, p.StatusReply)

    def ping(self) -> Call[None]:
        """A ``ping`` call."""
        return Call(p.Ping(id=0), _ignore, p.Pong)

    def metrics(self) -> Call[str]:
        """A ``metrics`` call: the broker's metrics in the OpenMetrics text format."""
        return Call(p.Metrics(id=0), _metrics_text, p.MetricsReply)

    def close(self) -> None:
        """The connection is closed for good: every bound lease ended with it."""
        ended = list(self.leases.values())
        self.leases.clear()
        for held in ended:
            held.end()
        self._pending.clear()

    def _lose(self, lease: Lease, why: str) -> None:
        self.leases.pop(lease.token, None)
        self.lost.append(report_lost(lease, why, self._on_lost))


class Dropped(ConnectionLost):
    """The socket went away with the request in flight: worth one retry on a new one."""


def _outlives_socket(request: p.Request) -> bool:
    if isinstance(request, p.Lease):
        return request.detach
    return isinstance(request, (p.Release, p.Detach, p.Reclaim))


def _ignore(reply: Any) -> None:
    return None


def _metrics_text(reply: p.MetricsReply) -> str:
    return reply.text


def _same(reply: T) -> T:
    return reply
