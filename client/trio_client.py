"""The trio client: :func:`open_lease` and :func:`connect`.

One :class:`TrioConnection` carries any number of concurrent requests: each
gets a fresh id, and a reader task in the connection's nursery hands every
reply to the task waiting for that id. The same task notices when the broker
hangs up (restart, upgrade, crash), reconnects, and reclaims every lease with
its token. A lease that cannot be reclaimed is reported on stderr, passed to
``on_lost``, marked on :attr:`Lease.lost` and raised from the next
:meth:`TrioConnection.lease`.

Cancellation never strands a lease: a request cancelled after it was sent
stays registered, and if the broker grants it anyway the reader task releases
the grant as soon as the reply arrives. Leaving :func:`open_lease` or
:func:`connect` for any reason closes the socket, and the broker releases
every lease bound to it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
import traceback
from collections.abc import AsyncIterator
from typing import TypeVar

import msgspec
import trio

from . import autostart
from . import protocol as p
from .errors import ConnectionLost, LeaseLost, NotFound, PortleaseError, error_class
from .grant import Lease, LostCallback, report_lost
from .paths import resolve_socket
from .sync import (
    RECONNECT_MAX_DELAY,
    autostart_failed,
    default_note,
    unavailable_error,
)

__all__ = ["TrioConnection", "connect", "open_lease"]

R = TypeVar("R", bound=p.Reply)

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Dropped(ConnectionLost):
    """The connection went away with the request in flight: worth one retry."""


class _Waiter:
    """A request awaiting its reply."""

    __slots__ = ("abandoned", "done", "error", "reply", "request")

    def __init__(self, request: p.Request) -> None:
        self.request = request
        self.done = trio.Event()
        self.reply: p.AnyReply | None = None
        self.error: ConnectionLost | None = None
        # The caller gave up (cancelled, timed out) after the request was sent:
        # whatever the broker granted must be undone when the reply arrives.
        self.abandoned = False


class TrioConnection:
    """One connection to the broker, shared by any number of trio tasks.

    Get one from :func:`connect`. ``reclaim``: reconnect and reclaim leases
    when the broker restarts. ``on_lost(lease, exc)`` is called (in the
    connection's reader task, so it must not block) when a lease could not be
    kept. ``timeout`` bounds each request and each attempt to reach a broker.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        timeout: float = 30.0,
        reclaim: bool = True,
        on_lost: LostCallback | None = None,
        client: str = "portlease-trio",
        autostart: bool | None = None,
    ) -> None:
        self.path, self._explicit = resolve_socket(socket)
        self.timeout = timeout
        self._reclaim = reclaim
        self._on_lost = on_lost
        self._client = client
        self._autostart = autostart
        self._ids = itertools.count(1)
        self._stream: trio.SocketStream | None = None
        self._rbuf = bytearray()
        self._send_lock = trio.Lock()
        self._waiters: dict[p.RequestId, _Waiter] = {}
        self._leases: dict[str, Lease] = {}
        self._lost: list[LeaseLost] = []
        self._closed = False
        self._down_reason = "not connected"
        # Set (and replaced) whenever a reconnect round ends, well or badly.
        self._round_done = trio.Event()
        # Set when a caller needs a connection while none is up and no lease
        # makes the reader reconnect by itself.
        self._wanted = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.broker_pid: int | None = None
        """Pid of the broker this connection last said hello to."""

    # -------------------------------------------------------- operations

    async def lease(
        self,
        count: int = 1,
        *,
        ttl: float | None = None,
        note: str | None = None,
        detach: bool = False,
    ) -> Lease:
        """Lease ``count`` consecutive ports, bound to this connection unless ``detach``.

        Raises a pending :class:`LeaseLost` first, if a lease of this
        connection was lost across a broker restart and not yet released.
        """
        self._raise_lost()
        request = p.Lease(
            id=0, count=count, ttl=ttl, note=note if note is not None else default_note(),
            detach=detach,
        )
        reply = await self._call(request, p.Granted)
        held = Lease(tuple(reply.ports), reply.token, reply.ttl, reply.expires)
        if not detach:
            self._leases[held.token] = held
        return held

    async def release(self, lease: Lease | str) -> None:
        """End a lease now (by object or token). Releasing twice is not an error."""
        token = lease if isinstance(lease, str) else lease.token
        if isinstance(lease, Lease) and lease.lost is not None:
            # The broker forgot the token; releasing acknowledges the loss.
            with contextlib.suppress(ValueError):
                self._lost.remove(lease.lost)
            lease.released = True
            return
        # Forget it first: if the broker restarts meanwhile, don't reclaim it.
        held = self._leases.pop(token, None)
        try:
            await self._call(p.Release(id=0, token=token), p.Released)
        except NotFound:
            if held is None and isinstance(lease, str):
                raise
        for obj in (held, lease):
            if isinstance(obj, Lease):
                obj.released = True

    async def renew(self, lease: Lease | str) -> float | None:
        """Push a detached lease's expiry forward; returns the new expiry."""
        token = lease if isinstance(lease, str) else lease.token
        reply = await self._call(p.Renew(id=0, token=token), p.Renewed)
        if isinstance(lease, Lease):
            lease.expires = reply.expires
        return reply.expires

    async def detach(self, lease: Lease | str) -> float:
        """Unbind a lease from this connection: it then lives by its TTL alone."""
        token = lease if isinstance(lease, str) else lease.token
        reply = await self._call(p.Detach(id=0, token=token), p.Detached)
        self._leases.pop(token, None)
        if isinstance(lease, Lease):
            lease.expires = reply.expires
        return reply.expires

    async def reclaim(self, token: str) -> Lease:
        """Bind a detached or orphaned lease to this connection."""
        reply = await self._call(p.Reclaim(id=0, token=token), p.Reclaimed)
        held = Lease(tuple(reply.ports), token, 0.0, None)
        self._leases[token] = held
        return held

    async def status(self) -> p.StatusReply:
        """Every lease the broker holds, and a summary of the range."""
        return await self._call(p.Status(id=0), p.StatusReply)

    async def ping(self) -> None:
        """Round trip to the broker (reconnecting first if it restarted)."""
        await self._call(p.Ping(id=0), p.Pong)

    @property
    def leases(self) -> list[Lease]:
        """Leases currently bound to this connection."""
        return list(self._leases.values())

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection; the broker releases every lease bound to it.

        Synchronous on purpose, so that it can run in ``finally`` blocks of
        cancelled tasks without a checkpoint.
        """
        if self._closed:
            return
        self._closed = True
        self._drop_stream("the connection is closed")
        for held in self._leases.values():
            held.released = True
        self._leases.clear()
        self._wanted.set()
        self._end_round()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -------------------------------------------------------- requests

    def _raise_lost(self) -> None:
        if self._lost:
            raise self._lost.pop(0)

    async def _call(self, request: p.Request, expect: type[R]) -> R:
        for attempt in (0, 1):
            stream = await self._connected()
            try:
                reply = await self._request(stream, request)
            except _Dropped:
                # Once: the reader task is reconnecting and reclaiming.
                if attempt or not self._reclaim or self._closed:
                    raise
                continue
            if isinstance(reply, p.Error):
                raise error_class(reply.code)(reply.message, largest=reply.largest)
            if not isinstance(reply, expect):
                raise ConnectionLost(f"unexpected reply {reply!r}")
            return reply
        raise AssertionError("unreachable")

    async def _connected(self) -> trio.SocketStream:
        """The live stream, waiting for a reconnect round if the broker hung up."""
        if self._closed:
            raise ConnectionLost("the connection is closed")
        if self._stream is not None:
            return self._stream
        if not self._reclaim:
            raise ConnectionLost(self._down_reason)
        round_done = self._round_done
        self._wanted.set()
        await round_done.wait()
        if self._stream is None:
            raise ConnectionLost(self._down_reason)
        return self._stream

    async def _request(self, stream: trio.SocketStream, request: p.Request) -> p.AnyReply:
        request.id = next(self._ids)
        waiter = _Waiter(request)
        # Cancelled before anything was sent: nothing to undo.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._waiters[request.id] = waiter
        try:
            # A cancelled send_all could leave half a line on the stream and
            # corrupt every later request; lines are tiny, so finish it.
            with trio.CancelScope(shield=True):
                with trio.fail_after(self.timeout):
                    async with self._send_lock:
                        await stream.send_all(p.encode(request))
        except (*_BROKEN, trio.TooSlowError) as exc:
            self._waiters.pop(request.id, None)
            if stream is self._stream:
                self._drop_stream(f"cannot send to the broker: {exc!r}")
            raise _Dropped(f"connection to the broker lost: {exc!r}") from None
        try:
            with trio.fail_after(self.timeout):
                await waiter.done.wait()
        except trio.TooSlowError:
            self._abandon(waiter)
            raise ConnectionLost(
                f"the broker at {self.path} did not answer within {self.timeout:g} s"
            ) from None
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.reply is not None
        return waiter.reply

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter.reply is not None:
            # The reply was in, but the cancellation won the race to us.
            self._undo(waiter)
        elif waiter.error is None:
            waiter.abandoned = True

    def _undo(self, waiter: _Waiter) -> None:
        """Give back what a request nobody waits for any more obtained."""
        reply, request = waiter.reply, waiter.request
        undo: p.Request
        if isinstance(reply, p.Granted):
            undo = p.Release(id=0, token=reply.token)
        elif isinstance(reply, p.Reclaimed) and isinstance(request, p.Reclaim):
            # Put it back the way it was: living by its TTL, reclaimable again.
            undo = p.Detach(id=0, token=request.token)
        else:
            return
        if self._nursery is None or self._closed:
            return  # the socket is gone, and the lease with it
        with contextlib.suppress(RuntimeError):  # nursery already closing: same
            self._nursery.start_soon(self._send_quietly, undo)

    async def _send_quietly(self, request: p.Request) -> None:
        stream = self._stream
        if stream is None:
            return  # dropped connection: the broker released it already
        with contextlib.suppress(PortleaseError):
            await self._request(stream, request)

    # -------------------------------------------------------- stream plumbing

    async def _read_line(self, stream: trio.SocketStream) -> bytes:
        while (line := p.take_line(self._rbuf)) is None:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionLost("the broker closed the connection")
            self._rbuf += data
        return line

    async def _open_stream(self) -> trio.SocketStream:
        try:
            return await trio.open_unix_socket(self.path)
        except OSError as exc:
            if self._explicit or not autostart.enabled(self._autostart):
                raise unavailable_error(self.path, self._explicit, exc) from None
        start = functools.partial(autostart.ensure_broker, self.path, timeout=self.timeout)
        try:
            # Abandoned on cancel: the spawn finishes harmlessly in its thread.
            await trio.to_thread.run_sync(start, abandon_on_cancel=True)
        except OSError as exc:
            raise autostart_failed(self.path, exc) from None
        try:
            return await trio.open_unix_socket(self.path)
        except OSError as exc:
            raise unavailable_error(self.path, self._explicit, exc) from None

    async def _handshake(
        self, stream: trio.SocketStream, tokens: list[str]
    ) -> tuple[p.Welcome, list[p.AnyReply]]:
        """Say hello and reclaim ``tokens``, pipelined, before the reader owns the stream."""
        requests: list[p.Request] = [
            p.Hello(id=next(self._ids), version=p.PROTOCOL_VERSION, client=self._client)
        ]
        requests += [p.Reclaim(id=next(self._ids), token=t) for t in tokens]
        replies: dict[p.RequestId, p.AnyReply] = {}
        self._rbuf.clear()
        with trio.fail_after(self.timeout):
            await stream.send_all(b"".join(p.encode(r) for r in requests))
            while len(replies) < len(requests):
                reply = p.decode_reply(await self._read_line(stream))
                if reply.id is None and isinstance(reply, p.Error):
                    raise error_class(reply.code)(reply.message)
                if reply.id is not None:
                    replies[reply.id] = reply
        hello = replies[requests[0].id]
        if isinstance(hello, p.Error):
            raise error_class(hello.code)(hello.message)
        if not isinstance(hello, p.Welcome):
            raise ConnectionLost(f"unexpected reply to hello: {hello!r}")
        return hello, [replies[r.id] for r in requests[1:]]

    async def _open(self) -> None:
        """The first connection, made before the reader task starts."""
        for attempt in (0, 1):
            stream = await self._open_stream()
            try:
                hello, _ = await self._handshake(stream, [])
            except (ConnectionLost, trio.BrokenResourceError):
                stream.socket.close()
                # An autostarted broker at its idle timeout may hang up just as
                # we arrive; the second try starts a new one.
                if attempt:
                    raise
                continue
            except BaseException:
                stream.socket.close()
                raise
            self._stream = stream
            self.broker_pid = hello.pid
            return

    def _drop_stream(self, reason: str) -> None:
        """Forget the stream; every request in flight fails (and may retry)."""
        self._down_reason = reason
        if self._stream is not None:
            self._stream.socket.close()
            self._stream = None
        self._rbuf.clear()
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.abandoned:
                waiter.error = (ConnectionLost if self._closed else _Dropped)(
                    f"connection to the broker lost: {reason}"
                )
                waiter.done.set()

    def _end_round(self) -> None:
        self._round_done.set()
        self._round_done = trio.Event()

    # -------------------------------------------------------- the connection task

    async def _run(self) -> None:
        """Read replies; when the broker hangs up, reconnect and reclaim."""
        try:
            while not self._closed:
                stream = self._stream
                if stream is not None:
                    reason = await self._read_replies(stream)
                    if self._closed:
                        return
                    if stream is self._stream:
                        self._drop_stream(reason)
                if not self._reclaim:
                    self._end_round()
                    return
                if not self._leases:
                    # Nothing to keep: reconnect only when a caller needs it.
                    await self._wanted.wait()
                    if self._closed:
                        return
                await self._recover()
        except Exception:
            # A bug here must not tear down the caller's nursery.
            print("portlease: the trio client's connection task failed:", file=sys.stderr)
            traceback.print_exc()
            self._drop_stream("the connection task failed")
            self._reclaim = False
            self._end_round()

    async def _read_replies(self, stream: trio.SocketStream) -> str:
        """Hand replies to their waiters until the stream ends; return why it ended."""
        while True:
            try:
                line = await self._read_line(stream)
            except ConnectionLost as exc:
                return str(exc)
            except _BROKEN as exc:
                return f"read failed: {exc!r}"
            try:
                reply = p.decode_reply(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not ours to interpret; the protocol has no unsolicited messages
            waiter = self._waiters.pop(reply.id, None) if reply.id is not None else None
            if waiter is None:
                continue
            waiter.reply = reply
            if waiter.abandoned:
                self._undo(waiter)
            else:
                waiter.done.set()

    async def _recover(self) -> None:
        """One reconnect round: reach a broker and reclaim every lease, or give up."""
        self._wanted = trio.Event()
        leases = list(self._leases.values())
        # Orphans stay reserved for their TTL; past that, trying is pointless.
        deadline = trio.current_time() + max([held.ttl for held in leases] + [self.timeout])
        delay = 0.02
        while True:
            stream: trio.SocketStream | None = None
            try:
                stream = await self._open_stream()
                hello, replies = await self._handshake(stream, [held.token for held in leases])
                break
            except (PortleaseError, OSError, trio.TooSlowError, trio.BrokenResourceError,
                    msgspec.DecodeError, msgspec.ValidationError) as exc:
                if stream is not None:
                    stream.socket.close()
                if self._closed:
                    return
                if trio.current_time() >= deadline:
                    for held in leases:
                        if held.token in self._leases:
                            self._lose(held, f"broker unreachable until the TTL lapsed: {exc}")
                    self._down_reason = f"broker unreachable: {exc}"
                    self._end_round()
                    return
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
        if self._closed:
            stream.socket.close()
            return
        self._stream = stream
        self.broker_pid = hello.pid
        for held, reply in zip(leases, replies, strict=True):
            if isinstance(reply, p.Error) and held.token in self._leases:
                self._lose(held, f"reclaim refused: {reply.code.value}: {reply.message}")
        self._end_round()

    def _lose(self, lease: Lease, why: str) -> None:
        self._leases.pop(lease.token, None)
        self._lost.append(report_lost(lease, why, self._on_lost))


@contextlib.asynccontextmanager
async def connect(
    socket: str | None = None,
    *,
    timeout: float = 30.0,
    reclaim: bool = True,
    on_lost: LostCallback | None = None,
    client: str = "portlease-trio",
    autostart: bool | None = None,
) -> AsyncIterator[TrioConnection]:
    """Connect to the broker for the duration of an ``async with`` block.

    >>> async with connect() as conn:          # doctest: +SKIP
    ...     web = await conn.lease(1, note="web")
    ...     db = await conn.lease(2, note="db")

    Every lease taken on the connection is released when the block ends (or
    the process dies). Exceptions from the block propagate unwrapped (not as
    an ``ExceptionGroup``). Raises :class:`BrokerUnavailable` when no broker
    answers (after starting the per-user one, unless a socket was configured
    or ``PORTLEASE_AUTOSTART=0``).
    """
    conn = TrioConnection(
        socket, timeout=timeout, reclaim=reclaim, on_lost=on_lost, client=client,
        autostart=autostart,
    )
    await conn._open()
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            conn._nursery = nursery
            nursery.start_soon(conn._run)
            try:
                yield conn
            except BaseException as exc:
                # Re-raised below, outside the nursery, so that callers catch
                # their own exception rather than an ExceptionGroup around it.
                body_error = exc
            finally:
                conn.close()
    finally:
        conn.close()
    if body_error is not None:
        raise body_error


@contextlib.asynccontextmanager
async def open_lease(
    count: int = 1,
    *,
    ttl: float | None = None,
    note: str | None = None,
    socket: str | None = None,
    timeout: float = 30.0,
    reclaim: bool = True,
    on_lost: LostCallback | None = None,
    autostart: bool | None = None,
) -> AsyncIterator[Lease]:
    """Lease ``count`` consecutive ports for the duration of an ``async with`` block.

    >>> async with open_lease(3) as ports:     # doctest: +SKIP
    ...     await start_postgres(ports[0])

    The lease lives on a connection of its own, closed when the block ends
    for any reason, cancellation included, so the ports are never left held.
    The other arguments are those of :func:`connect`. Raises :class:`LeaseLost` at the end of
    the block if the lease was lost across a broker restart meanwhile.
    """
    async with connect(
        socket, timeout=timeout, reclaim=reclaim, on_lost=on_lost, autostart=autostart
    ) as conn:
        held = await conn.lease(count, ttl=ttl, note=note)
        yield held
        held.check()
