"""The blocking client: :func:`lease` and :class:`Connection`.

Imports only the standard library and msgspec (no trio), so a test suite, a
shell wrapper or any thread can use it cheaply.

A lease lives as long as its connection. When the broker itself goes away
(restart, upgrade, crash), a small daemon thread notices the hang-up,
reconnects, and reclaims every lease with its token; a lease that cannot be
reclaimed is reported on stderr, passed to ``on_lost`` and raised from the
next call (and from :meth:`Lease.check`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket as _socket
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

from . import protocol as p
from .errors import (
    BrokerUnavailable,
    ConnectionLost,
    LeaseError,
    LeaseLost,
    NotFound,
    PortleaseError,
    error_class,
)
from .grant import Lease, LostCallback, report_lost
from .paths import resolve_socket

R = TypeVar("R", bound=p.Reply)

RECONNECT_MAX_DELAY = 0.1
"""Longest pause between attempts to reach a restarting broker. A refused
connect on a Unix socket costs microseconds, and every pause is time the
leases spend as orphans, so the clients keep knocking often."""



def default_note() -> str | None:
    """What identifies the caller to an operator: runner and job when CI sets them."""
    parts = []
    for var in ("RUNNER_NAME", "GITHUB_JOB"):
        value = os.environ.get(var)
        if value:
            parts.append(f"{var.lower()}={value}")
    return " ".join(parts) or None


def unavailable_error(path: str, explicit: bool, exc: OSError) -> BrokerUnavailable:
    """The :class:`BrokerUnavailable` to raise when connecting to ``path`` failed with ``exc``."""
    how = (
        "start one with `portlease serve --socket PATH`, or point PORTLEASE_SOCKET at a running one"
        if explicit
        else "start one with `portlease serve`, or enable the system service (portlease.socket)"
    )
    reason = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        return BrokerUnavailable(
            f"permission denied on the portlease socket {path}: add this user to the socket's "
            "group (usually `portlease`) and log in again",
            paths=(path,),
        )
    return BrokerUnavailable(f"no portlease broker answers at {path} ({reason}); {how}", paths=(path,))


def autostart_failed(path: str, exc: OSError) -> BrokerUnavailable:
    """The :class:`BrokerUnavailable` to raise when starting the per-user broker failed."""
    return BrokerUnavailable(
        f"no portlease broker answers at {path}, and starting one failed: {exc.strerror or exc}; "
        "start one with `portlease serve`",
        paths=(path,),
    )


class Connection:
    """One connection to the broker, on which any number of leases can be taken.

    ``socket``: path of the broker's socket (default: ``$PORTLEASE_SOCKET``, the
    system socket, or the per-user one). ``reclaim``: reconnect and reclaim
    leases when the broker restarts. ``on_lost(lease, exc)`` is called from the
    reclaim thread when a lease could not be kept.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        timeout: float = 30.0,
        reclaim: bool = True,
        on_lost: LostCallback | None = None,
        client: str = "portlease-sync",
        autostart: bool | None = None,
    ) -> None:
        self.path, self._explicit = resolve_socket(socket)
        self.timeout = timeout
        self._reclaim = reclaim
        self._on_lost = on_lost
        self._client = client
        self._autostart = autostart
        self._ids = itertools.count(1)
        self._io = threading.RLock()
        self._sock: _socket.socket | None = None
        self._rbuf = bytearray()
        self._leases: dict[str, Lease] = {}
        self._lost: list[LeaseLost] = []
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._watcher: threading.Thread | None = None
        self.broker_pid: int | None = None
        with self._io:
            try:
                self._connect()
            except ConnectionLost:
                # An autostarted broker that reached its idle timeout may close
                # the socket just as we arrive; the second try starts a new one.
                self._connect()

    # -------------------------------------------------------- context

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; every lease bound to it is released by the broker."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        with self._io:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            # Closing the socket made the broker release every bound lease.
            for held in self._leases.values():
                held.released = True
            self._leases.clear()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

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
        self._raise_lost()
        reply = self._call(
            p.Lease(id=0, count=count, ttl=ttl, note=note if note is not None else default_note(),
                    detach=detach),
            p.Granted,
        )
        lease = Lease(tuple(reply.ports), reply.token, reply.ttl, reply.expires)
        if not detach:
            self._leases[lease.token] = lease
            self._ensure_watcher()
        return lease

    def release(self, lease: Lease | str) -> None:
        """End a lease now (by object or token). Releasing twice is not an error."""
        token = lease if isinstance(lease, str) else lease.token
        if isinstance(lease, Lease) and lease.lost is not None:
            # The broker no longer knows the token. Releasing it is how the
            # caller acknowledges the loss, so the next lease() won't raise it.
            with contextlib.suppress(ValueError):
                self._lost.remove(lease.lost)
            lease.released = True
            return
        held = self._leases.pop(token, None)
        try:
            self._call(p.Release(id=0, token=token), p.Released)
        except NotFound:
            if held is None and isinstance(lease, str):
                raise
        for obj in (held, lease):
            if isinstance(obj, Lease):
                obj.released = True

    def renew(self, lease: Lease | str) -> float | None:
        """Push a detached lease's expiry forward; returns the new expiry."""
        token = lease if isinstance(lease, str) else lease.token
        reply = self._call(p.Renew(id=0, token=token), p.Renewed)
        if isinstance(lease, Lease):
            lease.expires = reply.expires
        return reply.expires

    def detach(self, lease: Lease | str) -> float:
        """Unbind a lease from this connection: it then lives by its TTL alone."""
        token = lease if isinstance(lease, str) else lease.token
        reply = self._call(p.Detach(id=0, token=token), p.Detached)
        self._leases.pop(token, None)
        if isinstance(lease, Lease):
            lease.expires = reply.expires
        return reply.expires

    def reclaim(self, token: str) -> Lease:
        """Bind a detached or orphaned lease to this connection."""
        reply = self._call(p.Reclaim(id=0, token=token), p.Reclaimed)
        lease = Lease(tuple(reply.ports), token, 0.0, None)
        self._leases[token] = lease
        self._ensure_watcher()
        return lease

    def status(self) -> p.StatusReply:
        return self._call(p.Status(id=0), p.StatusReply)

    def ping(self) -> None:
        self._call(p.Ping(id=0), p.Pong)

    @property
    def leases(self) -> list[Lease]:
        """Leases currently bound to this connection."""
        return list(self._leases.values())

    # -------------------------------------------------------- plumbing

    def _raise_lost(self) -> None:
        if self._lost:
            raise self._lost.pop(0)

    def _call(self, request: p.Request, expect: type[R]) -> R:
        if self._closed:
            raise ConnectionLost("the connection is closed")
        with self._io:
            try:
                reply = self._roundtrip(request)
            except ConnectionLost:
                if not self._reclaim:
                    raise
                self._recover()
                reply = self._roundtrip(request)
        if isinstance(reply, p.Error):
            raise error_class(reply.code)(reply.message, largest=reply.largest)
        if not isinstance(reply, expect):
            raise ConnectionLost(f"unexpected reply {reply!r}")
        return reply

    def _roundtrip(self, request: p.Request) -> p.AnyReply:
        sock = self._sock
        if sock is None:
            raise ConnectionLost("not connected")
        request.id = next(self._ids)
        try:
            sock.sendall(p.encode(request))
            while True:
                reply = p.decode_reply(self._read_line(sock))
                if reply.id == request.id:
                    return reply
                if reply.id is None and isinstance(reply, p.Error):
                    return reply
        except (OSError, EOFError) as exc:
            self._drop_socket()
            raise ConnectionLost(f"connection to the broker lost: {exc}") from None

    def _read_line(self, sock: _socket.socket) -> bytes:
        while (line := p.take_line(self._rbuf)) is None:
            data = sock.recv(65536)
            if not data:
                raise EOFError("broker closed the connection")
            self._rbuf += data
        return line

    def _drop_socket(self) -> None:
        if self._sock is not None:
            # shutdown() before close(): it wakes the watcher if it polls this socket.
            with contextlib.suppress(OSError):
                self._sock.shutdown(_socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        self._rbuf.clear()

    def _open_socket(self) -> _socket.socket:
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
                return sock
            except BlockingIOError:
                # EAGAIN: the broker's listen backlog is full (a burst of clients, or
                # a socket-activated broker still starting). A socket with a timeout
                # gets this at once where a blocking one would wait; so wait.
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            except OSError:
                sock.close()
                raise

    def _connect(self) -> None:
        """Connect and say hello (caller holds the I/O lock)."""
        try:
            sock = self._open_socket()
        except OSError as exc:
            sock = self._maybe_autostart(exc)
        self._sock = sock
        self._rbuf.clear()
        hello = self._roundtrip(p.Hello(id=0, version=p.PROTOCOL_VERSION, client=self._client))
        if isinstance(hello, p.Error):
            self._drop_socket()
            raise error_class(hello.code)(hello.message)
        if isinstance(hello, p.Welcome):
            self.broker_pid = hello.pid

    def _maybe_autostart(self, exc: OSError) -> _socket.socket:
        from . import autostart

        if self._explicit or not autostart.enabled(self._autostart):
            raise unavailable_error(self.path, self._explicit, exc) from None
        try:
            autostart.ensure_broker(self.path, timeout=self.timeout)
        except OSError as start_exc:
            raise autostart_failed(self.path, start_exc) from None
        try:
            return self._open_socket()
        except OSError as exc2:
            raise unavailable_error(self.path, self._explicit, exc2) from None

    # -------------------------------------------------------- reclaim

    def _ensure_watcher(self) -> None:
        if self._reclaim and self._watcher is None:
            with self._io:  # threads sharing the connection start one watcher
                if self._watcher is None:
                    self._watcher = threading.Thread(
                        target=self._watch, name="portlease-reclaim", daemon=True
                    )
                    self._watcher.start()

    def _watch(self) -> None:
        """Wait for the broker to hang up, then reconnect and reclaim.

        The socket is polled for POLLRDHUP only, not POLLIN: replies to calls
        must not wake this thread (that cost every round trip a thread switch).
        ``_drop_socket`` shuts a socket down before closing it, which wakes a
        poll that still waits on it, so the thread never sleeps on a dead socket.
        """
        hangup = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
        while not self._closed:
            sock = self._sock
            if sock is None:
                # Lost and not yet recovered (the broker is still away): retry.
                with self._io:
                    if self._closed:
                        return
                    if self._sock is None and self._leases:
                        self._recover_quietly()
                if self._sock is None:
                    select.select([self._wake_r], [], [], 0.1)
                continue
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            try:
                fd = sock.fileno()
                if fd < 0:
                    continue
                poller.register(fd, select.POLLRDHUP)
                events = poller.poll()
            except (OSError, ValueError):
                events = []
            if self._closed:
                return
            with self._io:
                if self._closed:
                    return
                if self._sock is not sock:
                    continue  # a call found the loss first and reconnected
                if not any(f == fd and ev & hangup for f, ev in events):
                    continue
                self._drop_socket()
                if self._leases:
                    self._recover_quietly()

    def _recover_quietly(self) -> None:
        """Recover from the watcher thread: failures are reported per lease, not raised."""
        # Every lease was already reported lost; the next call raises.
        with contextlib.suppress(PortleaseError):
            self._recover()

    def _recover(self) -> None:
        """Reconnect and reclaim every held lease (caller holds the I/O lock)."""
        self._drop_socket()
        leases = list(self._leases.values())
        # Keep trying for as long as the broker keeps orphans: the TTL backstop.
        deadline = time.monotonic() + max([lease.ttl for lease in leases] + [self.timeout])
        delay = 0.02
        while True:
            if self._closed:
                return
            try:
                self._connect()
                break
            except (BrokerUnavailable, ConnectionLost, OSError) as exc:
                if time.monotonic() >= deadline:
                    for lease in leases:
                        self._lose(lease, f"broker unreachable until the TTL lapsed: {exc}")
                    raise ConnectionLost(f"broker unreachable: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
        for lease in leases:
            try:
                self._call_reclaim(lease)
            except LeaseError as exc:
                self._lose(lease, f"reclaim refused: {exc}")

    def _call_reclaim(self, lease: Lease) -> None:
        reply = self._roundtrip(p.Reclaim(id=0, token=lease.token))
        if isinstance(reply, p.Error):
            raise error_class(reply.code)(reply.message)

    def _lose(self, lease: Lease, why: str) -> None:
        self._leases.pop(lease.token, None)
        self._lost.append(report_lost(lease, why, self._on_lost))


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
