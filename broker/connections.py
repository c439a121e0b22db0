"""Every client connection, driven from one trio task over one epoll set.

Why not trio's task per connection: a one-shot lease (connect, hello + lease,
release, close) is mostly per-connection set-up, and trio's ``serve_listeners``
spends several times what a plain epoll loop does per connection on this path
(a task, a stream, a cancel scope, wakeups through the run queue; the floors in
docs/performance.md measure both).
Ports are leased by the thousand in a test suite's first second, so that cost is
the product. Here each connection is a small object with a non-blocking socket,
and one task waits on an epoll fd (``trio.lowlevel.wait_readable``), then serves
whatever is ready. Everything else in the broker (signals, the tick, the
watchdog, the fedimint-portalloc share, a request that must wait on the share)
stays a trio task in the broker's nursery, so cancellation and shutdown are
still structured.

Fairness and bounded memory are rules of this loop, not of the clients, and
their unit is the **uid** (SO_PEERCRED), since one user may open many
connections:

- turns go round-robin between uids, then between the connections of a uid:
  each round, every uid with work gets one turn of at most ``LINES_PER_TURN``
  requests, ``BYTES_PER_TURN`` bytes of replies and ``TURN_SECONDS`` of the
  loop, spread over its connections in turn. A uid with a thousand connections
  gets one uid's share, not a thousand;
- a connection is read only at its turn and only when no reply of it waits to
  be written (backpressure), so pipelined requests cost one turn's replies at a
  time, never their sum;
- reply bytes not yet written are bounded per uid (``PENDING_PER_UID``) and in
  all (``PENDING_TOTAL``): a uid over its bound gets no turn, so nothing more of
  it is read or answered, until its clients read; while the total is over, only
  uids with nothing pending are served;
- a partial line is buffered up to ``protocol.MAX_LINE`` bytes, then refused.

A connection ends when the client closes it (both directions) or the broker can
no longer write to it. End of input alone (the client's ``shutdown(SHUT_WR)``)
is not the end: every request sent before it is answered, and the connection,
with its leases, stays until the client closes its side too (epoll's
``EPOLLHUP``), exactly as an open connection that sends nothing would.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from portlease.client import protocol as p

from . import kernel
from .core import Session

log = logging.getLogger("portlease.broker")

LINES_PER_TURN = 32
"""Requests one uid's turn answers at most."""
BYTES_PER_TURN = 256 * 1024
"""Reply bytes after which one uid's turn ends."""
TURN_SECONDS = 0.002
"""Loop time after which one uid's turn ends (requests that are cheap to send but
costly to answer, such as ``status`` past the last lease of a large table)."""
PENDING_PER_UID = 8 << 20
"""Reply bytes not yet written to one uid's connections above which that uid gets no
turn (nothing more of it is read) until its clients read."""
PENDING_TOTAL = 64 << 20
"""Reply bytes not yet written in all above which only uids with none pending are served."""
ACCEPTS_PER_TURN = 64
RECV_SIZE = 16 * 1024
"""Bytes read from a connection at a time, and only when no whole line of it is buffered:
what a connection can make the broker hold is this plus ``MAX_LINE``."""
MAX_EVENTS = 4096
"""Events taken from epoll at once."""
BUSY_TURNS = 16
"""Rounds served back to back (epoll always had work) before yielding to other trio tasks."""
ACCEPT_PAUSE = 0.1
"""Seconds accept() rests after EMFILE/ENFILE, as trio's serve_listeners does."""
LOG_EVERY = 1.0
"""Seconds between two log lines about failed waiting requests."""

_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR
_HUP_ONLY = 0
"""A registration that asks for nothing: epoll still reports a hang-up to it."""


@dataclass(slots=True, eq=False)
class UidShare:
    """The connections of one uid: scheduled together, bounded together."""

    uid: int | None
    queue: collections.deque[Conn] = field(default_factory=collections.deque)
    """Its connections with work waiting for a turn, in turn order."""
    pending: int = 0
    """Reply bytes not yet written to its connections."""
    open: int = 0
    scheduled: bool = False
    """In the driver's round-robin of uids."""
    blocked: bool = False
    """Over its bound of pending bytes: no turn until its clients read."""


@dataclass(slots=True, eq=False)
class Conn:
    """One client connection."""

    sock: socket.socket
    fd: int
    session: Session
    share: UidShare
    framer: p.LineFramer = field(default_factory=p.LineFramer)
    out: bytearray = field(default_factory=bytearray)
    waiting: bool = False
    """A request of this connection is being answered by a task (the share); read nothing meanwhile."""
    readable: bool = False
    """epoll said there is input (or an end of it) that has not been read yet."""
    eof: bool = False
    """The client will send nothing more (it shut down its side, or closed)."""
    hup: bool = False
    """The client can no longer read either (epoll said EPOLLHUP/EPOLLERR)."""
    finish: bool = False
    """The broker ends the connection once its replies are written (a line too long)."""
    closed: bool = False
    queued: bool = False
    """In its uid's queue, waiting for a turn."""
    events: int | None = None
    """What epoll watches for now; None: not registered."""


Reply = bytes | Callable[[], Awaitable[bytes]]
"""What the handler answers a line with: the reply line, or an async function
that produces it (run as a task while the connection waits)."""


class Handler(Protocol):
    """What the driver needs from the broker."""

    def opened(self, session: Session) -> bytes | None:
        """A new connection; return an error line to refuse it (then it is closed)."""

    def request(self, session: Session, line: bytes) -> Reply:
        """One request line of the connection; return the reply line (newline included)."""

    def closed(self, session: Session) -> None:
        """The connection is gone (not called for connections dropped at shutdown)."""

    def turn_done(self) -> None:
        """Called after each round of the loop, once replies are written: deferred work goes here."""


def _internal(what: str) -> bytes:
    # id null: the reply belongs to the oldest unanswered request, which is this one.
    return p.encode(p.Error(id=None, code=p.ErrorCode.INTERNAL,
                            message=f"the broker failed to answer this request ({what}); please report it"))


class Driver:
    """Accepts and serves every connection; :meth:`run` until cancelled."""

    def __init__(
        self,
        listener: socket.socket,
        handler: Handler,
        session_for: Callable[[int, socket.socket], Session],
        *,
        pending_per_uid: int = PENDING_PER_UID,
        pending_total: int = PENDING_TOTAL,
    ) -> None:
        """The bounds of pending reply bytes default to PENDING_PER_UID and PENDING_TOTAL."""
        self.listener = listener
        self.handler = handler
        self._session_for = session_for
        self.pending_per_uid = pending_per_uid
        self.pending_total = pending_total
        self.conns: dict[int, Conn] = {}
        self.pending = 0
        """Reply bytes not yet written, over every connection."""
        self._uids: dict[int | None, UidShare] = {}
        self._round_robin: collections.deque[UidShare] = collections.deque()
        self._blocked: set[UidShare] = set()
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        """Written when a task outside the loop queues work (a reply the share produced),
        so that a loop parked on the epoll fd serves it."""
        self._next_id = 0
        self._accepting = True
        self._accept_resume = 0.0
        self.accept_pauses = 0
        """Times accept() met a resource limit (EMFILE, ENFILE, ...) and rested."""
        self._nursery: trio.Nursery | None = None
        self._failures = 0
        self._failure_logged = -1e9

    def __len__(self) -> int:
        return len(self.conns)

    def share_of(self, uid: int | None) -> UidShare | None:
        """The scheduling and memory state of ``uid``'s connections (None: it has none)."""
        return self._uids.get(uid)

    async def run(self) -> None:
        """Serve until cancelled; on the way out close every connection (leases stay)."""
        self.listener.setblocking(False)
        lfd = self.listener.fileno()
        self._ep.register(lfd, select.EPOLLIN)
        self._ep.register(self._wake, select.EPOLLIN)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._loop(lfd)
        finally:
            for conn in list(self.conns.values()):
                self._drop(conn, notify=False)
            self._ep.close()
            os.close(self._wake)

    async def _loop(self, lfd: int) -> None:
        ep = self._ep
        rounds = self._round_robin
        busy = 0
        while True:
            if not self._accepting and trio.current_time() >= self._accept_resume:
                self._accepting = True
                ep.register(lfd, select.EPOLLIN)
            # No waiting in this epoll before parking on trio's: a "hot wait" of up
            # to 2 ms here gained nothing measurable (docs/performance.md).
            events = ep.poll(0, MAX_EVENTS)
            if not events and not rounds:
                busy = 0
                if self._accepting:
                    await trio.lowlevel.wait_readable(ep.fileno())
                else:
                    with trio.move_on_at(self._accept_resume):
                        await trio.lowlevel.wait_readable(ep.fileno())
                continue
            for fd, ev in events:
                if fd == lfd:
                    self._accept(lfd)
                elif fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                else:
                    conn = self.conns.get(fd)
                    if conn is not None:
                        self._event(conn, ev)
            self._round()
            self.handler.turn_done()
            # Waiting on the epoll fd is itself a checkpoint; only a loop that
            # always finds work must make room for the broker's other tasks.
            busy += 1
            if busy >= BUSY_TURNS:
                busy = 0
                await trio.lowlevel.checkpoint()

    # -------------------------------------------------------- accept

    def _accept(self, lfd: int) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if kernel.out_of_fds(exc):
                    log.error("cannot accept connections: %s; pausing %g s", exc.strerror, ACCEPT_PAUSE)
                    self._ep.unregister(lfd)
                    self._accepting = False
                    self._accept_resume = trio.current_time() + ACCEPT_PAUSE
                    self.accept_pauses += 1
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            sock.setblocking(False)
            self._next_id += 1
            session = self._session_for(self._next_id, sock)
            refusal = self.handler.opened(session)
            if refusal is not None:
                with contextlib.suppress(OSError):
                    sock.send(refusal)
                sock.close()
                continue
            uid = session.peer.uid
            share = self._uids.get(uid)
            if share is None:
                share = self._uids[uid] = UidShare(uid)
            share.open += 1
            fd = sock.fileno()
            conn = Conn(sock=sock, fd=fd, session=session, share=share)
            self.conns[fd] = conn
            self._watch(conn, _IN)

    # -------------------------------------------------------- events and turns

    def _event(self, conn: Conn, ev: int) -> None:
        if ev & _GONE:
            conn.hup = True
        if ev & _OUT and conn.out:
            self._flush(conn)
            if not conn.out:
                self._settle(conn, more=True)
            if conn.closed:
                return
        if conn.hup and (conn.out or (conn.eof and not conn.waiting and not conn.queued)):
            # Gone both ways: its replies cannot be delivered, or it was
            # half-closed and has now closed its reading side too.
            self._drop(conn)
            return
        if ev & (_IN | _GONE) and not conn.eof:
            conn.readable = True
            if not conn.queued:
                if not conn.waiting and not conn.out:
                    self._queue(conn)
            elif not ev & _GONE:
                # Level-triggered epoll would report it every round until its turn
                # comes: it is read at its turn, not before; a hang-up still shows.
                self._watch(conn, _HUP_ONLY)
            elif conn.share.blocked:
                # Its uid gets no turn until its clients read, and this one never
                # will: end it now, so that its leases do not outlast it.
                self._drop(conn)
            else:
                self._watch(conn, None)  # its turn reads what it sent, then ends it

    def _queue(self, conn: Conn) -> None:
        if conn.queued:
            return
        conn.queued = True
        share = conn.share
        share.queue.append(conn)
        if not share.scheduled and not share.blocked:
            share.scheduled = True
            self._round_robin.append(share)

    def _over(self, share: UidShare) -> bool:
        return share.pending >= self.pending_per_uid or (
            share.pending > 0 and self.pending >= self.pending_total)

    def _round(self) -> None:
        """One turn for every uid with work, in round-robin order."""
        rounds = self._round_robin
        for _ in range(len(rounds)):
            share = rounds.popleft()
            share.scheduled = False
            if self._over(share):
                share.blocked = True
                self._blocked.add(share)
                continue
            self._turn(share)
            if share.queue and not share.scheduled and not share.blocked:
                share.scheduled = True
                rounds.append(share)

    def _turn(self, share: UidShare) -> None:
        """One uid's turn: its queued connections in order, within one turn's budget."""
        lines, size = LINES_PER_TURN, BYTES_PER_TURN
        deadline = time.perf_counter() + TURN_SECONDS
        queue = share.queue
        for _ in range(len(queue)):
            conn = queue.popleft()
            conn.queued = False
            if conn.closed:
                continue
            served, written = self._serve(conn, lines, size, deadline)
            lines -= served
            size -= written
            if lines <= 0 or size <= 0 or self._over(share) or time.perf_counter() >= deadline:
                break

    def _serve(self, conn: Conn, lines: int, size: int, deadline: float) -> tuple[int, int]:
        """Answer up to ``lines`` of the connection's requests; return (answered, reply bytes)."""
        if conn.out or conn.waiting:
            self._settle(conn, more=False)  # its turn comes once it has drained or been answered
            return 0, 0
        out = conn.out
        served = 0
        more = False
        while True:
            try:
                line = conn.framer.next_line()
            except p.LineTooLongError:
                out += p.encode(p.line_too_long())
                conn.eof = conn.finish = True
                conn.readable = False
                conn.framer.clear()
                break
            if line is None:
                if conn.readable and not conn.eof and self._recv(conn):
                    continue
                break
            if not line.strip():
                continue
            try:
                reply = self.handler.request(conn.session, line)
            except Exception as exc:  # a bug: answer this request, keep the connection
                self._failed("the request", exc)
                reply = _internal("a broker bug")
            served += 1
            if not isinstance(reply, bytes):
                self._wait_for(conn, reply)
                break
            out += reply
            if served >= lines or len(out) >= size or time.perf_counter() >= deadline:
                more = True
                break
        written = len(out)
        if written:
            conn.share.pending += written
            self.pending += written
            self._flush(conn)
        self._settle(conn, more=more)
        return served, written

    def _recv(self, conn: Conn) -> bool:
        """Read once; False when nothing came (no more for now, or the end of input)."""
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            conn.readable = False
            return False
        except OSError:
            conn.readable = False
            conn.eof = conn.hup = True
            return False
        if not data:
            conn.readable = False
            conn.eof = True
            return False
        # A short read took all there was: what comes later, epoll reports (level-
        # triggered), so no read that would only say EAGAIN follows every request.
        conn.readable = len(data) == RECV_SIZE
        conn.framer.feed(data)
        return True

    def _settle(self, conn: Conn, *, more: bool) -> None:
        """After a turn or a flush: what the connection waits for next.

        ``more``: it may have requests left (its turn's budget ran out, or its
        replies just drained while it was not being read).
        """
        if conn.closed:
            return
        if conn.out:
            self._watch(conn, _OUT)
        elif conn.waiting:
            self._watch(conn, None)
        elif conn.finish:
            self._drop(conn)
        elif more:
            if not conn.eof:
                conn.readable = True
            self._queue(conn)
        elif conn.eof:
            if conn.hup:
                self._drop(conn)
            else:
                # Half-closed: its leases stay while it can still read; the
                # hang-up of its reading side ends it.
                self._watch(conn, _HUP_ONLY)
        else:
            self._watch(conn, _IN)

    def _wait_for(self, conn: Conn, produce: Callable[[], Awaitable[bytes]]) -> None:
        assert self._nursery is not None
        conn.waiting = True
        self._watch(conn, None)

        async def answer() -> None:
            try:
                reply = await produce()
            except Exception as exc:
                # Whatever the task met, this request gets an answer and the
                # driver (and every other connection) goes on.
                self._failed("a waiting request", exc)
                reply = _internal("a broker bug")
            finally:
                conn.waiting = False
            if conn.closed:
                return
            conn.out += reply
            conn.share.pending += len(reply)
            self.pending += len(reply)
            self._flush(conn)
            self._settle(conn, more=True)
            if conn.queued:
                os.eventfd_write(self._wake, 1)  # the loop may be parked on the epoll fd

        self._nursery.start_soon(answer)

    def _failed(self, what: str, exc: Exception) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._failure_logged >= LOG_EVERY:
            log.error("%d request(s) failed in the broker; the last, %s: %r", self._failures, what, exc,
                      exc_info=exc)
            self._failures = 0
            self._failure_logged = now

    def _flush(self, conn: Conn) -> None:
        """Write what is pending, as much as the socket takes."""
        if conn.closed or not conn.out:
            return
        out = conn.out
        try:
            sent = conn.sock.send(out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn)
            return
        del out[:sent]
        share = conn.share
        share.pending -= sent
        self.pending -= sent
        if share.blocked or self._blocked:
            self._unblock(share)

    def _unblock(self, share: UidShare) -> None:
        """Give uids whose bound no longer holds them back their turns."""
        candidates = list(self._blocked) if self.pending < self.pending_total else [share]
        for s in candidates:
            if s.blocked and not self._over(s):
                s.blocked = False
                self._blocked.discard(s)
                if s.queue and not s.scheduled:
                    s.scheduled = True
                    self._round_robin.append(s)

    def _watch(self, conn: Conn, events: int | None) -> None:
        """Have epoll watch ``conn`` for ``events``; None takes it out of the set, since
        epoll reports a hang-up even to a registration that asks for nothing."""
        if conn.closed or conn.events == events:
            return
        try:
            if events is None:
                self._ep.unregister(conn.fd)
            elif conn.events is None:
                self._ep.register(conn.fd, events)
            else:
                self._ep.modify(conn.fd, events)
        except OSError:
            self._drop(conn)
            return
        conn.events = events

    def _drop(self, conn: Conn, *, notify: bool = True) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn.fd, None)
        if conn.events is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(conn.fd)
        conn.sock.close()
        share = conn.share
        share.pending -= len(conn.out)
        self.pending -= len(conn.out)
        conn.out.clear()
        share.open -= 1
        if share.open == 0 and self._uids.get(share.uid) is share:
            del self._uids[share.uid]
            self._blocked.discard(share)
        elif share.blocked:
            self._unblock(share)
        if notify:
            self.handler.closed(conn.session)


__all__ = ["Conn", "Driver", "Handler", "Reply", "UidShare"]
