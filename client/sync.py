"""The blocking client: :func:`lease` and :class:`Connection`.

A thin I/O shell over :class:`portlease.client.session.Session`; it imports
only the standard library and msgspec (no trio, anyio or asyncio), so a test
suite, a shell wrapper or any thread can use it cheaply.

A lease lives as long as its connection. When the broker itself goes away
(restart, upgrade, crash) the leases are reclaimed within their TTL even if the
program makes no call meanwhile: **one watcher thread per process**
(:mod:`portlease.client.reclaim`) waits for a hang-up on every open connection
that holds leases, and tells the connection, which reconnects and reclaims
without ever sleeping in that thread.

Locks are never held across sleeps or connects: a reconnect dials with no lock
held and installs the new socket under the I/O lock, which only guards one
write and the reads of its replies. :meth:`Connection.close` takes no lock it
could wait for and never waits on a thread, so it is safe at interpreter exit
(:func:`sys.is_finalizing`, daemon threads frozen mid-step) and in a forked
child (:func:`os.register_at_fork`), where the parent's connection is left
alone: the child neither closes it for the parent nor sends on it.

A lease that cannot be reclaimed is reported on stderr, passed to ``on_lost``
and raised from the next call (and from :meth:`Lease.check`).
"""

from __future__ import annotations

import contextlib
import os
import socket as _socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

from . import paths, reclaim
from . import protocol as p
from .grant import Lease, LostCallback
from .protocol.errors import BrokerUnavailable, ConnectionLost, LeaseError, PortleaseError
from .session import (
    RECONNECT_MAX_DELAY,
    SETTLE_MAX,
    Call,
    Dropped,
    GiveUp,
    Reconnect,
    Retry,
    Session,
    default_note,
)

__all__ = ["RECONNECT_MAX_DELAY", "Connection", "default_note", "lease"]

T = TypeVar("T")


class Connection:
    """One connection to the broker, on which any number of leases can be taken.

    ``socket``: path of the broker's socket (default: ``$PORTLEASE_SOCKET``, the
    system socket, or the per-user one). ``reclaim``: reconnect and reclaim
    leases when the broker restarts. ``on_lost(lease, exc)`` is called from the
    process's watcher thread when a lease could not be kept. ``timeout`` bounds
    each request and each wait for a broker. A connection may be shared between
    threads; its requests are serialised.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        timeout: float = 30.0,
        reclaim: bool = True,
        on_lost: LostCallback | None = None,
        client: str | None = None,
        autostart: bool | None = None,
    ) -> None:
        self._choice = paths.choose_socket(socket)
        self.path = self._choice.path
        self.timeout = timeout
        self._reclaim = reclaim
        self._autostart = autostart
        self._s = Session(client or "portlease-sync", on_lost=on_lost, timeout=timeout)
        self._io = threading.Lock()
        self._sock: _socket.socket | None = None
        self._hung: _socket.socket | None = None  # hung up, not yet dropped (a call held the lock)
        self._reconnect: Reconnect | None = None  # kept across drops until a hello is answered
        self._down = "not connected"
        self._pid = os.getpid()
        self._closed = False
        self._install(self._dial())

    # -------------------------------------------------------- context

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; every lease bound to it is released by the broker.

        Never blocks: no lock is waited for and no thread joined.
        """
        if self._closed:
            return
        self._closed = True
        sock, self._sock = self._sock, None
        if os.getpid() != self._pid:
            # A forked child shares the parent's socket: shutting it down would
            # end the parent's leases. Dropping our copy of the fd is all.
            if sock is not None:
                sock.close()
            return
        if not sys.is_finalizing():
            reclaim.watcher().discard(self)
        if sock is not None:
            # shutdown() acts at once for every holder of the socket: the
            # broker releases the leases now, and a thread blocked in recv()
            # on it wakes. Whoever holds the I/O lock closes the fd.
            with contextlib.suppress(OSError):
                sock.shutdown(_socket.SHUT_RDWR)
            if self._io.acquire(blocking=False):
                try:
                    sock.close()
                finally:
                    self._io.release()
        self._s.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (or the ``with`` block ended)."""
        return self._closed

    def fileno(self) -> int:
        """The socket's file descriptor, or -1 while not connected."""
        sock = self._sock
        return sock.fileno() if sock is not None else -1

    # -------------------------------------------------------- operations

    def lease(
        self,
        count: int = 1,
        *,
        ttl: float | None = None,
        note: str | None = None,
        detach: bool = False,
    ) -> Lease:
        """Lease ``count`` consecutive ports, bound to this connection unless ``detach``."""
        held = self._run(self._s.lease(count, ttl=ttl, note=note, detach=detach))
        if not detach:
            self._watch()
        return held

    def release(self, lease: Lease | str) -> None:
        """End a lease now (by object or token). Releasing twice is not an error."""
        call = self._s.release(lease)
        if call is not None:
            self._run(call)

    def renew(self, lease: Lease | str) -> float | None:
        """Push a detached lease's expiry forward; returns the new expiry."""
        return self._run(self._s.renew(lease))

    def detach(self, lease: Lease | str) -> float:
        """Unbind a lease from this connection: it then lives by its TTL alone."""
        return self._run(self._s.detach(lease))

    def reclaim(self, token: str) -> Lease:
        """Bind a detached or orphaned lease to this connection."""
        held = self._run(self._s.reclaim(token))
        self._watch()
        return held

    def status(self, **query: Any) -> p.StatusReply:
        """Leases the broker holds and a summary (``uid``, ``after``, ``limit`` as in the protocol)."""
        return self._run(self._s.status(**query))

    def ping(self) -> None:
        """Round trip to the broker (reconnecting first if it restarted)."""
        self._run(self._s.ping())

    def metrics(self) -> str:
        """The broker's metrics, in the OpenMetrics text format (ends with ``# EOF``)."""
        return self._run(self._s.metrics())

    @property
    def leases(self) -> list[Lease]:
        """Leases currently bound to this connection."""
        return list(self._s.leases.values())

    @property
    def broker_pid(self) -> int | None:
        """Pid of the broker this connection last said hello to (None before the first request).

        Hello rides on the first request; :meth:`ping` says it when no other request is due.
        """
        return self._s.broker_pid

    # -------------------------------------------------------- requests

    def _usable(self) -> None:
        if self._closed:
            raise ConnectionLost("the connection is closed")
        if os.getpid() != self._pid:
            raise ConnectionLost(
                f"this connection belongs to process {self._pid}; a forked child must open its own"
            )

    def _run(self, call: Call[T]) -> T:
        retry: Retry | None = None  # made once the socket drops under this call
        while True:
            self._usable()
            sock = self._sock
            if sock is None:
                if not (self._reclaim or retry is not None):
                    raise ConnectionLost(self._down)
                self._reconnect_blocking()
                continue
            fresh = self._s.hello_due
            try:
                return self._exchange(sock, call)
            except Dropped as exc:
                retry = retry or Retry(self._s, reclaim=self._reclaim)
                delay = None if self._closed else retry.after_drop(fresh=fresh, now=time.monotonic())
                if delay is None:
                    raise ConnectionLost(str(exc)) from None
                if delay:
                    time.sleep(delay)
                call.error = None

    def _exchange(self, sock: _socket.socket, call: Call[T]) -> T:
        with self._io:
            if self._sock is not sock:
                raise Dropped("the connection was replaced")
            try:
                sock.sendall(self._s.send(call))
                while not call.done:
                    event = self._s.next_event()
                    if event is None:
                        data = sock.recv(65536)
                        if not data:
                            raise EOFError("the broker closed the connection")
                        self._s.feed(data)
                self._reconnect = None
            except TimeoutError:
                self._s.abandon(call)
                self._settle_locked(sock)
                self._drop_locked(sock, f"no answer within {self.timeout:g} s", retry=False)
                raise ConnectionLost(
                    f"the broker at {self.path} did not answer within {self.timeout:g} s"
                ) from None
            except LeaseError:
                # hello refused (version): this socket cannot be used.
                self._drop_locked(sock, "the broker refused hello", retry=False)
                raise
            except (OSError, EOFError, ConnectionLost) as exc:
                self._drop_locked(sock, str(exc) or type(exc).__name__, retry=True)
            finally:
                if self._closed and self._sock is None:
                    sock.close()  # close() found us mid-call and left the fd to us
        return call.result()

    def _settle_locked(self, sock: _socket.socket) -> None:
        """Before the socket of a call that timed out is dropped: give back what it was granted.

        A detached lease (or a reclaim, a release, a detach) outlives the
        socket: granted after the caller gave up, it would be held until its
        TTL by nobody. So the late reply is waited for, and undone, for at most
        :data:`~portlease.client.session.SETTLE_MAX` seconds (or the timeout);
        a broker that is stopped for good must not hold the caller up longer.
        """
        if not self._s.unsettled:
            return
        deadline = time.monotonic() + min(self.timeout, SETTLE_MAX)
        with contextlib.suppress(OSError, EOFError, PortleaseError):
            while self._s.unsettled:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                sock.settimeout(left)
                data = self._s.data_to_send()
                if data:
                    sock.sendall(data)
                    continue
                chunk = sock.recv(65536)
                if not chunk:
                    return
                self._s.feed(chunk)
                while self._s.next_event() is not None:
                    pass

    # -------------------------------------------------------- sockets

    def _dial(self, wait: float | None = None) -> _socket.socket:
        """Connect to the chosen socket, checked before and after; may wait or autostart.

        ``wait``: how long a system broker that is down is waited for (default
        the timeout; 0 for one attempt).
        """
        choice = self._choice
        deadline = time.monotonic() + (self.timeout if wait is None else wait)
        dialing = paths.Dialing(choice, autostart=self._autostart, deadline=deadline,
                                max_delay=RECONNECT_MAX_DELAY)
        while True:
            paths.check_directory(choice)
            try:
                sock = _connect(choice.path, deadline)
            except OSError as exc:
                step = dialing.after_error(exc, time.monotonic())
                if step == "autostart":
                    self._autostart_broker()
                else:
                    time.sleep(step)
                continue
            try:
                paths.check_peer(sock, choice)
            except BaseException:
                sock.close()
                raise
            sock.settimeout(self.timeout)
            return sock

    def _autostart_broker(self) -> None:
        from . import autostart

        try:
            autostart.ensure_broker(self.path, timeout=self.timeout)
        except OSError as exc:
            raise paths.autostart_failed(self._choice, exc) from None

    def _install(self, sock: _socket.socket) -> None:
        """Make ``sock`` the connection's socket, unless another thread got there first."""
        with self._io:
            if self._closed or self._sock is not None:
                sock.close()
                return
            self._sock = sock
            self._hung = None
            self._s.new_socket()
        if self._s.leases and self._reclaim:
            reclaim.watcher().watch(self, sock)

    def _drop_locked(self, sock: _socket.socket, why: str, *, retry: bool) -> None:
        """Forget ``sock`` (caller holds the I/O lock); calls in flight fail."""
        if self._sock is not sock:
            return
        self._sock = None
        self._down = f"connection to the broker lost: {why}"
        reclaim.watcher().forget(sock)
        self._s.connection_lost(why, retry=retry)
        with contextlib.suppress(OSError):
            sock.shutdown(_socket.SHUT_RDWR)
        sock.close()
        if self._s.leases and self._reclaim and not self._closed:
            self._reconnect = self._reconnect or Reconnect(self._s, time.monotonic())
            reclaim.watcher().schedule(self, time.monotonic())

    def _reconnect_blocking(self) -> None:
        """Reach the broker again from a caller's thread, sleeping between tries (no lock held)."""
        round_ = self._reconnect = self._reconnect or Reconnect(self._s, time.monotonic())
        while self._sock is None:
            self._usable()
            try:
                sock = self._dial(wait=0)
            except (BrokerUnavailable, OSError) as exc:
                step = round_.after_failure(exc, time.monotonic())
                if isinstance(step, GiveUp):
                    raise step.error from None
                time.sleep(step)
                continue
            self._install(sock)

    # -------------------------------------------------------- reclaim (watcher thread)

    def _watch(self) -> None:
        sock = self._sock
        if self._reclaim and sock is not None and self._s.leases:
            reclaim.watcher().watch(self, sock)

    def _hangup(self, sock: _socket.socket) -> None:
        """The watcher saw ``sock`` hang up."""
        if self._io.acquire(blocking=False):
            try:
                self._drop_locked(sock, "the broker hung up", retry=True)
            finally:
                self._io.release()
        elif self._sock is sock:
            # A call holds the lock and will see the end itself; look again soon.
            self._hung = sock
            reclaim.watcher().schedule(self, time.monotonic() + 0.01)

    def _recover_step(self, now: float) -> float | None:
        """One reclaim attempt from the watcher; returns when to try again, or None when done.

        Never sleeps: the watcher serves every connection of the process.
        """
        if self._closed or os.getpid() != self._pid or not self._s.leases or not self._reclaim:
            return None
        sock = self._sock
        if sock is not None and sock is self._hung:
            self._hangup(sock)
            return None
        if sock is not None and self._s.welcomed:
            return None  # a call got there first
        round_ = self._reconnect = self._reconnect or Reconnect(self._s, now)
        if sock is None:
            try:
                new = self._dial(wait=0)
            except (BrokerUnavailable, OSError) as exc:
                step = round_.after_failure(exc, now)
                return None if isinstance(step, GiveUp) else now + step
            self._install(new)
            sock = self._sock
            if sock is None:
                return None
        # Say hello: the same write carries a reclaim for every lease.
        try:
            self._exchange(sock, self._s.ping())
        except (ConnectionLost, LeaseError) as exc:
            if self._closed or not self._s.leases:
                return None
            now = time.monotonic()
            step = round_.after_failure(exc, now)
            return None if isinstance(step, GiveUp) else now + step
        return None


def _connect(path: str, deadline: float) -> _socket.socket:
    delay = 0.001
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        sock.settimeout(max(deadline - time.monotonic(), 1.0))  # set to the call timeout after
        try:
            sock.connect(path)
        except BlockingIOError:
            # EAGAIN: the broker's listen backlog is full (a burst of clients, or
            # a socket-activated broker still starting). A socket with a timeout
            # gets this at once where a blocking one would wait; so wait.
            sock.close()
            if time.monotonic() + delay >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            continue
        except BaseException:
            sock.close()
            raise
        return sock


@contextlib.contextmanager
def lease(
    count: int = 1,
    *,
    socket: str | None = None,
    ttl: float | None = None,
    note: str | None = None,
    **kwargs: Any,
) -> Iterator[Lease]:
    """Lease ``count`` consecutive ports for the duration of the ``with`` block.

    >>> with lease(3) as ports:      # doctest: +SKIP
    ...     start_postgres(ports[0])

    The ports are released when the block ends, or when the process dies.
    """
    with Connection(socket, **kwargs) as conn:
        held = conn.lease(count, ttl=ttl, note=note)
        yield held
        held.check()
