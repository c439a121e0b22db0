"""The async client against a real broker process, on asyncio and on trio: pipelining,
cancellation, reclaim."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from brokerproc import BrokerProc, Raw
from portlease.client import (
    AsyncConnection,
    BrokerUnavailable,
    ConnectionLost,
    Exhausted,
    Lease,
    LeaseLost,
    NotFound,
    TooLarge,
    connect,
    lease,
    open_lease,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every test of this module runs once per event loop."""
    return str(request.param)


def leases_of(sock: str) -> list[dict[str, object]]:
    raw = Raw(sock)
    try:
        return raw.call({"op": "status"})["leases"]  # type: ignore[return-value]
    finally:
        raw.close()


async def until(pred: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    with anyio.move_on_after(limit):
        while not pred():
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting until {what}")


async def test_open_lease_grants_consecutive_ports_and_releases_them(broker: BrokerProc) -> None:
    async with open_lease(3, socket=broker.socket, note="trio test") as ports:
        assert ports.ports == tuple(range(ports.port, ports.port + 3))
        assert ports[2] == ports.port + 2 and len(ports) == 3
        (info,) = leases_of(broker.socket)
        assert info["ports"] == list(ports.ports)
        assert info["note"] == "trio test" and info["pid"] == os.getpid()
        assert info["state"] == "attached"
    assert leases_of(broker.socket) == []
    assert ports.released


async def test_concurrent_requests_share_one_pipelined_connection(broker: BrokerProc) -> None:
    async with connect(broker.socket) as conn:
        got: list[Lease] = []

        async def one() -> None:
            got.append(await conn.lease(2))

        async with anyio.create_task_group() as nursery:
            for _ in range(30):
                nursery.start_soon(one)
        ports = [p for held in got for p in held]
        assert len(ports) == len(set(ports)) == 60
        status = await conn.status()
        assert status.summary.clients == 1 and status.summary.leases == 30
        assert {held.token for held in conn.leases} == {held.token for held in got}
        async with anyio.create_task_group() as nursery:
            for held in got:
                nursery.start_soon(conn.release, held)
        assert (await conn.status()).summary.leases == 0
        assert all(held.released for held in got)


async def test_detach_renew_reclaim_release_and_errors(broker: BrokerProc) -> None:
    async with connect(broker.socket) as a, connect(broker.socket) as b:
        held = await a.lease(2, ttl=30)
        expires = await a.detach(held)
        assert expires == held.expires and expires is not None
        assert a.leases == []
        assert await b.renew(held.token) is not None
        moved = await b.reclaim(held.token)
        assert moved.ports == held.ports and b.leases == [moved]
        await b.release(moved)
        await b.release(moved)  # twice is fine
        with pytest.raises(NotFound):
            await b.release(held.token)
        with pytest.raises(TooLarge):
            await a.lease(150)
        hog = await a.lease(60)
        with pytest.raises(Exhausted) as exc:
            await b.lease(60)
        assert exc.value.largest is not None and 0 < exc.value.largest <= 40
        await a.release(hog)
        # The connection is still usable after errors.
        await a.ping()
        await a.lease(1, detach=True)
    # The detached lease outlives its connection; nothing else does.
    assert [info["state"] for info in leases_of(broker.socket)] == ["detached"]


@pytest.mark.parametrize("detach", [False, True])
async def test_cancelled_request_whose_grant_arrives_later_is_released(
    broker: BrokerProc, detach: bool
) -> None:
    # The broker is stopped while the request sits in its socket, so the
    # cancellation certainly lands after the send and before the reply: the
    # window where a lease would otherwise be held by nobody (a detached one
    # even after the connection closed).
    assert broker.proc is not None
    pid = broker.proc.pid

    async def lease_four(conn: AsyncConnection) -> None:
        await conn.lease(4, detach=detach)

    async with connect(broker.socket) as conn:
        kept = await conn.lease(1)
        os.kill(pid, signal.SIGSTOP)
        try:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as nursery:
                    nursery.start_soon(lease_four, conn)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
            assert scope.cancelled_caught
        finally:
            os.kill(pid, signal.SIGCONT)

        def only_kept() -> bool:
            return [info["ports"] for info in leases_of(broker.socket)] == [list(kept.ports)]

        await until(only_kept, "the abandoned grant is released")
        assert conn.leases == [kept]
        await conn.ping()


async def test_cancellation_at_any_moment_strands_no_lease(broker: BrokerProc) -> None:
    """A detached grant that arrives after the caller was cancelled is released.

    Also when the same cancellation closes the connection: leaving ``connect``
    reads the outstanding reply and releases the grant before the socket
    closes. Random timeouts of 0-3 ms land anywhere in connect, hello, lease
    and close; 300 tries left dozens of one-hour leases on the broker before
    (bench/cancel_strand.py runs the long version).
    """
    rng = random.Random(20)
    got = 0
    async with connect(broker.socket) as cleaner:
        for _ in range(300):
            token = None
            with anyio.move_on_after(rng.uniform(0, 0.003)):
                async with connect(broker.socket) as conn:
                    token = (await conn.lease(1, detach=True, ttl=3600)).token
            if token is not None:
                got += 1  # the caller has it: it is the caller's to release
                await cleaner.release(token)
    stranded = leases_of(broker.socket)
    assert stranded == [], f"{len(stranded)} of {300 - got} cancelled tries stranded a lease"


async def test_cancel_inside_open_lease_leaves_nothing_held(broker: BrokerProc) -> None:
    assert broker.proc is not None
    pid = broker.proc.pid

    os.kill(pid, signal.SIGSTOP)
    try:
        with anyio.move_on_after(0.2) as scope:
            async with open_lease(2, socket=broker.socket):
                raise AssertionError("the broker is stopped; no grant can arrive")
        assert scope.cancelled_caught
    finally:
        os.kill(pid, signal.SIGCONT)
    await until(lambda: leases_of(broker.socket) == [], "the broker forgets the lease")

    # Cancelled with the lease in hand: same outcome.
    with anyio.CancelScope() as scope:
        async with open_lease(2, socket=broker.socket):
            assert len(leases_of(broker.socket)) == 1
            scope.cancel()
            await anyio.sleep(1)
    await until(lambda: leases_of(broker.socket) == [], "the lease is released")


async def test_exceptions_from_the_block_are_not_wrapped(broker: BrokerProc) -> None:
    with pytest.raises(KeyError):
        async with connect(broker.socket):
            raise KeyError("mine")
    with pytest.raises(ValueError, match="mine"):
        async with open_lease(socket=broker.socket):
            raise ValueError("mine")
    assert leases_of(broker.socket) == []


async def test_leases_are_reclaimed_in_the_background_after_a_broker_restart(
    broker: BrokerProc, capfd: pytest.CaptureFixture[str]
) -> None:
    lost: list[Lease] = []

    async with connect(broker.socket, on_lost=lambda held, exc: lost.append(held)) as conn:
        a, b = await conn.lease(2), await conn.lease(3)
        before = conn.broker_pid
        await anyio.to_thread.run_sync(broker.restart)

        def reclaimed() -> bool:
            infos = leases_of(broker.socket)
            return len(infos) == 2 and all(i["state"] == "attached" for i in infos)

        # No call on the connection: its own task reconnects and reclaims.
        await until(lambda: conn.broker_pid != before, "the connection is back")
        await until(reclaimed, "both leases are reclaimed")
        assert sorted(info["ports"] for info in leases_of(broker.socket)) == sorted(
            [list(a.ports), list(b.ports)]
        )
        assert {i["pid"] for i in leases_of(broker.socket)} == {os.getpid()}
        more = await conn.lease(1)
        assert not set(more.ports) & set(a.ports + b.ports)
        assert a.lost is None and b.lost is None

    assert lost == []
    assert "ERROR" not in capfd.readouterr().err


async def test_a_lease_that_cannot_be_reclaimed_is_reported_loudly(
    broker: BrokerProc, capfd: pytest.CaptureFixture[str]
) -> None:
    lost: list[tuple[Lease, LeaseLost]] = []

    async with connect(broker.socket, on_lost=lambda h, e: lost.append((h, e))) as conn:
        held = await conn.lease(2)
        # A broker that forgot everything (its journal deleted) cannot honour the token.
        broker.kill()
        os.unlink(broker.state)
        await anyio.to_thread.run_sync(broker.start)
        await until(lambda: bool(lost), "on_lost is called")
        assert lost[0][0] is held and held.lost is lost[0][1]
        assert held.lost.ports == held.ports
        with pytest.raises(LeaseLost):
            held.check()
        with pytest.raises(LeaseLost):
            await conn.lease(1)  # the next call raises it too (once)
        await conn.release(held)  # acknowledging it is not an error
        assert held.released
        await conn.lease(1)

    err = capfd.readouterr().err
    assert "portlease: ERROR: lease of ports" in err and "stop using these ports" in err


async def test_open_lease_raises_lease_lost_at_the_end_of_the_block(broker: BrokerProc) -> None:
    with pytest.raises(LeaseLost):
        async with open_lease(socket=broker.socket) as held:
            broker.kill()
            os.unlink(broker.state)
            await anyio.to_thread.run_sync(broker.start)
            await until(lambda: held.lost is not None, "the loss is noticed")


async def test_without_reclaim_a_hang_up_is_an_error(broker: BrokerProc) -> None:
    async with connect(broker.socket, reclaim=False) as conn:
        await conn.lease(1)
        await anyio.to_thread.run_sync(broker.restart)
        with pytest.raises(ConnectionLost):
            await conn.ping()


async def test_configured_socket_that_does_not_answer_is_an_error_not_an_autostart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORTLEASE_AUTOSTART", "1")
    sock = tmp_path / "nobody.sock"

    with pytest.raises(BrokerUnavailable) as exc:
        async with connect(str(sock)):
            pass
    assert str(sock) in str(exc.value) and "portlease serve" in str(exc.value)

    assert sorted(os.listdir(tmp_path)) == []  # no broker, no log, no lock


def test_no_event_loop_is_imported_by_the_sync_client_or_the_package(broker: BrokerProc) -> None:
    code = (
        "import sys, portlease.client as c\n"
        "from portlease.client import lease, Connection\n"
        f"with lease(2, socket={broker.socket!r}) as held:\n"
        "    held.socket()\n"
        "bad = sorted(m for m in ('trio', 'anyio', 'asyncio') if m in sys.modules)\n"
        "assert not bad, bad\n"
        "c.AsyncConnection\n"
        "assert 'anyio' in sys.modules\n"
        "assert c.TrioConnection is c.AsyncConnection\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class OneShotFake:
    """A fake broker for one connection that records its first read."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.first: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = conn.recv(65536)
            self.first.append(data)
            hello, lease = (json.loads(line) for line in data.splitlines())
            conn.sendall(json.dumps({"reply": "hello", "id": hello["id"], "version": 1,
                                     "broker": "fake", "pid": 1}).encode() + b"\n"
                         + json.dumps({"reply": "granted", "id": lease["id"], "ports": [40000],
                                       "token": "t", "ttl": 120.0}).encode() + b"\n")
            conn.recv(65536)  # until the client hangs up

    def first_write(self) -> list[str]:
        self.listener.close()
        self.thread.join(5)
        (data,) = self.first
        return [json.loads(line)["op"] for line in data.splitlines()]


async def test_hello_and_the_first_request_go_out_in_one_write(tmp_path: Path) -> None:
    """One round trip on a new connection: a fake broker sees both lines in its first read."""
    fake = OneShotFake(str(tmp_path / "fake.sock"))
    with anyio.fail_after(10):
        async with open_lease(1, socket=str(tmp_path / "fake.sock")) as held:
            assert held.ports == (40000,)
    assert fake.first_write() == ["hello", "lease"]


def test_the_sync_client_also_says_hello_in_its_first_write(tmp_path: Path) -> None:
    fake = OneShotFake(str(tmp_path / "fake.sock"))
    with lease(1, socket=str(tmp_path / "fake.sock"), timeout=10) as held:
        assert held.ports == (40000,)
    assert fake.first_write() == ["hello", "lease"]


async def test_an_async_server_serves_on_the_leased_socket(
    broker: BrokerProc, anyio_backend: str
) -> None:
    """The patterns docs/usage.md gives: asyncio.start_server(sock=...) and trio.SocketListener."""
    async with open_lease(1, socket=broker.socket) as held:
        sock = held.socket()
        if anyio_backend == "asyncio":
            import asyncio

            async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(await reader.read(16))
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(echo, sock=sock)
            async with server:
                reply = await anyio.to_thread.run_sync(_roundtrip, held.port)
        else:
            import trio

            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

            async def echo_trio(stream: trio.SocketStream) -> None:
                await stream.send_all(await stream.receive_some(16))
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, echo_trio, [listener])
                reply = await anyio.to_thread.run_sync(_roundtrip, held.port)
                nursery.cancel_scope.cancel()
        assert reply == b"ping"


def _roundtrip(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"ping")
        return client.recv(16)
