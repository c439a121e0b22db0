"""The claims' copies in the service manager's fd store: what is stored, removed and retried.

Real parts: the broker's Notifier sends real datagrams with real SCM_RIGHTS to
bench/fdstore.py's stand-in manager, and the claims are real abstract names
(under a prefix of this test's own, so that no broker on the host is affected).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fdstore import StandInManager

from portlease.broker.claims import Claims, store_name
from portlease.broker.notify import Notifier

PREFIX = f"portlease-tests/claims-store/{os.getpid()}/"


def claimed(port: int) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(f"\0{PREFIX}{port}")
    except OSError as exc:
        assert exc.errno == errno.EADDRINUSE
        return True
    finally:
        probe.close()
    return False


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInManager]:
    m = StandInManager(tmp_path, capacity=1000)
    monkeypatch.setenv("NOTIFY_SOCKET", m.path)
    monkeypatch.setenv("FDSTORE", "1000")
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def notifier(manager: StandInManager) -> Iterator[Notifier]:
    """The broker's notifier, sending to the stand-in (``NOTIFY_SOCKET``, ``FDSTORE``)."""
    n = Notifier()
    try:
        yield n
    finally:
        n.close()


def fill_queue(manager: StandInManager) -> socket.socket:
    """Fill the manager's queue from another socket, as a busy PID 1 would leave it."""
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    flood.setblocking(False)
    with pytest.raises(BlockingIOError):
        while True:
            flood.sendto(b"STATUS=busy", manager.path)
    return flood


def store_of(manager: StandInManager) -> dict[str, int]:
    manager.pump()
    return {name: len(fds) for name, fds in manager.store.items()}


def granted(claims: Claims, start: int, count: int) -> None:
    """What the broker does for a grant: take the run's claims pending, then settle them."""
    for port in range(start, start + count):
        assert claims.take_pending(port)
    claims.settle([(start, count)])


def test_a_lease_is_stored_whole_and_removed_when_it_ends(
    manager: StandInManager, notifier: Notifier
) -> None:
    claims = Claims(PREFIX, store=notifier, capacity=notifier.fd_store_capacity)
    granted(claims, 100, 3)
    assert store_of(manager) == {store_name(100, 3): 3}
    claims.close()  # the broker stops: the stored copies keep the names bound
    assert all(claimed(p) for p in range(100, 103))
    claims.release_run(100, 3)
    assert store_of(manager) == {}
    assert not any(claimed(p) for p in range(100, 103))


def test_more_fds_than_one_message_carries_are_sent_in_parts(
    manager: StandInManager, notifier: Notifier
) -> None:
    claims = Claims(PREFIX, store=notifier, capacity=1000)
    granted(claims, 1000, 300)  # SCM_MAX_FD is 253
    assert store_of(manager) == {store_name(1000, 300): 300}
    assert sum(m.startswith("FDSTORE=1") for m in manager.messages) == 2
    claims.close()


def test_the_store_is_not_filled_past_its_capacity(manager: StandInManager, notifier: Notifier) -> None:
    claims = Claims(PREFIX, store=notifier, capacity=3)
    granted(claims, 200, 2)
    granted(claims, 300, 2)  # 4 > 3: held, not stored
    assert store_of(manager) == {store_name(200, 2): 2}
    assert claimed(300) and claims.stored == 2
    claims.release_run(200, 2)
    granted(claims, 400, 2)
    assert store_of(manager) == {store_name(400, 2): 2}
    claims.close()


def test_a_removal_the_manager_cannot_take_now_is_sent_again(
    manager: StandInManager, notifier: Notifier
) -> None:
    claims = Claims(PREFIX, store=notifier, capacity=1000)
    granted(claims, 500, 1)
    manager.pump()
    flood = fill_queue(manager)
    claims.release_run(500, 1)  # the removal cannot be sent: kept for later
    manager.pump()  # drains the queue (the flood), never saw the removal
    assert store_of(manager) == {store_name(500, 1): 1} and claimed(500)
    claims.retry()
    assert store_of(manager) == {} and not claimed(500)
    flood.close()


def test_a_lease_the_manager_cannot_take_now_is_stored_at_a_later_tick(
    manager: StandInManager, notifier: Notifier
) -> None:
    claims = Claims(PREFIX, store=notifier, capacity=1000)
    flood = fill_queue(manager)
    granted(claims, 550, 2)  # held, but not stored yet
    manager.pump()
    assert store_of(manager) == {} and claimed(550)
    claims.retry()
    assert store_of(manager) == {store_name(550, 2): 2}
    claims.close()
    flood.close()


@pytest.mark.parametrize("high_fd", [False, True], ids=["low-fd", "fd-above-FD_SETSIZE"])
def test_a_burst_of_grants_waits_for_a_manager_that_reads(
    manager: StandInManager, notifier: Notifier, high_fd: bool
) -> None:
    """The manager's queue holds few datagrams (net.unix.max_dgram_qlen); a burst longer than
    that waits for room while the manager reads, as PID 1 does, instead of losing leases.
    The broker holds thousands of fds, so the wait must work above select()'s 1024."""
    import resource
    import threading

    hogs: list[int] = []
    if high_fd:
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
            pytest.skip("needs an open-file limit above 1200")
        hogs = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]

    claims = Claims(PREFIX, store=notifier, capacity=1000)
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            manager.pump()
            time.sleep(0.005)  # slower than the burst: the queue fills

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for start in range(2000, 2100):
            granted(claims, start, 1)
    finally:
        done.set()
        reader.join()
        for fd in hogs:
            os.close(fd)
    assert len(store_of(manager)) == 100
    claims.close()


def test_restored_keeps_what_leases_hold_and_lets_go_of_the_rest(
    manager: StandInManager, notifier: Notifier
) -> None:
    first = Claims(PREFIX, store=notifier, capacity=1000)
    granted(first, 600, 2)
    granted(first, 700, 2)
    first.close()  # killed: only the store holds the names now
    manager.pump()
    passed_back = {name: [socket.socket(fileno=os.dup(fd)) for fd in fds]
                   for name, fds in manager.store.items()}
    second = Claims(PREFIX, store=notifier, capacity=1000)
    second.adopt(passed_back)
    assert 600 in second and 700 in second
    second.restored([(600, 2), (800, 1)])  # 700-701 ended meanwhile; 800 has no stored claim
    assert 700 not in second and 600 in second
    assert store_of(manager) == {store_name(600, 2): 2}  # 800 was not claimed here: not stored
    assert claimed(600) and not claimed(700)
    second.close()
