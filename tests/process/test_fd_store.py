"""Claims kept in the service manager's fd store outlive a broker that is killed.

Without the store, a broker's host-wide claims die with it, and until the next
broker takes them again another user's broker may grant those ports. Here the
manager is bench/fdstore.py's stand-in (real datagrams, real SCM_RIGHTS, real
SIGKILL); tests/system runs the same against systemd.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fdstore import StandInManager

from brokerproc import PYTHON
from portlease.client import Connection
from portlease.client.host import procnet


def claimed_elsewhere(port: int) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(f"\0portlease/port/{port}")
    except OSError as exc:
        assert exc.errno == errno.EADDRINUSE, exc
        return True
    finally:
        probe.close()
    return False


def claim_inodes(ports: list[int]) -> dict[int, int]:
    found = procnet.port_claims(min(ports), max(ports))
    return {port: found[port].inode for port in ports if port in found}


def until(pred: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


class Setup:
    def __init__(self, tmp_path: Path, port_range: str) -> None:
        self.dir = tmp_path
        self.path = str(tmp_path / "broker.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(64)
        self.manager = StandInManager(tmp_path)
        self.command = [PYTHON, "-m", "portlease", "serve", "--state", str(tmp_path / "state.jsonl"),
                        "--range", port_range]
        self.log = open(tmp_path / "broker.log", "ab")  # noqa: SIM115
        self.broker: subprocess.Popen[bytes] | None = None

    def start(self, *, stored_first: bool = False) -> None:
        self.broker = self.manager.start(self.listener, self.command, self.log,
                                         stored_first=stored_first)

    def kill(self) -> None:
        assert self.broker is not None
        self.broker.kill()
        self.broker.wait()

    def stored(self, name: str, count: int) -> bool:
        self.manager.pump()
        return len(self.manager.store.get(name, ())) == count

    def close(self) -> None:
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            self.broker.wait(10)
        self.manager.close()
        self.listener.close()
        self.log.close()


@pytest.fixture
def setup(tmp_path: Path, port_range: str) -> Iterator[Setup]:
    s = Setup(tmp_path, port_range)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("stored_first", [False, True], ids=["socket-first", "stored-fds-first"])
def test_claims_outlive_a_killed_broker_and_the_next_one_takes_the_same_sockets(
    setup: Setup, stored_first: bool
) -> None:
    setup.start()
    with Connection(setup.path, timeout=20) as conn:
        lease = conn.lease(3)
        ports = list(lease.ports)
        name = f"claims-{ports[0]}-3"
        until(lambda: setup.stored(name, 3), f"the broker to store {name}")
        before = claim_inodes(ports)
        assert sorted(before) == ports

        setup.kill()
        # The gap: no broker runs, yet no other broker on the host can claim the ports.
        assert all(claimed_elsewhere(port) for port in ports)
        assert claim_inodes(ports) == before

        setup.start(stored_first=stored_first)
        # The next call reconnects, and the lease is reclaimed on the new broker.
        assert [info.ports for info in conn.status().leases] == [ports]
        assert lease.lost is None
        # The new broker holds the very sockets the first one stored: no new claim was made.
        assert claim_inodes(ports) == before
        assert setup.stored(name, 3)

        conn.release(lease)
        until(lambda: setup.stored(name, 0), f"the broker to remove {name} from the store")
        assert not any(claimed_elsewhere(port) for port in ports)


def test_stored_claims_no_lease_holds_are_released_at_start(setup: Setup) -> None:
    setup.start()
    conn = Connection(setup.path, timeout=20)
    lease = conn.lease(2, detach=True, ttl=60)
    ports = list(lease.ports)
    name = f"claims-{ports[0]}-2"
    until(lambda: setup.stored(name, 2), f"the broker to store {name}")
    conn.close()
    setup.kill()
    (setup.dir / "state.jsonl").unlink()  # the journal is lost: nothing holds those claims now
    setup.start()
    # The manager closes its copies once the broker asks (systemd does it as it reads).
    until(lambda: setup.stored(name, 0), f"the new broker to remove {name} from the store")
    assert not any(claimed_elsewhere(port) for port in ports)
    # And they can be granted again.
    with Connection(setup.path, timeout=20) as again:
        assert again.lease(2).ports == lease.ports


def test_without_a_store_the_claims_die_with_the_broker(setup: Setup) -> None:
    """What the store is for: the same kill without it leaves the ports unclaimed."""
    setup.manager.capacity = 0  # FDSTORE=0: the broker stores nothing
    setup.start()
    with Connection(setup.path, timeout=20) as conn:
        ports = list(conn.lease(2).ports)
        assert all(claimed_elsewhere(port) for port in ports)
        setup.kill()
        assert not any(claimed_elsewhere(port) for port in ports)
        setup.manager.pump()
        assert setup.manager.store == {}
