"""The broker's request handling in-process, for faults that are hard to cause from outside."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from portlease.broker.config import Config
from portlease.broker.leases import Peer
from portlease.broker.notify import Notifier
from portlease.broker.server import Broker, Connection
from portlease.broker.state import Journal
from portlease.client import protocol as p


def make_broker(tmp_path: Path) -> Broker:
    broker = Broker(
        config=Config(port_min=31900, port_max=31909), journal=Journal(str(tmp_path / "s")),
        notifier=Notifier(), bind_ok=lambda port: True,
    )
    broker.restore()
    return broker


def call(broker: Broker, conn: Connection, line: bytes) -> p.Reply:
    return trio.run(broker.dispatch, conn, line)


def test_a_full_disk_refuses_the_grant_and_keeps_nothing(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    conn = Connection(id=1, peer=Peer(pid=1, uid=1000, gid=1000), hello=True)
    ok = call(broker, conn, b'{"op":"lease","id":1,"count":2}')
    assert isinstance(ok, p.Granted)
    # The journal's disk fills up: ENOSPC on every write, as /dev/full gives.
    os.close(broker.journal._fd)
    broker.journal._fd = os.open("/dev/full", os.O_WRONLY)
    refused = call(broker, conn, b'{"op":"lease","id":2,"count":2}')
    assert isinstance(refused, p.Error) and refused.code is p.ErrorCode.BUSY
    assert "cannot record leases" in refused.message
    # Only the first lease is held: the refused one was rolled back.
    assert broker.table.ports_held == 2 and len(broker.table) == 1
    assert broker.table.allocator.free_count == 8


def test_reclaim_shows_the_new_holder_but_keeps_the_uid(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    first = Connection(id=1, peer=Peer(pid=10, uid=1000, gid=1000), hello=True)
    granted = call(broker, first, b'{"op":"lease","id":1,"detach":true}')
    assert isinstance(granted, p.Granted)
    same_user = Connection(id=2, peer=Peer(pid=20, uid=1000, gid=1000), hello=True)
    line = b'{"op":"reclaim","id":2,"token":"%s"}' % granted.token.encode()
    assert isinstance(call(broker, same_user, line), p.Reclaimed)
    record = broker.table.get(granted.token)
    assert record is not None and record.peer.pid == 20
    assert broker.table.ports_of_uid(1000) == 1


def test_process_start_identifies_a_live_process_only() -> None:
    import subprocess

    from portlease.broker.server import owner_alive, process_started

    me = process_started(os.getpid())
    assert me is not None and me == process_started(os.getpid())
    assert owner_alive(Peer(pid=os.getpid(), started=me))
    child = subprocess.Popen(["true"])
    child.wait()
    assert process_started(child.pid) is None
    assert not owner_alive(Peer(pid=os.getpid(), started=me + "0"))  # same pid, other process
    assert not owner_alive(Peer(pid=os.getpid(), started=None))
