"""The connection driver (broker/connections.py) in this process, over real Unix sockets.

A small handler stands in for the broker (ping, large replies, requests answered
by a task, requests that fail), so each rule of the loop is checked on its own:
turns per uid, the bound on reply bytes per uid, the eventfd wake, the EMFILE
pause, a failing request, and the end of a half-closed connection. Clients are
real sockets in the same trio run; "uids" come from the driver's own
``session_for`` hook, which names each connection's uid after the abstract
address its client bound (one process cannot hold two real uids; the process
tests do that).

Counts, never times, are asserted; ``fail_after`` only turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from portlease.broker import connections
from portlease.broker.connections import Driver, Reply
from portlease.broker.core import Session
from portlease.broker.leases import Peer

HANG = 20.0
"""Seconds after which a test that waits for an event has hung."""
_tag = iter(range(1 << 30))


class Handler:
    """Answers ``{"op": ...}`` lines; remembers which uid each request came from, in order."""

    def __init__(self) -> None:
        self.served: list[int | None] = []
        """The uid of every request served, in order."""
        self.ids: list[Any] = []
        """The id of every request served, in order."""
        self.closed_ids: list[int] = []
        self.release = trio.Event()
        self.served_event: dict[int, trio.Event] = {}

    def opened(self, session: Session) -> bytes | None:
        return None

    def closed(self, session: Session) -> None:
        self.closed_ids.append(session.id)

    def turn_done(self) -> None:
        pass

    def request(self, session: Session, line: bytes) -> Reply:
        msg = json.loads(line)
        op, rid = msg["op"], msg.get("id")
        self.served.append(session.peer.uid)
        self.ids.append(rid)
        n = len(self.served)
        if n in self.served_event:
            self.served_event.pop(n).set()
        if op == "big":
            return reply(rid, "big", pad="x" * msg["size"])
        if op == "bug":
            raise RuntimeError("a bug in the handler")
        if op == "wait":
            async def later() -> bytes:
                await self.release.wait()
                return reply(rid, "waited")
            return later
        if op == "fail":
            async def failing() -> bytes:
                await trio.lowlevel.checkpoint()
                raise RecursionError("the share met a nesting bomb")
            return failing
        return reply(rid, "pong")

    def after(self, n: int) -> trio.Event:
        """An event set when the ``n``-th request is served (or already set)."""
        event = self.served_event.setdefault(n, trio.Event())
        if len(self.served) >= n:
            event.set()
        return event


def reply(rid: Any, what: str, **extra: Any) -> bytes:
    return json.dumps({"id": rid, "reply": what, **extra}).encode() + b"\n"


def line(op: str, rid: Any = None, **extra: Any) -> bytes:
    return json.dumps({"op": op, "id": rid, **extra}).encode() + b"\n"


def session_for(conn_id: int, sock: socket.socket) -> Session:
    name = sock.getpeername()
    uid = int(name.split(b"/")[1]) if isinstance(name, bytes) and name.startswith(b"\0drv/") else None
    return Session(id=conn_id, peer=Peer(uid=uid, pid=os.getpid()))


class Client:
    """A real client socket of ``uid`` (named by its abstract address), driven by trio."""

    def __init__(self, path: str, uid: int) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(f"\0drv/{uid}/{os.getpid()}/{next(_tag)}".encode())
        s.connect(path)
        self.raw = s
        self.sock = trio.socket.from_stdlib_socket(s)
        self.buf = b""

    def push(self, data: bytes) -> None:
        """Write at once, without letting the driver run (``data`` must fit the socket buffer)."""
        self.raw.sendall(data)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view):]

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = await self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"closed by the driver; pending {self.buf[:100]!r}")
            self.buf += chunk
        first, self.buf = self.buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(first)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "d.sock")


def listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(4096)
    return s


def serve(path: str, body: Callable[[Driver, Handler], Awaitable[None]], **kw: Any) -> Handler:
    """Run a driver on ``path`` and ``body(driver, handler)`` beside it, then stop it."""
    handler = Handler()

    async def main() -> None:
        lst = listener(path)
        driver = Driver(lst, handler, session_for, **kw)
        try:
            with trio.fail_after(HANG):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(driver.run)
                    await body(driver, handler)
                    nursery.cancel_scope.cancel()
        finally:
            lst.close()

    trio.run(main)
    return handler


# ---------------------------------------------------------------- turns per uid

FLOOD_CONNS = 200
DEPTH = 500
HONEST = 2000


def test_a_uid_with_many_connections_gets_one_uids_share(sock_path: str) -> None:
    """Issue 20: turns went per connection, so a uid with 200 connections got 200 turns
    to another uid's one (its p99 rose from 0.85 to 867 ms). Now both uids, each with
    work waiting all along, are served about equally: the other uid's 2,000 pipelined
    requests are all answered before the flooding uid has had twice that many (per
    connection it would have had about 200 times as many)."""
    async def body(driver: Driver, h: Handler) -> None:
        flood = [Client(sock_path, 1000) for _ in range(FLOOD_CONNS)]
        honest = Client(sock_path, 2000)
        # Every pipeline in place before the driver looks at any of them.
        for c in flood:
            c.push(line("ping") * DEPTH)
        honest.push(b"".join(line("ping", i) for i in range(HONEST)))
        for i in range(HONEST):  # read as they come, so its replies never wait
            assert (await honest.next())["id"] == i
        # From the honest uid's first turn (its connection is accepted behind the
        # flood's) to its last request.
        first, last = h.served.index(2000), h.ids.index(HONEST - 1)
        flooded = h.served[first:last].count(1000)
        # About one to one; twice as many leaves room for turns the honest uid
        # loses while its own reader lags (its connection is not read while a
        # reply of it waits), as it does on a loaded machine. Turns per
        # connection gave the flood about 55,000 here.
        assert flooded <= 2 * (HONEST + connections.LINES_PER_TURN), (flooded, first, last)
        assert len(h.served) < FLOOD_CONNS * DEPTH, "the flood must still be going on"
        for c in [*flood, honest]:
            c.close()

    serve(sock_path, body)


def test_connections_of_one_uid_take_turns(sock_path: str) -> None:
    """Within a uid, connections are served in turn: one connection's deep pipeline does
    not hold back its sibling's single request for longer than a turn."""
    async def body(driver: Driver, h: Handler) -> None:
        deep, single = Client(sock_path, 1000), Client(sock_path, 1000)
        deep.push(line("ping") * 2000)
        await h.after(40).wait()
        before = len(h.served)
        await single.send(line("ping", "one"))
        assert (await single.next())["id"] == "one"
        assert h.ids.index("one", before) - before <= connections.LINES_PER_TURN
        deep.close()
        single.close()

    serve(sock_path, body)


# ---------------------------------------------------------------- bounded pending replies per uid

BIG = 1 << 20
BOUND = 2 * BIG


def test_a_uid_that_does_not_read_stops_being_read_and_others_are_served(sock_path: str) -> None:
    """Issue 20: 1,000 connections of one uid each asked for a 700 kB page and never
    read: the broker held every reply (699 MB). Now a uid over its bound of pending
    reply bytes gets no turn (nothing more of it is read) until it reads, while
    another uid is served; then every reply arrives."""
    async def body(driver: Driver, h: Handler) -> None:
        hoarders = [Client(sock_path, 1000) for _ in range(20)]
        for c in hoarders:
            await c.send(line("big", 1, size=BIG))
        honest = Client(sock_path, 2000)
        for i in range(50):
            await honest.send(line("ping", i))
            assert (await honest.next())["id"] == i
            share = driver.share_of(1000)
            assert share is not None and share.pending <= BOUND + BIG
        await trio.testing.wait_all_tasks_blocked()
        answered = h.served.count(1000)
        assert answered < len(hoarders), "the hoarding uid must have been stopped"
        assert driver.pending <= BOUND + BIG
        # Once it reads, every connection gets its reply, whole.
        for c in hoarders:
            got = await c.next()
            assert got["reply"] == "big" and len(got["pad"]) == BIG
            c.close()
        assert h.served.count(1000) == len(hoarders)
        honest.close()

    serve(sock_path, body, pending_per_uid=BOUND, pending_total=8 * BOUND)


def test_a_connection_of_a_stopped_uid_that_closes_ends_at_once(sock_path: str) -> None:
    """While a uid is over its bound none of its connections gets a turn; one of them that
    closes meanwhile still ends at once (and with it its leases), not when the uid reads."""
    async def body(driver: Driver, h: Handler) -> None:
        hoarders = [Client(sock_path, 1000) for _ in range(6)]
        for c in hoarders:
            await c.send(line("big", 1, size=BIG))
        await trio.testing.wait_all_tasks_blocked()
        share = driver.share_of(1000)
        assert share is not None and share.blocked
        late = Client(sock_path, 1000)
        await late.send(line("ping", 2))
        await trio.testing.wait_all_tasks_blocked()
        assert h.ids.count(2) == 0 and len(driver) == 7  # not served: its uid is stopped
        late.close()
        with trio.fail_after(HANG):
            while len(driver) == 7:
                await trio.sleep(0.001)
        assert share.blocked and len(h.closed_ids) == 1
        for c in hoarders:
            assert (await c.next())["reply"] == "big"
            c.close()

    serve(sock_path, body, pending_per_uid=BOUND, pending_total=8 * BOUND)


def test_the_total_bound_serves_only_uids_with_nothing_pending(sock_path: str) -> None:
    """Two hoarding uids reach the total bound; a third uid that reads its replies is still served."""
    async def body(driver: Driver, h: Handler) -> None:
        a = [Client(sock_path, 1000) for _ in range(6)]
        b = [Client(sock_path, 1001) for _ in range(6)]
        for c in a + b:
            await c.send(line("big", 1, size=BIG))
        honest = Client(sock_path, 2000)
        for i in range(30):
            await honest.send(line("ping", i))
            assert (await honest.next())["id"] == i
        await trio.testing.wait_all_tasks_blocked()
        assert driver.pending <= BOUND + 2 * BIG
        assert h.served.count(1000) + h.served.count(1001) < len(a + b)
        for c in a + b:
            assert (await c.next())["reply"] == "big"
            c.close()
        honest.close()

    serve(sock_path, body, pending_per_uid=4 * BOUND, pending_total=BOUND)


# ---------------------------------------------------------------- tasks: the eventfd wake and failures


def test_a_reply_made_by_a_task_wakes_the_parked_loop_for_the_lines_behind_it(sock_path: str) -> None:
    """A request answered by a task (the share) while the loop is parked on its epoll fd:
    the reply goes out and the pipelined request behind it is served, which takes the
    eventfd wake (no socket event is left to wake the loop)."""
    async def body(driver: Driver, h: Handler) -> None:
        c = Client(sock_path, 1000)
        await c.send(line("wait", 1) + line("ping", 2))
        await h.after(1).wait()
        await trio.testing.wait_all_tasks_blocked()  # the loop is parked
        h.release.set()
        assert await c.next() == {"id": 1, "reply": "waited"}
        assert await c.next() == {"id": 2, "reply": "pong"}
        c.close()

    serve(sock_path, body)


@pytest.mark.parametrize("op", ["fail", "bug"], ids=["task", "handler"])
def test_a_request_that_raises_is_answered_internal_and_serving_goes_on(sock_path: str, op: str) -> None:
    """Issue 21: an exception in a task the driver waits for ended the driver's nursery,
    and with it the broker. Now that request is answered ``internal`` (id null: the
    oldest unanswered request, this one) and the connection and the driver go on."""
    async def body(driver: Driver, h: Handler) -> None:
        c, other = Client(sock_path, 1000), Client(sock_path, 2000)
        await c.send(line(op, 1) + line("ping", 2))
        got = await c.next()
        assert got["reply"] == "error" and got["code"] == "internal" and got["id"] is None, got
        assert await c.next() == {"id": 2, "reply": "pong"}
        await other.send(line("ping", 3))
        assert await other.next() == {"id": 3, "reply": "pong"}
        assert len(driver) == 2
        c.close()
        other.close()

    serve(sock_path, body)


# ---------------------------------------------------------------- half-close


def test_a_half_closed_connection_is_answered_and_kept_until_it_closes(sock_path: str) -> None:
    """Issue 20: after shutdown(SHUT_WR) the client still reads; the connection (and so
    its leases) ends only when it closes, not at the end of its input."""
    async def body(driver: Driver, h: Handler) -> None:
        c = Client(sock_path, 1000)
        await c.send(line("ping", 1) + line("ping", 2))
        c.sock.shutdown(socket.SHUT_WR)
        assert await c.next() == {"id": 1, "reply": "pong"}
        assert await c.next() == {"id": 2, "reply": "pong"}
        await trio.testing.wait_all_tasks_blocked()
        assert len(driver) == 1 and h.closed_ids == []
        c.close()
        while not h.closed_ids:
            await trio.sleep(0.001)
        assert len(driver) == 0

    serve(sock_path, body)


def test_a_line_too_long_still_closes_the_connection(sock_path: str) -> None:
    async def body(driver: Driver, h: Handler) -> None:
        c = Client(sock_path, 1000)
        await c.send(b"x" * 20000)
        got = await c.next()
        assert got["code"] == "line-too-long"
        try:
            rest = await c.sock.recv(10)
        except ConnectionResetError:  # it closed with our unread bytes still queued
            rest = b""
        assert rest == b""
        c.close()

    serve(sock_path, body)


# ---------------------------------------------------------------- EMFILE

_CHILD = textwrap.dedent("""
    import os, resource, sys, trio
    sys.path[:0] = sys.argv[3:]
    import test_driver as t
    from portlease.broker.connections import Driver
    lst = t.listener(sys.argv[1])
    driver = Driver(lst, t.Handler(), t.session_for)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(driver.run)
            await trio.sleep(0.05)
            limit = max(map(int, os.listdir("/proc/self/fd"))) + 1 + int(sys.argv[2])
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            print("ready", flush=True)
            while (await trio.to_thread.run_sync(sys.stdin.readline)).strip() == "pauses":
                print(driver.accept_pauses, len(driver), flush=True)
            n.cancel_scope.cancel()
    trio.run(main)
""")


def test_emfile_pauses_accept_and_serving_resumes_when_fds_free(sock_path: str) -> None:
    """A driver in a child process under a low RLIMIT_NOFILE: accept() meets EMFILE, the
    listener rests (the loop keeps serving the connections it has), and connections
    waiting in the backlog are served once others close."""
    room = 20  # descriptors the child has for connections (and listdir) after start
    here = str(Path(__file__).parent)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, sock_path, str(room), here, *sys.path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        clients = []
        for i in range(60):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(HANG)
            s.connect(sock_path)
            s.sendall(line("ping", i))
            clients.append(s)
        # Connections the child has accepted answer; wait until it has met its limit.
        for _ in range(int(HANG / 0.05)):
            child.stdin.write("pauses\n")
            child.stdin.flush()
            pauses, held = map(int, child.stdout.readline().split())
            if pauses:
                break
            time.sleep(0.05)
        assert pauses > 0 and 0 < held < 60, (pauses, held)
        # Close the answered ones: the rest are accepted and answered in turn.
        answered = 0
        for i, s in enumerate(clients):
            got = json.loads(s.makefile("rb").readline())
            assert got == {"id": i, "reply": "pong"}
            answered += 1
            s.close()
        assert answered == 60
        child.stdin.write("stop\n")
        child.stdin.flush()
        _, err = child.communicate(timeout=HANG)
        assert "cannot accept connections" in err and "pausing" in err, err[-2000:]
        assert "Traceback" not in err, err[-4000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
