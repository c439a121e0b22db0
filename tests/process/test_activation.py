"""Socket activation against real sockets handed to real child processes.

The child is started the way a service manager starts it: the sockets sit at
fd 3, 4, … and ``LISTEN_PID`` names the exec'd process itself (the shell sets
it to ``$$`` and then execs, so the pid carries over).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portlease.broker.activation import inherited_listener
from portlease.client.protocol.errors import StartupError

CHILD = r"""
import json, os, socket, subprocess, sys
from portlease.broker.activation import inherited_listener, socket_path
from portlease.client.protocol.errors import StartupError

name = sys.argv[1] or None
out = {}
try:
    sock = inherited_listener(name=name)
except StartupError as exc:
    out["error"] = str(exc)
else:
    if sock is None:
        out["sock"] = None
    else:
        out["fd"] = sock.fileno()
        out["path"] = socket_path(sock)
        out["inheritable"] = os.get_inheritable(sock.fileno())
        sock.settimeout(10)
        conn, _ = sock.accept()
        conn.sendall(b"served by %d" % os.getpid())
        conn.close()
out["env"] = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
# A grandchild sees the C environment, so this proves unsetenv() happened.
out["grandchild"] = subprocess.run(
    ["sh", "-c", 'echo "${LISTEN_PID-u}${LISTEN_FDS-u}${LISTEN_FDNAMES-u}"'],
    capture_output=True, text=True, check=True,
).stdout.strip()
print(json.dumps(out), flush=True)
"""

CLEAN_ENV = {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


def run_activated(
    script: Path, fds: list[int], *, listen_fds: int | None = None, names: str | None = None,
    name: str = "",
) -> dict[str, object]:
    """Start the child with ``fds`` moved to 3, 4, … and the LISTEN_* variables set."""
    # Park the fds high first, so moving them into place cannot clobber one another.
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    try:
        moves = " ".join(f"{3 + i}<&{p} {p}<&-" for i, p in enumerate(parked))
        count = len(fds) if listen_fds is None else listen_fds
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        proc = subprocess.run(
            # bash, not sh: dash only redirects single-digit fds.
            ["bash", "-c", f'exec {moves}; LISTEN_PID=$$ LISTEN_FDS={count} exec "$@"', "bash",
             sys.executable, str(script), name],
            pass_fds=parked, env=env, capture_output=True, text=True, timeout=30,
        )
    finally:
        for p in parked:
            os.close(p)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def test_listening_unix_socket_is_taken_over(
    tmp_path: Path, child_script: Path, sockets: list[socket.socket]
) -> None:
    path = tmp_path / "broker.sock"
    listener = unix_listener(path)
    sockets.append(listener)
    # Queued before the child exists: an activated broker must serve it.
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sockets.append(client)
    client.connect(str(path))

    out = run_activated(child_script, [listener.fileno()])

    assert out.get("error") is None
    assert out["fd"] == 3
    assert out["path"] == str(path)
    assert out["inheritable"] is False
    assert out["env"] == CLEAN_ENV
    assert out["grandchild"] == "uuu"
    client.settimeout(5)
    assert client.recv(100).startswith(b"served by ")


def test_fdnames_select_the_named_socket(
    tmp_path: Path, child_script: Path, sockets: list[socket.socket]
) -> None:
    other = unix_listener(tmp_path / "other.sock")
    ours = unix_listener(tmp_path / "ours.sock")
    sockets += [other, ours]
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sockets.append(client)
    client.connect(str(tmp_path / "ours.sock"))

    out = run_activated(
        child_script, [other.fileno(), ours.fileno()], names="other:portlease", name="portlease"
    )

    assert out.get("error") is None
    assert out["fd"] == 4
    assert out["path"] == str(tmp_path / "ours.sock")
    assert out["env"] == CLEAN_ENV
    client.settimeout(5)
    assert client.recv(100).startswith(b"served by ")


def test_unknown_fdname_is_refused(
    tmp_path: Path, child_script: Path, sockets: list[socket.socket]
) -> None:
    listener = unix_listener(tmp_path / "s.sock")
    sockets.append(listener)
    out = run_activated(child_script, [listener.fileno()], names="portlease.socket", name="nope")
    assert "no inherited socket is named 'nope'" in str(out["error"])
    assert out["env"] == CLEAN_ENV


def test_without_fdnames_a_name_falls_back_to_fd_3(
    tmp_path: Path, child_script: Path, sockets: list[socket.socket]
) -> None:
    path = tmp_path / "s.sock"
    listener = unix_listener(path)
    sockets.append(listener)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sockets.append(client)
    client.connect(str(path))
    out = run_activated(child_script, [listener.fileno()], name="portlease")
    assert out["fd"] == 3


def _udp_unix(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "dgram.sock"))
    return s


def _bound_not_listening(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "idle.sock"))
    return s


def _tcp_listener(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_udp_unix, "is a SOCK_DGRAM socket, not SOCK_STREAM"),
        (_bound_not_listening, "is not listening"),
        (_tcp_listener, "is a AF_INET socket, not AF_UNIX"),
    ],
)
def test_wrong_sockets_are_refused_clearly(
    tmp_path: Path, child_script: Path, sockets: list[socket.socket], make: object,
    expected: str,
) -> None:
    assert callable(make)
    sock = make(tmp_path)
    sockets.append(sock)
    out = run_activated(child_script, [sock.fileno()])
    assert "inherited fd 3" in str(out["error"])
    assert expected in str(out["error"])
    assert out["env"] == CLEAN_ENV


def test_a_pipe_is_not_a_socket(child_script: Path) -> None:
    r, w = os.pipe()
    try:
        out = run_activated(child_script, [r])
    finally:
        os.close(r)
        os.close(w)
    assert "inherited fd 3 is not a socket" in str(out["error"])


def test_missing_fd_is_reported(
    tmp_path: Path, child_script: Path, sockets: list[socket.socket]
) -> None:
    listener = unix_listener(tmp_path / "s.sock")
    sockets.append(listener)
    out = run_activated(child_script, [listener.fileno()], listen_fds=2)
    assert "LISTEN_FDS=2 but fd 4 is not open" in str(out["error"])


# The cases below never reach an fd, so they run in this process on a plain dict.


def test_not_activated_without_variables() -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    assert inherited_listener(env) is None
    assert env == {"PATH": "/bin"}


def test_variables_for_another_pid_are_ignored_and_unset() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert inherited_listener(env) is None
    assert env == {}


def test_zero_fds_is_not_activated() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert inherited_listener(env) is None
    assert env == {}


def test_malformed_variables_are_an_error() -> None:
    env = {"LISTEN_PID": "self", "LISTEN_FDS": "1"}
    with pytest.raises(StartupError, match="not numbers"):
        inherited_listener(env)
    assert env == {}


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
def test_systemd_socket_activate_starts_on_first_connection(
    tmp_path: Path, child_script: Path
) -> None:
    """The real tool: it binds, waits for a connection, then execs the program."""
    path = tmp_path / "activated.sock"
    tool = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(path), "--fdname=portlease",
         sys.executable, str(child_script), "portlease"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 10
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            # The file appears at bind(), a moment before listen(): retry until then.
            while True:
                try:
                    client.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    assert tool.poll() is None, tool.stderr.read() if tool.stderr else ""
                    assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                    time.sleep(0.01)
            reply = client.recv(100)
        stdout, stderr = tool.communicate(timeout=10)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    out = json.loads(stdout)
    assert reply.startswith(b"served by "), stderr
    assert out["fd"] == 3
    assert out["path"] == str(path)
    assert out["env"] == CLEAN_ENV
