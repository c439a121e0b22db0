"""The async client, for asyncio and trio alike: :func:`open_lease` and :func:`connect`.

A thin I/O shell on anyio over :class:`portlease.client.session.Session`, so
one implementation runs under both event loops (``anyio.connect_unix``, a task
group per connection).

One :class:`AsyncConnection` carries any number of concurrent requests: the
session gives each a fresh id, and a reader task in the connection's task group
hands every reply to the task waiting for it. The same task notices when the
broker hangs up (restart, upgrade, crash), reconnects, and reclaims every lease
with its token, pipelined with ``hello`` in one write. A lease that cannot be
reclaimed is reported on stderr, passed to ``on_lost``, marked on
:attr:`Lease.lost` and raised from the next :meth:`AsyncConnection.lease`.

Cancellation never strands a lease: a request cancelled after it was sent
stays registered, and if the broker grants it anyway the grant is released as
soon as the reply arrives. Leaving :func:`open_lease` or :func:`connect` for
any reason closes the socket, and the broker releases every lease bound to it;
before that, if a request nobody waits for any more could still be granting a
detached lease, the replies are read and such a grant released (shielded from
the cancellation, for at most :data:`~portlease.client.session.SETTLE_MAX`
seconds).
Exceptions come out as they were raised, never wrapped in an ``ExceptionGroup``.
"""

from __future__ import annotations

import contextlib
import functools
import socket as _socket
import sys
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any, TypeVar

try:
    import anyio
    import anyio.abc
    import anyio.lowlevel
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "the async portlease client needs anyio: pip install 'portlease[async]'"
    ) from exc

from . import paths
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
)

__all__ = ["AsyncConnection", "connect", "open_lease"]

T = TypeVar("T")

_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)


class AsyncConnection:
    """One connection to the broker, shared by any number of tasks.

    Get one from :func:`connect`. ``reclaim``: reconnect and reclaim leases
    when the broker restarts. ``on_lost(lease, exc)`` is called (in the
    connection's reader task, so it must not block) when a lease could not be
    kept. ``timeout`` bounds each request and each wait for a broker.
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
        self._s = Session(client or "portlease-async", on_lost=on_lost, timeout=timeout)
        self._stream: anyio.abc.SocketStream | None = None
        self._send_lock = anyio.Lock()
        self._closed = False
        self._fatal: LeaseError | None = None
        self._down = "not connected"
        self._reconnect: Reconnect | None = None  # kept across drops until a hello is answered
        # Set (and replaced) whenever a reconnect round ends, well or badly.
        self._round_done = anyio.Event()
        # Set when a caller needs a connection while none is up and no lease
        # makes the reader reconnect by itself.
        self._wanted = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

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
        return await self._call(self._s.lease(count, ttl=ttl, note=note, detach=detach))

    async def release(self, lease: Lease | str) -> None:
        """End a lease now (by object or token). Releasing twice is not an error."""
        call = self._s.release(lease)
        if call is not None:
            await self._call(call)

    async def renew(self, lease: Lease | str) -> float | None:
        """Push a detached lease's expiry forward; returns the new expiry."""
        return await self._call(self._s.renew(lease))

    async def detach(self, lease: Lease | str) -> float:
        """Unbind a lease from this connection: it then lives by its TTL alone."""
        return await self._call(self._s.detach(lease))

    async def reclaim(self, token: str) -> Lease:
        """Bind a detached or orphaned lease to this connection."""
        return await self._call(self._s.reclaim(token))

    async def status(self, **query: Any) -> p.StatusReply:
        """Every lease the broker holds, and a summary of the range."""
        return await self._call(self._s.status(**query))

    async def ping(self) -> None:
        """Round trip to the broker (reconnecting first if it restarted)."""
        await self._call(self._s.ping())

    async def metrics(self) -> str:
        """The broker's metrics, in the OpenMetrics text format (ends with ``# EOF``)."""
        return await self._call(self._s.metrics())

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

    def fileno(self) -> int:
        """The socket's file descriptor, or -1 while not connected."""
        stream = self._stream
        return _raw(stream).fileno() if stream is not None else -1

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (or the :func:`connect` block ended)."""
        return self._closed

    def close(self) -> None:
        """Close the connection; the broker releases every lease bound to it.

        Synchronous on purpose, so that it can run in ``finally`` blocks of
        cancelled tasks without a checkpoint.
        """
        if self._closed:
            return
        self._closed = True
        self._drop("the connection is closed")
        self._s.close()
        self._wanted.set()
        self._end_round()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # -------------------------------------------------------- requests

    async def _call(self, call: Call[T]) -> T:
        retry: Retry | None = None  # made once the socket drops under this call
        while True:
            stream = await self._connected(redial=retry is not None)
            fresh = self._s.hello_due
            try:
                await self._request(stream, call)
                return call.result()
            except Dropped:
                # Meanwhile the reader is reconnecting (and reclaiming).
                retry = retry or Retry(self._s, reclaim=self._reclaim)
                delay = None if self._closed else retry.after_drop(fresh=fresh, now=time.monotonic())
                if delay is None:
                    raise ConnectionLost(self._down) from None
                if delay:
                    await anyio.sleep(delay)
                call.error = None

    async def _connected(self, redial: bool = False) -> anyio.abc.SocketStream:
        """The live stream, waiting for a reconnect round if the broker hung up."""
        if self._closed:
            raise ConnectionLost("the connection is closed")
        if self._fatal is not None:
            raise self._fatal
        if self._stream is not None:
            return self._stream
        if not (self._reclaim or redial):
            raise ConnectionLost(self._down)
        round_done = self._round_done
        self._wanted.set()
        await round_done.wait()
        if self._fatal is not None:
            raise self._fatal
        if self._stream is None:
            raise ConnectionLost(self._down)
        return self._stream

    async def _request(self, stream: anyio.abc.SocketStream, call: Call[Any]) -> None:
        # Cancelled before anything was sent: nothing to undo.
        await anyio.lowlevel.checkpoint_if_cancelled()
        call.waiter = anyio.Event()
        try:
            # A cancelled send could leave half a line on the stream and corrupt
            # every later request; lines are tiny, so finish it. Ids are given
            # under the lock so that hello is always the first line written.
            with anyio.CancelScope(shield=True), anyio.fail_after(self.timeout):
                async with self._send_lock:
                    if stream is not self._stream:
                        raise anyio.ClosedResourceError
                    await stream.send(self._s.send(call))
        except (*_BROKEN, TimeoutError) as exc:
            if stream is self._stream:
                self._drop(f"cannot send to the broker: {exc!r}")
            if call.error is None:
                call.error = Dropped(f"connection to the broker lost: {exc!r}")
            return
        try:
            with anyio.fail_after(self.timeout):
                await call.waiter.wait()
        except TimeoutError:
            self._abandon(call)
            raise ConnectionLost(
                f"the broker at {self.path} did not answer within {self.timeout:g} s"
            ) from None
        except BaseException:
            self._abandon(call)
            raise

    def _abandon(self, call: Call[Any]) -> None:
        self._s.abandon(call)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._s.has_data_to_send and self._tg is not None and not self._closed:
            with contextlib.suppress(RuntimeError):  # task group already closing: same
                self._tg.start_soon(self._flush)

    async def _flush(self) -> None:
        """Send what the session wants sent (releases of abandoned grants).

        Shielded: it often runs just as the connection's task group is being
        cancelled, and a detached grant it gives back would otherwise be held
        until its TTL.
        """
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout), \
                contextlib.suppress(*_BROKEN):
            async with self._send_lock:
                stream = self._stream
                if stream is None:
                    return  # dropped connection: the broker released it already
                data = self._s.data_to_send()
                if data:
                    await stream.send(data)

    async def _settle(self) -> None:
        """Before the socket is closed on purpose: give back what abandoned requests were granted.

        The reader task has stopped by now, so this reads the replies itself.
        Shielded, since it runs as the caller's cancellation unwinds, and
        bounded, since a stopped broker must not hold the caller up.
        """
        stream = self._stream
        if stream is None or self._closed or not self._s.unsettled:
            return
        with anyio.CancelScope(shield=True), \
                anyio.move_on_after(min(self.timeout, SETTLE_MAX)), \
                contextlib.suppress(*_BROKEN, PortleaseError):
            async with self._send_lock:
                while self._s.unsettled and stream is self._stream:
                    data = self._s.data_to_send()
                    if data:
                        await stream.send(data)
                        continue
                    self._s.feed(await stream.receive(65536))
                    while (event := self._s.next_event()) is not None:
                        if isinstance(event, Call) and event.waiter is not None:
                            event.waiter.set()

    # -------------------------------------------------------- stream plumbing

    async def _dial(self, wait: float | None = None) -> anyio.abc.SocketStream:
        """Connect to the chosen socket, checked before and after; may wait or autostart."""
        choice = self._choice
        dialing = paths.Dialing(
            choice, autostart=self._autostart, max_delay=RECONNECT_MAX_DELAY,
            deadline=anyio.current_time() + (self.timeout if wait is None else wait),
        )
        while True:
            paths.check_directory(choice)
            try:
                stream = await anyio.connect_unix(choice.path)
            except OSError as exc:
                step = dialing.after_error(exc, anyio.current_time())
                if step == "autostart":
                    await self._autostart_broker()
                else:
                    await anyio.sleep(step)
                continue
            try:
                paths.check_peer(_raw(stream), choice)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                raise
            return stream

    async def _autostart_broker(self) -> None:
        from . import autostart

        start = functools.partial(autostart.ensure_broker, self.path, timeout=self.timeout)
        try:
            # Abandoned on cancel: the spawn finishes harmlessly in its thread.
            await anyio.to_thread.run_sync(start, abandon_on_cancel=True)
        except OSError as exc:
            raise paths.autostart_failed(self._choice, exc) from None

    async def _open(self) -> None:
        """The first connection, made before the reader task starts (hello rides on the first call)."""
        self._install(await self._dial())

    def _install(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream
        self._s.new_socket()

    def _drop(self, reason: str, error: BaseException | None = None) -> None:
        """Forget the stream; every request in flight fails (and may retry)."""
        self._down = f"connection to the broker lost: {reason}"
        stream, self._stream = self._stream, None
        if stream is not None:
            # shutdown() is synchronous and immediate: the broker releases the
            # leases now, and our reader's receive() ends. The reader or the
            # context manager closes the stream itself.
            with contextlib.suppress(OSError):
                _raw(stream).shutdown(_socket.SHUT_RDWR)
            if self._tg is not None:
                with contextlib.suppress(RuntimeError):
                    self._tg.start_soon(_aclose, stream)
        for call in self._s.connection_lost(reason, retry=not self._closed):
            if error is not None:
                call.error = error
            if call.waiter is not None:
                call.waiter.set()

    def _end_round(self) -> None:
        self._round_done.set()
        self._round_done = anyio.Event()

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
                        self._drop(reason, self._fatal)
                if self._fatal is not None or (not self._reclaim and self._s.broker_pid is not None):
                    self._end_round()
                    return
                if not self._s.leases:
                    # Nothing to keep: reconnect only when a caller needs it.
                    await self._wanted.wait()
                    if self._closed:
                        return
                await self._recover()
        except Exception:
            # A bug here must not tear down the caller's task group.
            print("portlease: the async client's connection task failed:", file=sys.stderr)
            traceback.print_exc()
            self._drop("the connection task failed")
            self._reclaim = False
            self._end_round()

    async def _read_replies(self, stream: anyio.abc.SocketStream) -> str:
        """Hand replies to their waiters until the stream ends; return why it ended."""
        while True:
            try:
                data = await stream.receive(65536)
            except anyio.EndOfStream:
                return "the broker closed the connection"
            except _BROKEN as exc:
                return f"read failed: {exc!r}"
            self._s.feed(data)
            try:
                while (event := self._s.next_event()) is not None:
                    if isinstance(event, Call) and event.waiter is not None:
                        event.waiter.set()
            except LeaseError as exc:
                self._fatal = exc
                return f"the broker refused hello: {exc}"
            except ConnectionLost as exc:
                return str(exc)
            if self._s.welcomed:
                self._reconnect = None
            self._flush_soon()

    async def _recover(self) -> None:
        """One reconnect round: reach a broker, or give the leases up at the deadline."""
        self._wanted = anyio.Event()
        round_ = self._reconnect = self._reconnect or Reconnect(self._s, anyio.current_time())
        while True:
            try:
                stream = await self._dial(wait=0)
                break
            except (BrokerUnavailable, OSError) as exc:
                if self._closed:
                    return
                step = round_.after_failure(exc, anyio.current_time())
                if isinstance(step, GiveUp):
                    self._down = f"broker unreachable: {exc}"
                    self._end_round()
                    return
                await anyio.sleep(step)
        if self._closed:
            await _aclose(stream)
            return
        self._install(stream)
        self._end_round()
        if self._s.leases and self._tg is not None:
            # Say hello now, not at the next call: it carries the reclaims.
            self._tg.start_soon(self._ping_quietly)

    async def _ping_quietly(self) -> None:
        with contextlib.suppress(PortleaseError):
            await self._call(self._s.ping())


def _raw(stream: anyio.abc.SocketStream) -> _socket.socket:
    sock: _socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    return sock


async def _aclose(stream: anyio.abc.SocketStream) -> None:
    with anyio.CancelScope(shield=True), contextlib.suppress(*_BROKEN):
        await stream.aclose()


@contextlib.asynccontextmanager
async def connect(
    socket: str | None = None,
    *,
    timeout: float = 30.0,
    reclaim: bool = True,
    on_lost: LostCallback | None = None,
    client: str | None = None,
    autostart: bool | None = None,
) -> AsyncIterator[AsyncConnection]:
    """Connect to the broker for the duration of an ``async with`` block.

    >>> async with connect() as conn:          # doctest: +SKIP
    ...     web = await conn.lease(1, note="web")
    ...     db = await conn.lease(2, note="db")

    Works under asyncio and trio. Every lease taken on the connection is
    released when the block ends (or the process dies). Exceptions from the
    block propagate unwrapped (not as an ``ExceptionGroup``). Raises
    :class:`BrokerUnavailable` when no broker answers (after starting the
    per-user one, unless a socket was configured or ``PORTLEASE_AUTOSTART=0``).
    """
    conn = AsyncConnection(
        socket, timeout=timeout, reclaim=reclaim, on_lost=on_lost, client=client,
        autostart=autostart,
    )
    await conn._open()
    stream = conn._stream
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            conn._tg = tg
            tg.start_soon(conn._run)
            try:
                yield conn
            except BaseException as exc:
                # Re-raised below, outside the task group, so that callers catch
                # their own exception rather than an ExceptionGroup around it.
                body_error = exc
            finally:
                # The reader stops; the socket stays open for _settle.
                tg.cancel_scope.cancel()
    finally:
        conn._tg = None
        await conn._settle()
        last = conn._stream
        conn.close()
        for opened in {id(s): s for s in (stream, last) if s is not None}.values():
            await _aclose(opened)
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

    The lease lives on a connection of its own (``hello`` and ``lease`` go out
    in one write), closed when the block ends for any reason, cancellation
    included, so the ports are never left held. The other arguments are those
    of :func:`connect`. Raises :class:`LeaseLost` at the end of the block if the
    lease was lost across a broker restart meanwhile.
    """
    async with connect(
        socket, timeout=timeout, reclaim=reclaim, on_lost=on_lost, autostart=autostart
    ) as conn:
        held = await conn.lease(count, ttl=ttl, note=note)
        yield held
        held.check()
