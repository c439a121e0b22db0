"""The portpicker endpoint, driven by the real portpicker clients (PyPI's and Debian's).

Every port a test takes from portpicker is checked to be a broker lease: in the
broker's range, in ``portlease status`` under the pid portpicker named, and
without portpicker's fallback line ("Portserver failed to find a port."),
which it prints before picking a port of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerproc import PYTHON, BrokerProc, portlease

pytest.importorskip("portpicker")

FALLBACK = "Portserver failed to find a port."
DEBIAN_PYTHON = "/usr/bin/python3"

# A holder: picks COUNT ports through portpicker, prints them and its pid, then
# waits for a line on stdin (or to be killed) before exiting.
HOLDER = """
import os, sys, portpicker
ports = [portpicker.pick_unused_port() for _ in range(int(sys.argv[1]))]
print(os.getpid(), *ports, flush=True)
sys.stdin.readline()
"""


def debian_portpicker() -> bool:
    if not os.path.exists(DEBIAN_PYTHON):
        return False
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import portpicker; print(portpicker.__file__)"],
                           capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
    return probe.returncode == 0 and probe.stdout.startswith("/usr/lib/python3/")


@pytest.fixture
def ps_broker(tmp_path: Path, port_range: str) -> Iterator[BrokerProc]:
    b = BrokerProc(tmp_path, ["--portserver", str(tmp_path / "ps.sock")], range=port_range).start()
    try:
        yield b
    finally:
        b.stop()


def portserver_env(b: BrokerProc) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PORTSERVER_ADDRESS", "PORTLEASE_SOCKET")}
    env["PORTSERVER_ADDRESS"] = str(b.dir / "ps.sock")
    return env


def broker_range(b: BrokerProc) -> range:
    low, high = (int(x) for x in b.range.split("-"))
    return range(low, high + 1)


def leases(b: BrokerProc) -> list[dict[str, object]]:
    result = portlease("status", "--socket", b.socket, "--json")
    assert result.returncode == 0, result.stderr
    out: list[dict[str, object]] = json.loads(result.stdout)["leases"]
    return out


def ports_of(b: BrokerProc, pid: int) -> list[int]:
    return sorted(port for info in leases(b) if info["pid"] == pid for port in info["ports"])  # type: ignore[attr-defined]


def wait_released(b: BrokerProc, ports: list[int], timeout: float = 20.0) -> None:
    """Wait (an event, not a timing claim) until none of ``ports`` is leased."""
    deadline = time.monotonic() + timeout
    while True:
        held = {port for info in leases(b) for port in info["ports"]}  # type: ignore[attr-defined]
        if not held & set(ports):
            return
        assert time.monotonic() < deadline, f"ports {ports} still leased: {leases(b)}"
        time.sleep(0.05)


class Holder:
    """A process holding ports it got from portpicker."""

    def __init__(self, b: BrokerProc, count: int = 1, python: str = PYTHON) -> None:
        self.proc = subprocess.Popen(
            [python, "-c", HOLDER, str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=portserver_env(b),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"holder failed: {self.proc.communicate(timeout=10)[1]}")
        pid, *ports = (int(x) for x in line.split())
        assert pid == self.proc.pid
        self.ports = ports

    def exit(self) -> str:
        _out, err = self.proc.communicate("\n", timeout=30)
        assert self.proc.returncode == 0, err
        return err

    def kill(self) -> str:
        self.proc.kill()
        _out, err = self.proc.communicate(timeout=30)
        return err


def ask(address: str, payload: bytes, *, close_write: bool = True, timeout: float = 30.0) -> bytes:
    """One raw portserver exchange: send ``payload``, read until the broker closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect("\0" + address[1:] if address.startswith("@") else address)
        data = b""
        try:
            s.sendall(payload)
            if close_write:
                s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(4096):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # the broker hung up on bytes it did not read: refused all the same
        return data


# ------------------------------------------------------------------ the real clients


def test_pick_unused_port_gets_a_lease_released_at_exit(ps_broker: BrokerProc) -> None:
    holder = Holder(ps_broker, count=2)
    assert all(port in broker_range(ps_broker) for port in holder.ports)
    assert ports_of(ps_broker, holder.proc.pid) == sorted(holder.ports)
    (info,) = [i for i in leases(ps_broker) if holder.ports[0] in i["ports"]]  # type: ignore[operator]
    assert info["note"] == "portpicker" and info["state"] == "attached"
    assert FALLBACK not in holder.exit()
    wait_released(ps_broker, holder.ports)


def test_sigkill_releases_the_port(ps_broker: BrokerProc) -> None:
    holder = Holder(ps_broker)
    assert ports_of(ps_broker, holder.proc.pid) == holder.ports
    assert FALLBACK not in holder.kill()
    wait_released(ps_broker, holder.ports)
    # The broker waited on the pidfd: no request of ours told it.
    assert f"portserver: pid {holder.proc.pid} exited" in ps_broker.log.read_text()


def portpicker_in_shell(ps_broker: BrokerProc, script: str) -> tuple[subprocess.Popen[str], int]:
    """``sh -c SCRIPT``, whose first output line is the port ``python -m portpicker`` printed."""
    shell = subprocess.Popen(
        ["sh", "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=portserver_env(ps_broker),
    )
    assert shell.stdout is not None
    return shell, int(shell.stdout.readline())


def test_python_m_portpicker_leases_for_its_parent(ps_broker: BrokerProc) -> None:
    # `python -m portpicker` with no argument asks for its parent's pid: the shell.
    shell, port = portpicker_in_shell(ps_broker, f'"{PYTHON}" -m portpicker; echo "$$"; read _')
    assert int(shell.stdout.readline()) == shell.pid
    assert port in broker_range(ps_broker)
    (info,) = [i for i in leases(ps_broker) if port in i["ports"]]  # type: ignore[operator]
    assert info["pid"] == shell.pid and str(info["note"]).startswith("portpicker (asked by pid ")
    # The portpicker process is gone; the lease lives with the shell.
    _out, err = shell.communicate("\n", timeout=30)
    assert FALLBACK not in err
    wait_released(ps_broker, [port])


def test_python_m_portpicker_with_an_explicit_ancestor_pid(ps_broker: BrokerProc) -> None:
    shell, port = portpicker_in_shell(ps_broker, f'"{PYTHON}" -m portpicker "$$"; read _')
    assert ports_of(ps_broker, shell.pid) == [port]
    shell.kill()
    _out, err = shell.communicate(timeout=30)
    assert FALLBACK not in err
    wait_released(ps_broker, [port])


@pytest.mark.skipif(not debian_portpicker(), reason="Debian's python3-portpicker is not installed")
def test_debian_python3_portpicker(ps_broker: BrokerProc) -> None:
    holder = Holder(ps_broker, count=2, python=DEBIAN_PYTHON)
    assert all(port in broker_range(ps_broker) for port in holder.ports)
    assert ports_of(ps_broker, holder.proc.pid) == sorted(holder.ports)
    assert FALLBACK not in holder.kill()
    wait_released(ps_broker, holder.ports)


def test_processes_never_share_a_port(ps_broker: BrokerProc) -> None:
    holders = [Holder(ps_broker, count=3) for _ in range(6)]
    taken = [port for h in holders for port in h.ports]
    assert len(taken) == len(set(taken)) == 18
    for h in holders:
        assert ports_of(ps_broker, h.proc.pid) == sorted(h.ports)
    # Half leave, new ones come: still nothing shared among the living.
    for h in holders[:3]:
        h.kill()
    wait_released(ps_broker, [port for h in holders[:3] for port in h.ports])
    holders[:3] = [Holder(ps_broker, count=3) for _ in range(3)]
    taken = [port for h in holders for port in h.ports]
    assert len(taken) == len(set(taken)) == 18
    for h in holders:
        assert FALLBACK not in h.exit()


def test_the_fallback_is_seen_when_the_broker_refuses(tmp_path: Path, port_range: str) -> None:
    """The check above can fail: over its quota portpicker falls back, and says so."""
    config = tmp_path / "config.toml"
    config.write_text("max_ports_per_uid = 2\n")
    b = BrokerProc(tmp_path, ["--portserver", str(tmp_path / "ps.sock"), "--config", str(config)],
                   range=port_range).start()
    try:
        proc = subprocess.run([PYTHON, "-c", HOLDER, "3"], input="\n", capture_output=True, text=True,
                              env=portserver_env(b), timeout=60)
        assert proc.returncode == 0, proc.stderr
        ports = [int(x) for x in proc.stdout.split()[1:]]
        assert FALLBACK in proc.stderr  # the third request was refused: the uid's quota
        assert sum(port in broker_range(b) for port in ports[:2]) == 2
        assert "max_ports_per_uid" in b.log.read_text() or "per-uid limit" in b.log.read_text()
    finally:
        b.stop()


# ------------------------------------------------------------------ who may ask for what


def test_a_pid_that_is_not_an_ancestor_is_refused(ps_broker: BrokerProc) -> None:
    address = str(ps_broker.dir / "ps.sock")
    sibling = subprocess.Popen(["sleep", "60"])
    try:
        # The test process is the sleeper's parent, not its child: refused.
        assert ask(address, b"%d\n" % sibling.pid) == b""
        assert ask(address, b"%d\n" % ps_broker.proc.pid) == b""  # type: ignore[union-attr]
    finally:
        sibling.kill()
        sibling.wait()
    # Its own pid, and its parent's, are fine.
    own = ask(address, b"%d\n" % os.getpid())
    assert int(own) in broker_range(ps_broker)
    parent = ask(address, b"%d\n" % os.getppid())
    assert int(parent) in broker_range(ps_broker)
    assert "not the connecting process nor one of its ancestors" in ps_broker.log.read_text()


@pytest.mark.parametrize("payload", [
    b"", b"0\n", b"1\n", b"-5\n", b"abc\n", b"\xff\xfe\n", b"9" * 100 + b"\n", b"x" * 100_000,
    b"%d\n" % (2**22 + 1), b"99999\n",  # a pid above the limit; one that (almost surely) is no process
])
def test_hostile_requests_get_an_empty_reply(ps_broker: BrokerProc, payload: bytes) -> None:
    address = str(ps_broker.dir / "ps.sock")
    if payload == b"99999\n" and os.path.exists("/proc/99999"):
        pytest.skip("pid 99999 exists here")
    assert ask(address, payload) == b""
    # The broker still answers, on both sockets.
    assert int(ask(address, b"%d\n" % os.getpid())) in broker_range(ps_broker)
    assert portlease("status", "--socket", ps_broker.socket).returncode == 0


def test_a_silent_client_stalls_no_one(ps_broker: BrokerProc) -> None:
    address = str(ps_broker.dir / "ps.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(address)
        silent.sendall(b"12")  # no newline, and the connection stays open
        # Others are served meanwhile.
        for _ in range(3):
            assert int(ask(address, b"%d\n" % os.getpid())) in broker_range(ps_broker)
        silent.settimeout(30)
        assert silent.recv(100) == b""  # closed with the empty reply after the request timeout
    assert "no complete request within" in ps_broker.log.read_text()


def test_abstract_address(tmp_path: Path, port_range: str) -> None:
    name = f"@portlease-test-ps-{os.getpid()}-{port_range}"
    b = BrokerProc(tmp_path, ["--portserver", name], range=port_range).start()
    try:
        env = dict(os.environ, PORTSERVER_ADDRESS=name)
        proc = subprocess.run([PYTHON, "-c", HOLDER, "1"], input="\n", capture_output=True,
                              text=True, env=env, timeout=60)
        assert proc.returncode == 0 and FALLBACK not in proc.stderr, proc.stderr
        assert int(proc.stdout.split()[1]) in broker_range(b)
    finally:
        b.stop()


def test_a_lease_survives_a_broker_restart_and_ends_at_exit(ps_broker: BrokerProc) -> None:
    holder = Holder(ps_broker)
    ps_broker.kill(signal.SIGTERM)  # leases are kept in the journal
    ps_broker.start()
    # Taken back by the very process, still attached (not an orphan waiting to expire).
    (info,) = [i for i in leases(ps_broker) if i["pid"] == holder.proc.pid]
    assert info["ports"] == holder.ports and info["state"] == "attached"
    holder.kill()
    wait_released(ps_broker, holder.ports)


@pytest.mark.skipif(shutil.which("sleep") is None, reason="no sleep")
def test_a_pid_asking_many_times_gets_many_ports(ps_broker: BrokerProc) -> None:
    proc = subprocess.run(
        [PYTHON, "-c", "import portpicker; print(*[portpicker.pick_unused_port() for _ in range(20)])"],
        capture_output=True, text=True, env=portserver_env(ps_broker), timeout=60,
    )
    ports = [int(x) for x in proc.stdout.split()]
    assert len(set(ports)) == 20 and FALLBACK not in proc.stderr
    wait_released(ps_broker, ports)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed")
def test_socket_activation_finds_the_portserver_socket_by_name(tmp_path: Path, port_range: str) -> None:
    """As systemd passes portlease-portserver.socket: by FileDescriptorName, in any fd order."""
    main, ps = tmp_path / "main.sock", tmp_path / "ps.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PORTLEASE_SOCKET")}
    with open(tmp_path / "broker.log", "wb") as log:
        tool = subprocess.Popen(
            # The portserver socket first: fd 3 is not the main socket here.
            ["systemd-socket-activate", "-l", str(ps), "-l", str(main), "--fdname=portserver:portlease",
             PYTHON, "-m", "portlease", "serve", "--state", str(tmp_path / "state.jsonl"),
             "--range", port_range, "--log-level", "debug"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            # The file appears at bind(), a moment before listen(): retry until then.
            try:
                port = int(ask(str(ps), b"%d\n" % os.getpid()))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert tool.poll() is None and time.monotonic() < deadline, (
                    (tmp_path / "broker.log").read_text())
                time.sleep(0.01)
        status = json.loads(portlease("status", "--socket", str(main), "--json").stdout)
        (info,) = status["leases"]
        assert info["ports"] == [port] and info["pid"] == os.getpid() and info["note"] == "portpicker"
    finally:
        tool.terminate()
        tool.wait(timeout=30)
    assert "answering portpicker on the inherited socket" in (tmp_path / "broker.log").read_text()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
