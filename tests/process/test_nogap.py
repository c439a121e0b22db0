"""No gap between grant and bind: ``--listen`` (fd handoff), ``--hold`` (placeholder), ``wait``.

Everything here is checked against the running kernel: real binds, real
listeners, real processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerproc import PYTHON, BrokerProc, portlease
from portlease.client.host import procnet

# A tiny server that takes its sockets the systemd way: it checks LISTEN_PID and
# LISTEN_FDS, reports what it got, answers one TCP connection and one datagram.
FD_SERVER = r"""
import json, os, socket, sys
assert int(os.environ["LISTEN_PID"]) == os.getpid(), "LISTEN_PID is not my pid"
n = int(os.environ["LISTEN_FDS"])
names = os.environ["LISTEN_FDNAMES"].split(":")
socks = [socket.socket(fileno=3 + i) for i in range(n)]
info = [{"name": name, "type": int(s.type), "family": int(s.family), "port": s.getsockname()[1],
         "accepting": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)}
        for name, s in zip(names, socks)]
print(json.dumps({"pid": os.getpid(), "socks": info,
                  "ports": os.environ["PORTLEASE_PORTS"]}), flush=True)
for s in socks:
    if s.type == socket.SOCK_STREAM:
        conn, _ = s.accept(); conn.sendall(b"tcp hello\n"); conn.close()
    else:
        data, peer = s.recvfrom(100); s.sendto(b"udp " + data, peer)
"""

# A server that cannot take a socket: it binds by itself (with SO_REUSEADDR, as
# nearly every server does) once told to on stdin, then listens until stdin ends.
LATE_SERVER = r"""
import os, socket, sys
port = int(os.environ["PORTLEASE_PORT"])
print("waiting", flush=True)
sys.stdin.readline()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen()
print("listening", flush=True)
sys.stdin.readline()
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PORTLEASE_AUTOSTART="0")


def _lease(broker: BrokerProc, *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
        env=_env(), **kw,
    )


def _plain_bind(port: int, *, reuse: bool = False, host: str = "0.0.0.0") -> int:
    """0 if a fresh TCP socket binds ``port`` (and listens), else the errno."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen()
        return 0
    except OSError as exc:
        return exc.errno or -1
    finally:
        s.close()


def _until(pred: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def _holds_socket_on(pid: int, port: int) -> bool:
    found = procnet.sockets(range(port, port + 1))
    owners = procnet.all_owners(s.inode for s in found if s.proto == "tcp")
    return any(pid in pids for pids in owners.values())


# ---------------------------------------------------------------- --listen


def test_listen_hands_cmd_bound_sockets_the_systemd_way(broker: BrokerProc) -> None:
    proc = _lease(broker, "-n", "2", "--listen", "0=http", "--listen", "1/udp", "--",
                  PYTHON, "-c", FD_SERVER)
    try:
        assert proc.stdout is not None
        got = json.loads(proc.stdout.readline())
        ports = [int(x) for x in got["ports"].split()]
        http, udp = got["socks"]
        assert http == {"name": "http", "type": socket.SOCK_STREAM, "family": socket.AF_INET6,
                        "port": ports[0], "accepting": 1}
        assert udp == {"name": "port1", "type": socket.SOCK_DGRAM, "family": socket.AF_INET6,
                       "port": ports[1], "accepting": 0}
        # Dual-stack wildcard: IPv4 reaches the IPv6 socket.
        with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as c:
            assert c.makefile().readline() == "tcp hello\n"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(10)
            u.sendto(b"ping", ("127.0.0.1", ports[1]))
            assert u.recvfrom(100)[0] == b"udp ping"
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_listen_port_is_bound_before_cmd_starts(broker: BrokerProc) -> None:
    # CMD sleeps before doing anything: the port is already taken for it.
    proc = _lease(broker, "--listen", "0", "--", "sh", "-c",
                  "echo $PORTLEASE_PORT; read _")
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert _plain_bind(port) == errno.EADDRINUSE
        assert _plain_bind(port, reuse=True) == errno.EADDRINUSE  # a listener refuses both
        # A client connects although CMD never called listen() itself: the kernel queues it.
        socket.create_connection(("::1", port), timeout=10).close()
    finally:
        proc.communicate("\n", timeout=30)


def test_listen_host_binds_that_address_only(broker: BrokerProc) -> None:
    proc = _lease(broker, "--listen", "0", "--listen-host", "127.0.0.1", "--", PYTHON, "-c",
                  "import socket; s = socket.socket(fileno=3); print(s.getsockname(), flush=True); "
                  "input()")
    try:
        assert proc.stdout is not None
        host, port = eval(proc.stdout.readline())  # a (host, port) tuple
        assert host == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
        # Another address on the same port stays free for its owner (nobody).
        assert _plain_bind(port, host="127.0.0.2") == 0
    finally:
        proc.communicate("\n", timeout=30)


def test_listen_host_must_be_an_address(broker: BrokerProc) -> None:
    out = portlease("lease", "--socket", broker.socket, "--listen", "0", "--listen-host",
                    "localhost", "--", "true")
    assert out.returncode == 2 and "--listen-host 'localhost': not an IPv4 or IPv6 address" in out.stderr


def test_a_taken_port_is_a_clear_bind_error() -> None:
    from portlease.client.cli.handoff import BindError, bind_listener, bind_placeholder

    squat = socket.socket()
    squat.bind(("127.0.0.1", 0))
    squat.listen()
    port = squat.getsockname()[1]
    try:
        for bind in (lambda: bind_listener(port, udp=False, host=None), lambda: bind_placeholder(port)):
            with pytest.raises(BindError) as info:
                bind()
            assert info.value.errno == errno.EADDRINUSE
            assert info.value.strerror == (
                f"cannot bind leased port {port}/tcp: Address already in use; a process outside "
                "portlease holds it (see `portlease status --squatters`)")
    finally:
        squat.close()


def test_listen_works_with_uvicorn_fd(broker: BrokerProc, tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    (tmp_path / "app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    assert scope['type'] == 'http'\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'uvicorn on a leased fd'})\n"
    )
    proc = _lease(broker, "--listen", "0", "--", "sh", "-c",
                  f'echo $PORTLEASE_PORT; exec {PYTHON} -m uvicorn --fd 3 --app-dir {tmp_path} '
                  "--log-level warning --lifespan off app:app")
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20).read()
        assert body == b"uvicorn on a leased fd"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# ---------------------------------------------------------------- --hold


@pytest.fixture
def held(broker: BrokerProc) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A wrapper holding its port for LATE_SERVER, which has not bound it yet."""
    proc = _lease(broker, "--hold", "0", "--hold-timeout", "600", "--", PYTHON, "-c",
                  LATE_SERVER)
    assert proc.stdout is not None and proc.stdout.readline() == "waiting\n"
    port = int(procnet_port_of(proc.pid))
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def procnet_port_of(pid: int) -> int:
    """The port of the one TCP socket ``pid`` holds in the kernel's tables (the placeholder)."""
    mine = [s for s in procnet.sockets() if s.proto == "tcp" and not s.listening]
    owners = procnet.all_owners(s.inode for s in mine)
    ports = {s.port for s in mine if pid in owners.get(s.inode, set())}
    assert len(ports) == 1, ports
    return ports.pop()


def test_hold_refuses_plain_binds_until_cmd_listens(held: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = held
    # While held: a bind without SO_REUSEADDR fails, to the wildcard and to one address,
    # over IPv4 and IPv6.
    for host in ("0.0.0.0", "127.0.0.1", "::", "::1"):
        assert _plain_bind(port, host=host) == errno.EADDRINUSE, host
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "listening\n"  # CMD's own bind (SO_REUSEADDR) worked
    _until(lambda: not _holds_socket_on(proc.pid, port), "the wrapper lets go once CMD listens")
    proc.stdin.write("done\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0


def test_hold_does_not_stop_a_foreign_server_that_sets_so_reuseaddr(
    held: tuple[subprocess.Popen[str], int],
) -> None:
    # The documented hole: SO_REUSEADDR on both sides, and the placeholder is not
    # listening, so the kernel lets the foreign server bind and listen.
    proc, port = held
    assert _plain_bind(port, reuse=True) == 0
    # ...and its listener does not make the wrapper let go: it belongs to nobody of CMD's.
    foreign = socket.socket()
    foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    foreign.bind(("0.0.0.0", port))
    foreign.listen()
    try:
        out = portlease("wait", str(port), "--pid", str(proc.pid), "--timeout", "0.3")
        assert out.returncode == 1
        assert _holds_socket_on(proc.pid, port)
    finally:
        foreign.close()


def test_a_placeholder_without_so_reuseaddr_would_refuse_cmd_too() -> None:
    # Why the placeholder sets SO_REUSEADDR: without it, even a server that sets
    # SO_REUSEADDR cannot bind (this kernel, checked here, not assumed).
    port = _free_port()
    strict = socket.socket(socket.AF_INET6)
    strict.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    strict.bind(("::", port))
    try:
        assert _plain_bind(port, reuse=True) == errno.EADDRINUSE
    finally:
        strict.close()
    from portlease.client.cli.handoff import bind_placeholder

    placeholder = bind_placeholder(port)
    try:
        assert _plain_bind(port) == errno.EADDRINUSE
        assert _plain_bind(port, reuse=True) == 0
    finally:
        placeholder.close()


def test_no_gap_picture_is_rendered_from_its_source(tmp_path: Path) -> None:
    import re
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed (graphviz)")
    diagrams = Path(__file__).resolve().parents[2] / "docs" / "diagrams"
    fresh = subprocess.run(["dot", "-Tsvg", diagrams / "no-gap.dot", "-o", tmp_path / "f.svg"],
                           capture_output=True, text=True, timeout=60)
    assert fresh.returncode == 0, fresh.stderr

    def words(svg: str) -> list[str]:
        return sorted(re.findall(r"<text[^>]*>([^<]*)</text>", svg))

    assert words((diagrams / "no-gap.svg").read_text()) == words((tmp_path / "f.svg").read_text()), (
        "docs/diagrams/no-gap.svg is stale: run docs/diagrams/render.sh")
    assert (diagrams / "no-gap.png").stat().st_size > 10_000


def test_hold_timeout_lets_go(broker: BrokerProc) -> None:
    proc = _lease(broker, "--hold", "0", "--hold-timeout", "0.3", "--", "sh", "-c",
                  "echo $PORTLEASE_PORT; read _")
    assert proc.stdout is not None and proc.stdin is not None
    port = int(proc.stdout.readline())
    try:
        _until(lambda: _plain_bind(port) == 0, "the placeholder goes after --hold-timeout")
    finally:
        _, err = proc.communicate("\n", timeout=30)
    assert f"--hold: nothing of the command listened on port {port} in time" in err


# ---------------------------------------------------------------- wait


@contextlib.contextmanager
def _listener_process(*, parent_shell: bool = False) -> Iterator[tuple[subprocess.Popen[str], int]]:
    code = ("import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); input()")
    cmd = ["sh", "-c", f'{PYTHON} -c "{code}"'] if parent_shell else [PYTHON, "-c", code]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        yield proc, int(proc.stdout.readline())
    finally:
        proc.communicate("\n", timeout=30)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_wait_returns_once_the_port_listens() -> None:
    port = _free_port()
    waiter = subprocess.Popen([PYTHON, "-m", "portlease", "wait", str(port), "--timeout", "60"],
                              stderr=subprocess.PIPE, text=True)
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        assert waiter.wait(timeout=60) == 0
        s.close()
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


def test_wait_times_out_with_a_message_naming_the_missing_port() -> None:
    with _listener_process() as (_, up):
        down = _free_port()
        out = portlease("wait", str(up), str(down), "--timeout", "0.2")
    assert out.returncode == 1
    assert out.stderr == f"portlease: timed out after 0.2 s: nothing listens on port {down}\n"


def test_wait_pid_counts_only_that_process_tree() -> None:
    with _listener_process(parent_shell=True) as (shell, port):
        assert portlease("wait", str(port), "--pid", str(shell.pid)).returncode == 0  # a child's
        other = subprocess.Popen(["sleep", "60"])
        try:
            out = portlease("wait", str(port), "--pid", str(other.pid), "--timeout", "0.2")
        finally:
            other.kill()
            other.wait()
        assert out.returncode == 1
        assert f"nothing listens by process {other.pid} or its descendants on port {port}" in out.stderr
        # A bound socket that does not listen is not ready either.
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        try:
            out = portlease("wait", str(s.getsockname()[1]), "--timeout", "0.2")
        finally:
            s.close()
        assert out.returncode == 1


def test_wait_pid_of_a_dead_process_fails_at_once() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = portlease("wait", str(_free_port()), "--pid", str(dead.pid), "--timeout", "600")
    assert out.returncode == 1 and f"process {dead.pid} is not running" in out.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_wait_ignores_a_squatter_when_given_the_servers_pid(broker: BrokerProc) -> None:
    # The readiness probe that cannot be fooled: a squatter listens on the port
    # (SO_REUSEADDR, the hole --hold leaves), the real server is not up yet.
    proc = _lease(broker, "--hold", "0", "--", PYTHON, "-c", LATE_SERVER)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "waiting\n"
    port = procnet_port_of(proc.pid)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("0.0.0.0", port))
    squatter.listen()
    try:
        assert portlease("wait", str(port), "--timeout", "5").returncode == 0  # fooled
        out = portlease("wait", str(port), "--pid", str(proc.pid), "--timeout", "0.3")
        assert out.returncode == 1  # not fooled
        squatter.close()  # (a listening squatter would refuse the real server's bind)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "listening\n"
        assert portlease("wait", str(port), "--pid", str(proc.pid), "--timeout", "60").returncode == 0
    finally:
        squatter.close()
        proc.communicate("done\n", timeout=30)
