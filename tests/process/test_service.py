"""The broker as systemd runs it: socket activation and sd_notify, with real tools.

No systemd as PID 1 here: ``systemd-socket-activate`` plays the socket unit, a
plain listening socket handed over as fd 3 plays a restart, and a real
AF_UNIX datagram socket plays the manager's NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from brokerproc import PYTHON, Raw

ACTIVATE = shutil.which("systemd-socket-activate")


def serve_cmd(tmp_path: Path, port_range: str, *extra: str) -> list[str]:
    """The broker's command line; the range comes from ``--config`` when one is given."""
    rng = [] if "--config" in extra else ["--range", port_range]
    return [PYTHON, "-m", "portlease", "serve", "--state", str(tmp_path / "state.jsonl"),
            *rng, *extra]


def test_first_connection_starts_the_broker_and_is_served(tmp_path: Path, port_range: str) -> None:
    if ACTIVATE is None:
        pytest.skip("systemd-socket-activate is not installed")
    path = str(tmp_path / "act.sock")
    log = open(tmp_path / "log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([ACTIVATE, "-l", path, "-E", "PYTHONPATH", *serve_cmd(tmp_path, port_range)],
                            stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        # The socket file appears at bind(), before listen(): wait for the tool's word.
        while "Listening on" not in (tmp_path / "log").read_text():
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.01)
        # The broker is not running yet: connecting is what starts it.
        raw = Raw(path)
        assert raw.call({"op": "lease", "count": 2})["reply"] == "granted"
        logged = (tmp_path / "log").read_text()
        assert "socket activation: serving the inherited socket" in logged
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        log.close()


def _listening(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    return sock


def _activated(
    sock: socket.socket, cmd: list[str], log: Path, env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` as socket activation would: the socket as fd 3, LISTEN_PID = its pid."""
    # bash, not dash: dash cannot name fds above 9 in a redirection.
    fd = sock.fileno()
    script = f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
    wrapper = ["bash", "-c", script, "bash"]
    with open(log, "ab") as out:
        return subprocess.Popen(wrapper + cmd, pass_fds=[sock.fileno()], stdout=out, stderr=out,
                                env={k: v for k, v in {**os.environ, **(env or {})}.items()
                                     if k not in unset})


def test_connections_queued_during_a_restart_are_served(tmp_path: Path, port_range: str) -> None:
    path = str(tmp_path / "s.sock")
    listener = _listening(path)
    first = _activated(listener, serve_cmd(tmp_path, port_range), tmp_path / "log")
    held = Raw(path)
    lease = held.call({"op": "lease", "count": 3})
    first.kill()
    first.wait()
    # The broker is dead but the socket (held by "systemd") still listens:
    # these connect and queue, and their requests wait in the kernel.
    queued = []
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        s.sendall(b'{"op":"hello","id":1,"version":1}\n{"op":"lease","id":2,"count":2}\n')
        queued.append(s)
    second = _activated(listener, serve_cmd(tmp_path, port_range), tmp_path / "log")
    try:
        granted = []
        for s in queued:
            data = b""
            while data.count(b"\n") < 2:
                chunk = s.recv(4096)
                assert chunk, "queued connection dropped"
                data += chunk
            assert b'"reply":"granted"' in data.splitlines()[1]
            granted.append(data)
        # The lease of the client whose broker died was restored, not re-granted.
        again = Raw(path)
        assert again.call({"op": "reclaim", "token": lease["token"]})["ports"] == lease["ports"]
        for data in granted:
            for port in lease["ports"]:  # type: ignore[attr-defined]
                assert f"{port}".encode() not in data.splitlines()[1].split(b'"token"')[0]
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=10) == 0
        listener.close()


def test_inherited_socket_of_wrong_kind_is_refused_clearly(tmp_path: Path, port_range: str) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    proc = _activated(udp, serve_cmd(tmp_path, port_range), tmp_path / "log")
    assert proc.wait(timeout=20) == 1
    text = (tmp_path / "log").read_text()
    assert "socket activation" in text and "Traceback" not in text
    udp.close()


# ---------------------------------------------------------------- sd_notify


class Manager:
    """A stand-in for systemd's notification socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(10)
        self.address = address
        self.messages: list[tuple[float, str]] = []

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, msg in self.messages:
                if text in msg.split("\n"):
                    return msg
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                break
        raise AssertionError(f"{text!r} not received; got {[m for _, m in self.messages]}")

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                return


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_status_watchdog_reload_stopping(
    tmp_path: Path, port_range: str, abstract: bool
) -> None:
    address = f"@portlease-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify")
    manager = Manager(address)
    config = tmp_path / "c.toml"
    low = int(port_range.split("-")[0])
    config.write_text(f"port_min = {low}\nport_max = {low + 39}\n")
    path = str(tmp_path / "s.sock")
    listener = _listening(path)
    proc = _activated(
        listener, serve_cmd(tmp_path, port_range, "--config", str(config)), tmp_path / "log",
        env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"},
    )
    try:
        manager.wait_for("READY=1")
        raw = Raw(path)  # READY means the socket is served and the state restored
        raw.call({"op": "lease", "count": 3})
        status = manager.wait_for("STATUS=1 lease, 3 ports held, 1 client, 37 free, largest free run 37")
        assert status.startswith("STATUS=")
        manager.drain(1.0)
        pings = [t for t, m in manager.messages if m == "WATCHDOG=1"]
        assert len(pings) >= 3  # pinging repeatedly from the loop, every 0.1 s or so

        config.write_text(f"port_min = {low}\nport_max = {low + 49}\nttl = 30\n")
        before = len(manager.messages)
        proc.send_signal(signal.SIGHUP)
        manager.wait_for("RELOADING=1")
        reloading = next(m for _, m in manager.messages[before:] if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reloading
        manager.drain(0.7)
        after = [m for _, m in manager.messages[before:]]
        i = next(i for i, m in enumerate(after) if "RELOADING=1" in m)
        assert any("READY=1" in m for m in after[i + 1:])
        # The reload kept the lease and widened the range.
        summary = raw.call({"op": "status"})["summary"]
        assert summary["leases"] == 1 and summary["range"] == [low, low + 49]  # type: ignore[index]
        assert summary["ttl"] == 30  # type: ignore[index]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        manager.wait_for("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
        manager.sock.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails(tmp_path: Path, port_range: str) -> None:
    path = str(tmp_path / "s.sock")
    listener = _listening(path)
    proc = _activated(listener, serve_cmd(tmp_path, port_range), tmp_path / "log",
                      env={"WATCHDOG_USEC": "100000"}, unset=("NOTIFY_SOCKET",))
    try:
        assert Raw(path).call({"op": "ping"})["reply"] == "pong"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        listener.close()
    assert "Traceback" not in (tmp_path / "log").read_text()
