"""sd_notify through a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from portlease.broker.notify import Notifier

ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV:
        monkeypatch.delenv(var, raising=False)


class Manager:
    """The receiving end systemd would hold."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def pending(self) -> bytes | None:
        """A message already queued, without waiting for one."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(4096)
        except BlockingIOError:
            return None
        finally:
            self.sock.settimeout(5)


@pytest.fixture(params=["path", "abstract"])
def manager(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
    else:
        name = f"portlease-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield Manager(sock, address)
    sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_lifecycle_messages_arrive(manager: Manager) -> None:
    with Notifier() as n:
        assert n.enabled
        n.ready()
        assert manager.recv() == b"READY=1"
        n.ready("3 leases")
        assert manager.recv() == b"READY=1\nSTATUS=3 leases"
        n.status("2 leases, 20 ports held")
        assert manager.recv() == b"STATUS=2 leases, 20 ports held"
        n.watchdog()
        assert manager.recv() == b"WATCHDOG=1"
        n.extend_timeout(2.5)
        assert manager.recv() == b"EXTEND_TIMEOUT_USEC=2500000"
        n.stopping()
        assert manager.recv() == b"STOPPING=1"
    assert manager.pending() is None


def test_reloading_carries_the_monotonic_clock(manager: Manager) -> None:
    with Notifier() as n:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        first, second = manager.recv().split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_cannot_inject_assignments(manager: Manager) -> None:
    with Notifier() as n:
        n.status("evil\nMAINPID=1\r\nWATCHDOG=trigger")
        assert manager.recv() == b"STATUS=evil MAINPID=1 WATCHDOG=trigger"


def test_status_is_sent_as_utf8(manager: Manager) -> None:
    with Notifier() as n:
        n.status("ports 10000 to 10009 → ünïcode")
        assert manager.recv() == "STATUS=ports 10000 to 10009 → ünïcode".encode()
        n.status("bad \udcff surrogate")  # from a cmdline decoded with surrogateescape
        assert manager.recv() == b"STATUS=bad \\udcff surrogate"


# An unclosed socket reaches pytest as an unraisable ResourceWarning: make it fail.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("error::ResourceWarning")
def test_close_releases_the_socket_and_silences(manager: Manager) -> None:
    baseline = open_fds()
    n = Notifier()
    assert open_fds() == baseline + 1
    n.close()
    assert open_fds() == baseline
    assert not n.enabled
    n.ready()
    n.close()
    assert manager.pending() is None


def test_without_notify_socket_nothing_is_opened_or_sent() -> None:
    baseline = open_fds()
    n = Notifier()
    assert not n.enabled
    assert open_fds() == baseline
    n.ready()
    n.reloading()
    n.status("x")
    n.watchdog()
    n.extend_timeout(1)
    n.stopping()
    assert n.watchdog_interval() is None
    n.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("error::ResourceWarning")
def test_unreachable_socket_disables_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.DEBUG, logger="portlease.broker.notify"):
        n = Notifier()
        n.ready()
    assert not n.enabled
    assert "unreachable" in caplog.text


def test_manager_gone_after_start_is_logged_not_raised(
    manager: Manager, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier()
    manager.sock.close()
    with caplog.at_level(logging.DEBUG, logger="portlease.broker.notify"):
        n.watchdog()
    n.close()
    assert "WATCHDOG=1" in caplog.text
    assert "failed" in caplog.text


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("20000000", None, 10.0),
        ("1000000", "self", 0.5),
        ("1000000", "other", None),
        ("1000000", "garbage", None),
        (None, None, None),
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    manager: Manager, monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
    expected: float | None,
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        monkeypatch.setenv("WATCHDOG_PID", value)
    with Notifier() as n:
        assert n.watchdog_interval() == expected


def test_watchdog_interval_needs_somewhere_to_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert Notifier().watchdog_interval() is None
