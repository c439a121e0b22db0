"""Leases survive a broker crash: clients reconnect and reclaim them with their tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerproc import PYTHON, BrokerProc, Raw
from portlease.client import Connection, Exhausted

TTL = "2"

# A client process: leases 2 ports, then answers every line on stdin with
# what it believes it holds (after a round trip, so its reconnect is done).
CLIENT = r"""
import json, sys
from portlease.client import Connection
lost = []
conn = Connection(sys.argv[1], on_lost=lambda lease, exc: lost.append(str(exc)))
held = conn.lease(2, note="client " + sys.argv[2])
print(json.dumps({"ports": list(held.ports), "broker": conn.broker_pid}), flush=True)
for _ in sys.stdin:
    conn.ping()
    print(json.dumps({"ports": list(held.ports), "broker": conn.broker_pid, "lost": lost,
                      "leases": [list(l.ports) for l in conn.leases]}), flush=True)
"""


def status(sock: str) -> list[dict[str, object]]:
    raw = Raw(sock)
    try:
        return raw.call({"op": "status"})["leases"]  # type: ignore[return-value]
    finally:
        raw.close()


def wait_for(pred, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


@pytest.fixture
def short_ttl_broker(tmp_path: Path, port_range: str) -> Iterator[BrokerProc]:
    b = BrokerProc(tmp_path, ["--ttl", TTL], range=port_range).start()
    try:
        yield b
    finally:
        b.stop()


def test_twenty_clients_reclaim_their_leases_after_a_broker_sigkill(
    short_ttl_broker: BrokerProc,
) -> None:
    broker = short_ttl_broker
    clients = [
        subprocess.Popen([PYTHON, "-c", CLIENT, broker.socket, str(i)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(20)
    ]
    try:
        first = []
        for proc in clients:
            assert proc.stdout is not None
            first.append(json.loads(proc.stdout.readline()))
        held = {proc.pid: tuple(f["ports"]) for proc, f in zip(clients, first, strict=True)}
        all_ports = [p for ports in held.values() for p in ports]
        assert len(all_ports) == len(set(all_ports)) == 40

        broker.kill()
        # Five clients die while the broker is down: nobody will reclaim theirs.
        dead, alive = clients[:5], clients[5:]
        for proc in dead:
            proc.kill()
            proc.wait()
        broker.start()

        # While the survivors reclaim, a newcomer never gets a port that any
        # of the 20 leases held: the restored ones stay reserved as orphans.
        with Connection(broker.socket, reclaim=False) as newcomer:
            fresh = [p for _ in range(30) for p in newcomer.lease(1).ports]
            assert not set(fresh) & set(all_ports)

            def survivors_attached() -> bool:
                attached = {tuple(i["ports"]): i["pid"] for i in status(broker.socket)  # type: ignore[arg-type, misc]
                            if i["state"] == "attached" and i["pid"] != os.getpid()}
                return attached == {held[proc.pid]: proc.pid for proc in alive}

            wait_for(survivors_attached, "every survivor reclaimed its own lease")

            for proc in alive:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("report\n")
                proc.stdin.flush()
                report = json.loads(proc.stdout.readline())
                assert report["lost"] == []
                assert report["leases"] == [list(held[proc.pid])]
                assert report["broker"] == broker.proc.pid  # type: ignore[union-attr]

            dead_ports = {p for proc in dead for p in held[proc.pid]}

            def dead_ones_expired() -> bool:
                leased = {p for i in status(broker.socket) for p in i["ports"]}  # type: ignore[attr-defined]
                return not leased & dead_ports

            wait_for(dead_ones_expired, f"the dead clients' orphans expire after {TTL} s")

            # Now their ports are grantable again, and still nobody else's are.
            more: set[int] = set()
            with pytest.raises(Exhausted):
                while True:
                    more |= set(newcomer.lease(1).ports)
            assert not more & {p for proc in alive for p in held[proc.pid]}
            assert not more & set(fresh)
            assert dead_ports <= more
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate(timeout=30)
            assert proc in clients[:5] or "ERROR" not in err, err


def test_the_wrapper_keeps_its_lease_across_a_broker_restart(
    short_ttl_broker: BrokerProc,
) -> None:
    broker = short_ttl_broker
    env = dict(os.environ, PORTLEASE_AUTOSTART="0")
    wrapper = subprocess.Popen(
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "-n", "2", "--",
         "sh", "-c", 'echo "$PORTLEASE_PORTS"; read _; echo "$PORTLEASE_PORTS"'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert wrapper.stdin is not None and wrapper.stdout is not None
    ports = [int(p) for p in wrapper.stdout.readline().split()]
    assert len(ports) == 2
    broker.restart()

    def reattached() -> bool:
        return [(i["ports"], i["pid"], i["state"]) for i in status(broker.socket)] == [
            (ports, wrapper.pid, "attached")
        ]

    # Well past the 2 s TTL: an orphan that was not reclaimed would be gone.
    time.sleep(float(TTL) + 1)
    wait_for(reattached, "the wrapper reclaimed its lease")
    out, err = wrapper.communicate("done\n", timeout=30)
    assert wrapper.returncode == 0, err
    assert "ERROR" not in err
    assert out.split() == [str(p) for p in ports]
    wait_for(lambda: status(broker.socket) == [], "the lease ends with the command")


def test_a_lease_the_restarted_broker_no_longer_holds_is_reported_lost(
    short_ttl_broker: BrokerProc,
) -> None:
    broker = short_ttl_broker
    proc = subprocess.Popen([PYTHON, "-c", CLIENT, broker.socket, "x"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    ports = json.loads(proc.stdout.readline())["ports"]
    # The broker comes back without the lease (its state was lost), and hands
    # the ports to someone else before the client can reclaim them.
    proc.send_signal(signal.SIGSTOP)
    try:
        broker.kill()
        os.unlink(broker.state)
        broker.start()
        with Connection(broker.socket, reclaim=False) as other:
            taken = other.lease(2)
            assert list(taken.ports) == ports or not set(taken.ports) & set(ports)
    finally:
        proc.send_signal(signal.SIGCONT)
    proc.stdin.write("report\n")
    proc.stdin.flush()
    report = json.loads(proc.stdout.readline())
    assert len(report["lost"]) == 1 and "lost after a broker restart" in report["lost"][0]
    assert report["leases"] == []
    _, err = proc.communicate("", timeout=30)
    assert "portlease: ERROR: lease of ports" in err


def test_leases_survive_restart_after_restart_with_no_call_between(broker: BrokerProc) -> None:
    """The reclaim thread watches each new connection, whoever noticed the last loss."""
    with Connection(broker.socket) as conn:
        held = conn.lease(2)
        for round_ in range(3):
            broker.restart()
            if round_ == 1:
                conn.ping()  # this time a call may meet the dead socket first
            deadline = time.monotonic() + 10
            while True:
                leases = Raw(broker.socket).call({"op": "status"})["leases"]
                states = [i["state"] for i in leases if i["ports"] == list(held.ports)]  # type: ignore[union-attr, index]
                if states == ["attached"]:
                    break
                assert time.monotonic() < deadline, f"not reclaimed after restart {round_}: {states}"
                time.sleep(0.02)
        assert held.lost is None


def test_orphan_of_a_process_that_cannot_reclaim_is_kept_while_it_lives(
    tmp_path: Path, ten_ports: str
) -> None:
    """A client stopped across a restart keeps its ports until it is really gone."""
    from brokerproc import BrokerProc

    b = BrokerProc(tmp_path, ["--ttl", "1"], range=ten_ports).start()
    holder = subprocess.Popen(
        [PYTHON, "-c", "import sys, time\nfrom portlease.client import Connection\n"
         f"c = Connection({b.socket!r}, reclaim=False)\nprint(*c.lease(2).ports, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None
        ports = [int(x) for x in holder.stdout.readline().split()]
        holder.send_signal(signal.SIGSTOP)
        b.restart()
        time.sleep(2.5)  # well past the 1 s TTL: a dead owner's orphan would be gone
        leases = Raw(b.socket).call({"op": "status"})["leases"]
        assert [(i["ports"], i["state"]) for i in leases] == [(ports, "orphaned")]  # type: ignore[union-attr, index]
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 5
        while Raw(b.socket).call({"op": "status"})["leases"]:
            assert time.monotonic() < deadline, "orphan of a dead process kept"
            time.sleep(0.05)
    finally:
        if holder.poll() is None:
            holder.kill()
        b.stop()


THREADS = r"""
import json, sys, threading
from portlease.client import Connection, lease

started, joined = [], []
real_start, real_join = threading.Thread.start, threading.Thread.join
def start(self, *a, **k):
    started.append(self.name)
    return real_start(self, *a, **k)
def join(self, *a, **k):
    joined.append(self.name)
    return real_join(self, *a, **k)
threading.Thread.start, threading.Thread.join = start, join

sock = sys.argv[1]
with lease(1, socket=sock):
    pass
first = list(started)
for _ in range(50):
    with lease(1, socket=sock) as held:
        assert held.port
conns = [Connection(sock) for _ in range(10)]
for c in conns:
    c.lease(1)
for c in conns:
    c.close()
print(json.dumps({"first": first, "after": started[len(first):], "joined": joined,
                  "alive": sorted(t.name for t in threading.enumerate())}))
"""


def test_one_watcher_thread_serves_every_connection_and_nothing_is_joined(
    broker: BrokerProc,
) -> None:
    out = subprocess.run([PYTHON, "-c", THREADS, broker.socket], capture_output=True, text=True,
                         timeout=60, check=True)
    report = json.loads(out.stdout)
    assert report["first"] == ["portlease-reclaim"]  # the process's first lease starts it
    assert report["after"] == []  # no later `with lease()` or Connection starts a thread
    assert report["joined"] == []  # and close() never waits for one
    assert report["alive"] == ["MainThread", "portlease-reclaim"]


def test_many_connections_in_one_process_are_all_reclaimed_by_the_one_watcher(
    broker: BrokerProc,
) -> None:
    conns = [Connection(broker.socket) for _ in range(8)]
    try:
        held = [c.lease(1) for c in conns]
        broker.restart()
        wait_for(lambda: sorted(i["state"] for i in status(broker.socket)) == ["attached"] * 8,
                 "all eight connections reclaimed their lease without a call")
        assert sorted(tuple(i["ports"]) for i in status(broker.socket)) == sorted(  # type: ignore[arg-type]
            h.ports for h in held)
        assert all(h.lost is None for h in held)
    finally:
        for c in conns:
            c.close()
    wait_for(lambda: status(broker.socket) == [], "closing released everything")


def test_a_call_survives_a_broker_that_goes_down_twice_under_it(tmp_path: Path, ten_ports: str) -> None:
    """A renew in flight when the broker dies, whose retry then lands in the queue of a
    listener that is going away too (socket activation replacing the broker): the
    call waits for the next broker instead of failing."""
    import socket as _socket
    import struct
    import threading

    path = str(tmp_path / "broker.sock")
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    state = str(tmp_path / "state.jsonl")
    cmd = [PYTHON, "-m", "portlease", "serve", "--state", state, "--range", ten_ports]
    fd = listener.fileno()
    first = subprocess.Popen(  # socket activation by hand: the listener as fd 3
        ["bash", "-c", f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "bash", *cmd],
        pass_fds=[fd], stdin=subprocess.DEVNULL,
    )
    second: subprocess.Popen[bytes] | None = None
    try:
        conn = Connection(path, timeout=20)
        held = conn.lease(2, detach=True, ttl=30)
        first.kill()
        first.wait()
        result: dict[str, object] = {}

        def renew() -> None:
            try:
                result["expires"] = conn.renew(held)
            except Exception as exc:
                result["error"] = exc

        caller = threading.Thread(target=renew)
        caller.start()
        # The retry reaches the old listener's queue; the "broker" that takes it dies at once.
        listener.settimeout(10)  # the broker left the shared file description non-blocking
        queued, _ = listener.accept()
        queued.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 1, 0))
        queued.recv(65536)
        queued.close()  # a reset, as from a broker killed with requests queued
        listener.close()
        os.unlink(path)
        second = subprocess.Popen([*cmd, "--socket", path], stdin=subprocess.DEVNULL)
        caller.join(30)
        assert not caller.is_alive()
        assert "error" not in result, result
        assert isinstance(result["expires"], float)
        conn.close()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
