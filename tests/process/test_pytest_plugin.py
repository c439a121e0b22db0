"""The pytest plugin, exercised by real pytest runs (xdist workers included)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from brokerproc import BrokerProc, Raw
from portlease.client import Connection
from xdistsuite import SUITE_HEAD, assert_overlapping_holds_disjoint, run_concurrently

pytest_plugins = ["pytester"]

# Plugins of this environment that have nothing to do with portlease; hypothesis
# alone re-imports itself in every in-process run (seconds on this machine).
# pytest-asyncio (pytest-aiohttp needs it loaded) warns in every run whose ini
# does not set its loop scope.
UNRELATED = ("-p", "no:hypothesispytest", "-p", "no:benchmark",
             "-o", "asyncio_default_fixture_loop_scope=function")


def run_inline(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*UNRELATED, *args)

# Each test binds the ports it got while it holds them (two holders of one
# port would fail with EADDRINUSE) and records when it held them; the barrier
# and the binding are tests/xdistsuite.py's.
XDIST_TESTS = SUITE_HEAD + r'''

def hold(ports, nodeid):
    socks = bind_all(ports)
    start = time.time()
    time.sleep(0.03)
    with open(OUT, "a") as f:
        f.write(json.dumps({"run": os.environ["PL_RUN"], "node": nodeid, "ports": list(ports),
                            "start": start, "end": time.time(),
                            "worker": os.environ.get("PYTEST_XDIST_WORKER")}) + "\n")
    for s in socks:
        s.close()


@pytest.mark.parametrize("i", range(6))
def test_lease(port_lease, portlease_connection, request, i):
    ports = port_lease(3)
    assert ports.ports == tuple(range(ports.port, ports.port + 3))
    mine = [info for info in portlease_connection.status().leases
            if info.ports == list(ports.ports)]
    # A worker's note names its test and its run (the controller: pid and command line).
    assert len(mine) == 1 and mine[0].note.startswith(request.node.nodeid + " [run ")
    assert f"[run {os.getppid()}: pytest -n 2 " in mine[0].note
    assert mine[0].pid == os.getpid()
    hold(ports.ports, request.node.nodeid)


@pytest.mark.parametrize("i", range(6))
def test_free_port(free_port, request, i):
    assert isinstance(free_port, int)
    hold([free_port], request.node.nodeid)
'''


def test_xdist_workers_of_concurrent_runs_never_share_a_port(
    pytester: pytest.Pytester, broker: BrokerProc, tmp_path: Path
) -> None:
    pytester.makepyfile(test_ports=XDIST_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    _, records = run_concurrently(
        pytester.path, ["-p", "no:cacheprovider", *UNRELATED, "--portlease-socket", broker.socket,
                        "test_ports.py"],
        workers=2, env=env, passed="12 passed", timeout=120)
    assert len(records) == 24
    assert len({(r["run"], r["worker"]) for r in records}) == 4
    assert_overlapping_holds_disjoint(records)
    # Every lease ended with its test (and the workers' connections are gone).
    assert Raw(broker.socket).call({"op": "status"})["leases"] == []


def test_leases_end_with_their_test_and_notes_name_it(
    pytester: pytest.Pytester, broker: BrokerProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNER_NAME", "runner-b")
    monkeypatch.delenv("GITHUB_JOB", raising=False)
    pytester.makepyfile(
        """
        import pytest

        def test_a(port_lease, free_port, portlease_connection, request):
            two = port_lease(2)
            custom = port_lease(1, note="custom note")
            notes = {tuple(i.ports): i.note for i in portlease_connection.status().leases}
            assert notes[two.ports] == request.node.nodeid + " runner_name=runner-b"
            assert notes[custom.ports] == "custom note"
            assert notes[(free_port,)] == request.node.nodeid + " runner_name=runner-b"
            assert len(portlease_connection.leases) == 3

        def test_b(portlease_connection):
            # Same session connection: test_a's leases were released explicitly.
            assert portlease_connection.status().summary.leases == 0
            assert portlease_connection.leases == []
        """
    )
    result = run_inline(pytester, "--portlease-socket", broker.socket)
    result.assert_outcomes(passed=2)


def test_ini_socket_is_relative_to_the_ini_file(
    pytester: pytest.Pytester, broker: BrokerProc
) -> None:
    pytester.makeini(f"[pytest]\nportlease_socket = {os.path.relpath(broker.socket, pytester.path)}\n")
    pytester.makepyfile("def test_port(free_port):\n    assert 0 < free_port < 65536\n")
    run_inline(pytester).assert_outcomes(passed=1)


def test_no_broker_fails_by_default_with_a_clear_message(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    missing = str(tmp_path / "nobody.sock")
    pytester.makepyfile(
        "def test_one(free_port):\n    pass\n\ndef test_two(port_lease):\n    pass\n"
        "def test_none():\n    pass\n"
    )
    result = run_inline(pytester, "--portlease-socket", missing)
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines([f"*no portlease broker answers at {missing}*"])
    result.stdout.fnmatch_lines(["*portlease_required = false*"])


def test_no_broker_skips_when_not_required(pytester: pytest.Pytester, tmp_path: Path) -> None:
    missing = str(tmp_path / "nobody.sock")
    pytester.makepyfile("def test_one(free_port):\n    pass\n\ndef test_none():\n    pass\n")
    pytester.makeini(f"[pytest]\nportlease_socket = {missing}\nportlease_required = false\n")
    result = run_inline(pytester, "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([f"*portlease: no portlease broker answers at {missing}*"])
    # The command line wins over the ini file.
    run_inline(pytester, "--portlease-required=yes").assert_outcomes(passed=1, errors=1)


def test_a_lease_lost_across_a_broker_restart_fails_its_test(
    pytester: pytest.Pytester, broker: BrokerProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert broker.proc is not None
    monkeypatch.setenv("PL_BROKER_PID", str(broker.proc.pid))
    pytester.makepyfile(
        """
        import os, signal, time

        def test_survives_restart_with_a_forgetful_broker(port_lease):
            held = port_lease(2)
            os.kill(int(os.environ["PL_BROKER_PID"]), signal.SIGKILL)
            deadline = time.monotonic() + 20
            while held.lost is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert held.lost is not None
        """
    )

    def forgetful_restart() -> None:
        # Stands in for a broker whose journal was lost: nothing to reclaim.
        assert broker.proc is not None
        broker.proc.wait(timeout=60)
        os.unlink(broker.state)
        broker.start()

    restarter = threading.Thread(target=forgetful_restart)
    restarter.start()
    try:
        result = run_inline(pytester, "--portlease-socket", broker.socket)
    finally:
        if restarter.is_alive() and broker.proc is not None:
            broker.proc.send_signal(signal.SIGKILL)
        restarter.join()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*lost after a broker restart*", "*granted to someone else*"])


def test_loading_the_plugin_imports_nothing_heavy() -> None:
    code = (
        "import sys, portlease.client.pytest_plugin; "
        "heavy = [m for m in ('msgspec', 'trio', 'portlease.client.sync') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_advice_names_where_the_socket_was_configured(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    missing = str(tmp_path / "nobody.sock")
    pytester.makepyfile("def test_one(free_port):\n    pass\n")
    result = run_inline(pytester, "--portlease-socket", missing)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*the socket {missing} comes from --portlease-socket*"])
    assert "PORTLEASE_SOCKET" not in result.stdout.str()
    ini = pytester.makeini(f"[pytest]\nportlease_socket = {missing}\n")
    result = run_inline(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*comes from portlease_socket in {ini}*"])
    assert "PORTLEASE_SOCKET" not in result.stdout.str()


# ---------------------------------------------------------------- docs/usage.md, run as written

USAGE = Path(__file__).resolve().parents[2] / "docs" / "usage.md"


def doc_block(lang: str, containing: str) -> str:
    """The fenced ``lang`` block of docs/usage.md that contains ``containing``."""
    text = USAGE.read_text()
    blocks = text.split(f"```{lang}\n")[1:]
    found = [b.split("```", 1)[0] for b in blocks if containing in b.split("```", 1)[0]]
    assert len(found) == 1, f"docs/usage.md has {len(found)} {lang} blocks with {containing!r}"
    return found[0]


def test_the_ini_block_of_the_docs_works_when_copied(
    pytester: pytest.Pytester, broker: BrokerProc, tmp_path: Path
) -> None:
    block = doc_block("ini", "portlease_required")
    assert "/run/portlease/portlease.sock" in block
    (pytester.path / "pytest.ini").write_text(
        block.replace("/run/portlease/portlease.sock", broker.socket))
    pytester.makepyfile("def test_port(free_port):\n    assert 0 < free_port < 65536\n")
    run_inline(pytester).assert_outcomes(passed=1)  # the socket line was read as a path
    (pytester.path / "pytest.ini").write_text(
        block.replace("/run/portlease/portlease.sock", str(tmp_path / "nobody.sock")))
    run_inline(pytester).assert_outcomes(skipped=1)  # portlease_required = false was read


def test_the_session_scoped_fixtures_of_the_docs_work(
    pytester: pytest.Pytester, broker: BrokerProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORTLEASE_SOCKET", broker.socket)  # for the async fixture's open_lease()
    pytester.makeconftest(doc_block("python", "def web_server(portlease_connection)"))
    pytester.makepyfile(
        test_docs=doc_block("python", "async def echo_server")
        + "\n\ndef test_web(web_server, portlease_connection):\n"
        "    notes = [i.note for i in portlease_connection.status().leases]\n"
        "    assert 'shared web server' in notes and web_server.startswith('http://127.0.0.1:')\n"
        "\n\ndef test_web_again(web_server):\n"
        "    pass\n"
    )
    result = run_inline(pytester, "--portlease-socket", broker.socket, "-p", "anyio")
    result.assert_outcomes(passed=3)
    assert Raw(broker.socket).call({"op": "status"})["leases"] == []


def test_the_socketserver_example_of_the_docs_serves_on_the_leased_socket(
    broker: BrokerProc,
) -> None:
    code = doc_block("python", "socketserver.TCPServer(None")
    assert "server.serve_forever()" in code
    code = code.replace("server.serve_forever()",
                        "print(server.server_address[1], flush=True)\n    server.handle_request()")
    env = dict(os.environ, PORTLEASE_SOCKET=broker.socket)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"hello\n")
            assert client.makefile("rb").readline() == b"hello\n"
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


# ---------------------------------------------------------------- bound sockets


def _echo_once(sock: socket.socket) -> None:
    conn, _ = sock.accept()
    with conn:
        conn.sendall(conn.recv(1024))


def _roundtrip(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=10) as client:
        client.sendall(b"ping")
        return client.recv(1024)


def test_lease_socket_is_bound_listening_owned_and_closed_with_the_lease(
    broker: BrokerProc,
) -> None:
    with Connection(broker.socket) as conn:
        held = conn.lease(2)
        tcp = held.socket()
        assert held.socket() is tcp and held.socket(1) is not tcp
        assert tcp.getsockname()[1] == held.port
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        udp = held.socket(1, udp=True)
        assert udp.type == socket.SOCK_DGRAM and udp.getsockname()[1] == held[1]
        # Nothing else can bind the port now: there is no window.
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            squatter = socket.socket(family, socket.SOCK_STREAM)
            with squatter, pytest.raises(OSError) as exc:
                squatter.bind((host, held.port))
            assert exc.value.errno == errno.EADDRINUSE
        # A tiny real server on the returned socket, over IPv4 and IPv6 (dual stack).
        for host in ("127.0.0.1", "::1"):
            server = threading.Thread(target=_echo_once, args=(tcp,))
            server.start()
            assert _roundtrip(host, held.port) == b"ping"
            server.join(10)
        conn.release(held)
        assert tcp.fileno() == -1 and udp.fileno() == -1
        with pytest.raises(ValueError, match="released"):
            held.socket()
        other = conn.lease(1)
        bound = other.socket(host="127.0.0.1")
        assert bound.family == socket.AF_INET and bound.getsockname() == ("127.0.0.1", other.port)
    assert bound.fileno() == -1  # closing the connection closed it


CHILD_SERVER = r"""
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))   # the lease's socket, inherited
conn, _ = sock.accept()
conn.sendall(conn.recv(1024))
"""


def test_a_child_process_serves_on_the_inherited_leased_socket(broker: BrokerProc) -> None:
    with Connection(broker.socket) as conn:
        held = conn.lease(1)
        fd = held.socket().fileno()
        child = subprocess.Popen([sys.executable, "-c", CHILD_SERVER, str(fd)], pass_fds=(fd,))
        try:
            assert _roundtrip("127.0.0.1", held.port) == b"ping"
            assert child.wait(timeout=30) == 0
        finally:
            child.kill()


def test_the_leased_socket_fixture(pytester: pytest.Pytester, broker: BrokerProc) -> None:
    pytester.makepyfile(
        """
        import socket, threading

        def test_serves(leased_socket, portlease_connection):
            port = leased_socket.getsockname()[1]
            held = {tuple(i.ports) for i in portlease_connection.status().leases}
            assert held == {(port,)}

            def serve():
                conn, _ = leased_socket.accept()
                with conn:
                    conn.sendall(conn.recv(16))

            t = threading.Thread(target=serve)
            t.start()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(b"x")
                assert c.recv(16) == b"x"
            t.join()

        def test_after(portlease_connection):
            assert portlease_connection.status().summary.leases == 0
        """
    )
    run_inline(pytester, "--portlease-socket", broker.socket).assert_outcomes(passed=2)
