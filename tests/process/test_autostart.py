"""The per-user broker a client starts on demand: real spawns, races, idle exit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from brokerproc import BrokerProc
from portlease.client import BrokerUnavailable, Connection, open_lease
from portlease.client.paths import user_socket

pytest_plugins = ["pytester"]


def brokers_for(sock: str) -> list[int]:
    """Pids of live broker processes serving ``sock`` (found by command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"portlease" in argv and b"serve" in argv and sock.encode() in argv:
            found.append(int(entry))
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError):
        # A zombie nobody reaped yet (its parent is another test process).
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    return True


def wait_for(pred, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


@pytest.fixture
def user_sock(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private ``$XDG_RUNTIME_DIR`` with autostart on and no system broker; kills what it started."""
    # Short, because a Unix socket path has at most 107 bytes.
    runtime = tempfile.mkdtemp(prefix="pl-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    monkeypatch.setenv("PORTLEASE_SYSTEM_DIR", os.path.join(runtime, "sys"))
    monkeypatch.setenv("PORTLEASE_SYSTEM_CONFIG", os.path.join(runtime, "sys.toml"))
    monkeypatch.setenv("PORTLEASE_AUTOSTART", "1")
    monkeypatch.delenv("PORTLEASE_SOCKET", raising=False)
    monkeypatch.delenv("PORTLEASE_IDLE_EXIT", raising=False)
    sock = user_socket()
    assert sock.startswith(runtime)
    try:
        yield sock
    finally:
        for pid in brokers_for(sock):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)


def test_first_client_starts_a_detached_private_broker_that_exits_when_idle(
    user_sock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORTLEASE_IDLE_EXIT", "1")
    with Connection() as conn:
        assert conn.path == user_sock
        held = conn.lease(2)
        assert len(held.ports) == 2
        pid = conn.broker_pid
        assert pid is not None and brokers_for(user_sock) == [pid]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--state") + 1] == f"{user_sock}.state".encode()
        assert argv[argv.index(b"--idle-exit") + 1] == b"1"
        assert os.getsid(pid) == pid  # its own session: no terminal, no signals from ours
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        log = os.path.join(os.path.dirname(user_sock), "broker.log")
        assert os.readlink(f"/proc/{pid}/fd/2") == log
        assert stat.S_IMODE(os.stat(os.path.dirname(user_sock)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
        # Holding a lease keeps it alive past its idle time.
        time.sleep(1.6)
        conn.ping()
    wait_for(lambda: gone(pid), "the idle broker exits")
    assert not os.path.exists(user_sock)
    assert "idle for 1 s with no lease: exiting" in Path(log).read_text()


def test_the_clients_service_manager_context_does_not_reach_the_broker_it_starts(
    user_sock: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A client inside a systemd service (a CI runner's unit) has NOTIFY_SOCKET and, with a
    file descriptor store, FDSTORE: the private broker it starts must not send the runner's
    manager READY=1, nor keep its claims in the runner's store."""
    import socket as _socket

    manager = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify.sock"))
    manager.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("FDSTORE", "4096")
    try:
        with Connection() as conn:
            conn.lease(2)
            pid = conn.broker_pid
            assert pid is not None
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"FDSTORE="))]
        with pytest.raises(BlockingIOError):
            manager.recv(4096)  # nothing was ever sent to the runner's manager
    finally:
        manager.close()


RACER = r"""
import json, sys, time
from portlease.client import Connection
start = float(sys.argv[1])
while time.time() < start:
    time.sleep(0.001)
with Connection() as conn:
    held = conn.lease(1)
    print(json.dumps({"broker": conn.broker_pid, "port": held.port}), flush=True)
    sys.stdin.read()
"""


def test_racing_clients_share_one_broker(user_sock: str) -> None:
    start = time.time() + 1.0  # every racer imported and waiting by then
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(start)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        got = []
        for proc in racers:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, "a racer failed"
            got.append(json.loads(line))
        assert len({g["broker"] for g in got}) == 1
        assert brokers_for(user_sock) == [got[0]["broker"]]
        assert len({g["port"] for g in got}) == 4
    finally:
        for proc in racers:
            proc.communicate("", timeout=30)


def test_a_killed_brokers_stale_socket_is_replaced_by_a_new_one(user_sock: str) -> None:
    with Connection() as conn:
        conn.ping()  # hello rides on the first request
        first = conn.broker_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: gone(first), "the broker is dead")
    assert stat.S_ISSOCK(os.lstat(user_sock).st_mode)  # left behind

    async def main() -> tuple[int, ...]:
        async with open_lease(3) as held:  # the async client autostarts too
            return held.ports

    assert len(anyio.run(main, backend="trio")) == 3
    (second,) = brokers_for(user_sock)
    assert second != first
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: gone(second), "the second broker is dead")
    assert len(anyio.run(main, backend="asyncio")) == 3
    (third,) = brokers_for(user_sock)
    assert third not in (first, second)


def test_the_wrapper_starts_a_broker_that_signals_can_stop(user_sock: str) -> None:
    # The wrapper blocks the signals it forwards to its command; the broker it
    # starts must not inherit that mask, or SIGTERM would never reach it.
    out = subprocess.run([sys.executable, "-m", "portlease", "lease", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (pid,) = brokers_for(user_sock)
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":\t" in line
    )
    assert int(status["SigBlk"], 16) == 0
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: gone(pid), "the broker stops on SIGTERM")


def test_disabled_autostart_is_a_clear_error(user_sock: str) -> None:
    env = dict(os.environ, PORTLEASE_AUTOSTART="0")
    out = subprocess.run([sys.executable, "-m", "portlease", "lease", "--", "true"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 69
    assert f"no portlease broker answers at {user_sock}" in out.stderr
    assert "autostart is off" in out.stderr and "starting one failed" not in out.stderr
    assert brokers_for(user_sock) == []


def test_a_broker_that_cannot_start_is_reported_with_its_log(user_sock: str) -> None:
    os.makedirs(os.path.dirname(user_sock), mode=0o700)
    Path(user_sock).write_text("not a socket")
    with pytest.raises(BrokerUnavailable) as exc:
        Connection()
    message = str(exc.value)
    assert "starting one failed" in message and "is not a socket" in message
    assert "broker.log" in message
    # Reported when the broker exits, not at the timeout (which says "did not answer within").
    assert "exited with status" in message and "did not answer within" not in message


def test_a_directory_owned_by_someone_else_is_refused(user_sock: str) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to hand the directory to another user")
    directory = os.path.dirname(user_sock)
    os.makedirs(directory, mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(BrokerUnavailable, match="belongs to uid 65534, not to you"):
        Connection()
    assert brokers_for(user_sock) == []
    assert os.listdir(directory) == []  # no lock, no log: nothing made in someone else's dir


def test_autostart_changes_no_mode_of_a_directory_it_did_not_make(user_sock: str) -> None:
    directory = os.path.dirname(user_sock)
    os.mkdir(directory)
    os.chmod(directory, 0o755)  # ours, readable by others, writable by nobody else: accepted
    with Connection() as conn:
        conn.lease(1)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o755


def _system_down_checks(user_sock: str, message: str) -> None:
    assert "system portlease broker is down" in message
    assert "systemctl status portlease.socket" in message
    assert "starting one" not in message
    assert brokers_for(user_sock) == []
    assert not os.path.exists(os.path.dirname(user_sock))  # no private broker, not even its dir


@pytest.mark.parametrize("marker", ["dir", "config"])
def test_where_a_system_deployment_exists_no_client_autostarts(
    user_sock: str, marker: str
) -> None:
    system_dir = os.environ["PORTLEASE_SYSTEM_DIR"]
    if marker == "dir":
        os.mkdir(system_dir)
    else:
        Path(os.environ["PORTLEASE_SYSTEM_CONFIG"]).write_text("range = [20000, 20099]\n")
    with pytest.raises(BrokerUnavailable) as exc:
        Connection(timeout=1.0)
    message = str(exc.value)
    assert os.path.join(system_dir, "portlease.sock") in message
    assert "socket file is missing" in message
    _system_down_checks(user_sock, message)

    async def via_async() -> None:
        with pytest.raises(BrokerUnavailable) as aexc:
            async with open_lease(1, timeout=0.5):
                pass
        _system_down_checks(user_sock, str(aexc.value))

    anyio.run(via_async, backend="asyncio")
    if marker == "dir":
        assert os.listdir(system_dir) == []  # nothing created, bound or chmodded there


def test_a_stopped_system_socket_is_reported_not_replaced(user_sock: str) -> None:
    system_dir = os.environ["PORTLEASE_SYSTEM_DIR"]
    os.mkdir(system_dir, 0o755)
    # The socket file is left behind by a broker that is gone: connect is refused.
    import socket as _socket

    dead = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    dead.bind(os.path.join(system_dir, "portlease.sock"))
    dead.close()
    with pytest.raises(BrokerUnavailable) as exc:
        Connection(timeout=0.5)
    assert "Connection refused" in str(exc.value)
    _system_down_checks(user_sock, str(exc.value))
    assert stat.S_IMODE(os.stat(system_dir).st_mode) == 0o755


def test_a_system_broker_that_comes_up_within_the_timeout_is_waited_for(
    user_sock: str, tmp_path: Path, port_range: str
) -> None:
    system_dir = os.environ["PORTLEASE_SYSTEM_DIR"]
    os.mkdir(system_dir)

    class SystemBroker(BrokerProc):
        @property
        def socket(self) -> str:
            return os.path.join(system_dir, "portlease.sock")

    broker = SystemBroker(tmp_path, range=port_range)
    broker.start(wait=False)  # still starting when the client arrives
    try:
        with Connection(timeout=20) as conn:
            assert conn.path == broker.socket
            assert len(conn.lease(1).ports) == 1
    finally:
        broker.stop()
    assert brokers_for(user_sock) == []


def test_a_user_outside_the_socket_group_gets_the_permission_message(
    user_sock: str, tmp_path: Path, port_range: str
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to become another uid")
    system_dir = os.environ["PORTLEASE_SYSTEM_DIR"]
    os.chmod(os.path.dirname(system_dir), 0o755)  # like /run: anyone may look in
    os.mkdir(system_dir, 0o755)

    class SystemBroker(BrokerProc):
        @property
        def socket(self) -> str:
            return os.path.join(system_dir, "portlease.sock")

    broker = SystemBroker(tmp_path, range=port_range).start()
    try:
        os.chmod(broker.socket, 0o660)  # root:root; uid 65534 is in no group of it
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                try:
                    Connection(timeout=5)
                    os.write(w, b"connected")
                except Exception as exc:
                    os.write(w, f"{type(exc).__name__}: {exc}".encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            message = f.read().decode()
        os.waitpid(pid, 0)
    finally:
        broker.stop()
    assert "permission denied on the portlease socket" in message
    assert "group" in message and "autostart" not in message and "starting one" not in message
    assert brokers_for(user_sock) == []


def test_pytest_xdist_just_works_with_no_setup(
    user_sock: str, pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makepyfile(
        """
        import json, os, pytest

        @pytest.mark.parametrize("i", range(4))
        def test_port(free_port, portlease_connection, i):
            with open(os.environ["PL_OUT"], "a") as f:
                f.write(json.dumps([portlease_connection.broker_pid, free_port]) + "\\n")
        """
    )
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, PL_OUT=str(out))
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider",
         "-p", "no:hypothesispytest", "-p", "no:benchmark"],
        cwd=pytester.path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4
    assert len({pid for pid, _ in records}) == 1
    assert brokers_for(user_sock) == [records[0][0]]
