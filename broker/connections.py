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

Fairness and bounded memory are rules of this loop, not of the clients:

- a connection has at most one reply buffer in flight: while its reply has not
  been written out, the loop stops reading from it (backpressure), so pipelined
  requests cost the broker one reply at a time, never their sum;
- a connection is served for at most ``LINES_PER_TURN`` requests or
  ``BYTES_PER_TURN`` bytes of replies before the others get their turn, and the
  loop yields to trio after every turn;
- a partial line is buffered up to ``protocol.MAX_LINE`` bytes, then refused.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from portlease.client import protocol as p

from .core import Session

log = logging.getLogger("portlease.broker")

LINES_PER_TURN = 32
BYTES_PER_TURN = 256 * 1024
ACCEPTS_PER_TURN = 64
RECV_SIZE = 64 * 1024
HOT_WAIT = 0.002
"""Seconds the loop may wait in its own epoll, when no other trio task is runnable
and no trio timer is due, before it parks on trio's (see :meth:`Driver._loop`)."""
BUSY_TURNS = 16
"""Turns served back to back (epoll always had work) before yielding to other trio tasks."""
ACCEPT_PAUSE = 0.1
"""Seconds accept() rests after EMFILE/ENFILE, as trio's serve_listeners does."""

_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT


@dataclass(slots=True, eq=False)
class Conn:
    """One client connection."""

    sock: socket.socket
    fd: int
    session: Session
    framer: p.LineFramer = field(default_factory=p.LineFramer)
    out: bytearray = field(default_factory=bytearray)
    waiting: bool = False
    """A request of this connection is being answered by a task (the share); read nothing meanwhile."""
    eof: bool = False
    """The client will send nothing more; close once every reply is out."""
    closed: bool = False
    queued: bool = False
    """In the driver's ready queue (more lines to serve next turn)."""
    events: int = 0
    """What epoll watches for now (0: not registered)."""


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
        """Called after each turn of the loop, once replies are written: deferred work goes here."""


class Driver:
    """Accepts and serves every connection; :meth:`run` until cancelled."""

    def __init__(
        self,
        listener: socket.socket,
        handler: Handler,
        session_for: Callable[[int, socket.socket], Session],
    ) -> None:
        self.listener = listener
        self.handler = handler
        self._session_for = session_for
        self.conns: dict[int, Conn] = {}
        self._ready: collections.deque[Conn] = collections.deque()
        """Connections with complete lines still buffered (their turn ended early)."""
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        """Written when a task outside the loop queues work (a reply the share produced),
        so that a loop parked on the epoll fd serves it."""
        self._next_id = 0
        self._accepting = True
        self._accept_resume = 0.0
        self._nursery: trio.Nursery | None = None

    def __len__(self) -> int:
        return len(self.conns)

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
        busy = 0
        while True:
            if not self._accepting and trio.current_time() >= self._accept_resume:
                self._accepting = True
                ep.register(lfd, select.EPOLLIN)
            events = ep.poll(0, 256)
            if not events and not self._ready:
                # Leases come in bursts (a test suite's set-up, a client's hang-up
                # right after its reply): the next event is usually microseconds
                # away. Waiting for it here, briefly and only while nothing else in
                # trio could run, spares the round trip through trio's scheduler
                # that parking on the epoll fd costs per wake-up. Anything trio has
                # to do meanwhile (a signal, a worker thread's result) waits at most
                # HOT_WAIT.
                stats = trio.lowlevel.current_statistics()
                if stats.tasks_runnable == 0 and stats.seconds_to_next_deadline > HOT_WAIT:
                    events = ep.poll(HOT_WAIT, 256)
            if not events and not self._ready:
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
                    continue
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                    continue
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if ev & _OUT:
                    self._flush(conn)
                if conn.out and ev & (select.EPOLLHUP | select.EPOLLERR):
                    self._drop(conn)  # gone both ways: its replies cannot be delivered
                elif ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                    self._read(conn)
            for _ in range(len(self._ready)):
                conn = self._ready.popleft()
                conn.queued = False
                if not conn.closed:
                    self._serve(conn)
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
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept connections: %s; pausing %g s", exc.strerror, ACCEPT_PAUSE)
                    self._ep.unregister(lfd)
                    self._accepting = False
                    self._accept_resume = trio.current_time() + ACCEPT_PAUSE
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
            fd = sock.fileno()
            conn = Conn(sock=sock, fd=fd, session=session)
            self.conns[fd] = conn
            self._watch(conn, _IN)

    # -------------------------------------------------------- reading and serving

    def _read(self, conn: Conn) -> None:
        if conn.closed or conn.waiting or conn.out:
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            conn.eof = True
        else:
            conn.framer.feed(data)
        self._serve(conn)

    def _serve(self, conn: Conn) -> None:
        """Answer this connection's buffered lines, within one turn's budget."""
        lines = 0
        out = conn.out
        while not conn.waiting and not out:
            try:
                line = conn.framer.next_line()
            except p.LineTooLongError:
                out += p.encode(p.Error(
                    id=None, code=p.ErrorCode.LINE_TOO_LONG,
                    message=f"line longer than {p.MAX_LINE} bytes; closing the connection",
                ))
                conn.eof = True
                conn.framer.clear()
                break
            if line is None:
                break
            if not line.strip():
                continue
            reply = self.handler.request(conn.session, line)
            if isinstance(reply, bytes):
                out += reply
            else:
                self._wait_for(conn, reply)
                break
            lines += 1
            if lines >= LINES_PER_TURN or len(out) >= BYTES_PER_TURN:
                self._queue(conn)
                break
        if out:
            self._flush(conn)
        elif conn.eof and not conn.waiting:
            self._drop(conn)

    def _wait_for(self, conn: Conn, produce: Callable[[], Awaitable[bytes]]) -> None:
        assert self._nursery is not None
        conn.waiting = True
        self._watch(conn, 0)

        async def answer() -> None:
            try:
                reply = await produce()
            except Exception:
                # A task's bug must end this connection, never the driver's nursery.
                log.exception("connection %d: a waiting request failed; closing it", conn.fd)
                self._drop(conn)
                return
            finally:
                conn.waiting = False
            if conn.closed:
                return
            conn.out += reply
            self._flush(conn)
            if conn.queued:
                os.eventfd_write(self._wake, 1)  # the loop may be parked on the epoll fd

        self._nursery.start_soon(answer)

    def _flush(self, conn: Conn) -> None:
        """Write what is pending; stop reading while the client does not read."""
        if conn.closed:
            return
        out = conn.out
        if out:
            try:
                sent = conn.sock.send(out)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop(conn)
                return
            del out[:sent]
        if out:
            self._watch(conn, _OUT)
            return
        if conn.waiting:
            return
        if conn.framer.buffered:
            self._queue(conn)  # pipelined lines wait in the framer
        elif conn.eof:
            self._drop(conn)
            return
        self._watch(conn, _IN)

    def _queue(self, conn: Conn) -> None:
        if not conn.queued:
            conn.queued = True
            self._ready.append(conn)

    def _watch(self, conn: Conn, events: int) -> None:
        """Have epoll watch ``conn`` for ``events``; 0 takes it out of the set, since
        epoll reports a hang-up even to a registration that asks for nothing."""
        if conn.closed or conn.events == events:
            return
        try:
            if events == 0:
                self._ep.unregister(conn.fd)
            elif conn.events == 0:
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
        if conn.events:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(conn.fd)
        conn.sock.close()
        if notify:
            self.handler.closed(conn.session)


__all__ = ["Conn", "Driver", "Handler", "Reply"]
