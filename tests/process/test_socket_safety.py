"""Another local user must never reach your leases: planted per-user directories and sockets.

As root the module creates a throw-away user (the attacker) with tests/localusers.py. Its
fake broker runs under that uid through ``setpriv --reuid`` with the system's
own ``/usr/bin/python3`` (stdlib only), answers hello and lease like a broker
would, and prints every byte it receives. The victim (this process, root) uses
the per-user socket under a private ``$XDG_RUNTIME_DIR``; the sync client, the
async client and ``portlease lease -- CMD`` must each refuse and send nothing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from brokerproc import BrokerProc, wait_for_socket
from localusers import temporary_users
from portlease.client import BrokerUnavailable, Connection, LeaseLost, UnsafeSocket, open_lease
from portlease.client.paths import user_socket

SYSTEM_PYTHON = "/usr/bin/python3"

FAKE_BROKER = r"""
import json, os, socket, sys
path, mode = sys.argv[1], sys.argv[2]
if mode != "-":
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.chmod(os.path.dirname(path), int(mode, 8))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(8)
print("READY", flush=True)
while True:
    conn, _ = s.accept()
    with conn:
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                break
            print("GOT", repr(data), flush=True)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg["op"] == "hello":
                    reply = {"reply": "hello", "id": msg["id"], "version": 1, "broker": "x", "pid": 1}
                else:
                    reply = {"reply": "granted", "id": msg["id"], "ports": [40123], "token": "t",
                             "ttl": 120.0}
                conn.sendall(json.dumps(reply).encode() + b"\n")
"""


@dataclass
class Attacker:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="module")
def attacker() -> Iterator[Attacker]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is missing")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing (the attacker's interpreter)")
    with temporary_users("plsock", {"a": False}) as (_group, names):
        pw = pwd.getpwnam(names["a"])
        yield Attacker(pw.pw_name, pw.pw_uid, pw.pw_gid)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ``$XDG_RUNTIME_DIR`` as sticky and world-writable as /tmp; no system broker."""
    base = Path(tempfile.mkdtemp(prefix="pls-", dir="/tmp"))
    os.chmod(base, 0o1777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    monkeypatch.setenv("PORTLEASE_SYSTEM_DIR", str(base / "no-system"))
    monkeypatch.setenv("PORTLEASE_SYSTEM_CONFIG", str(base / "no-system.toml"))
    monkeypatch.setenv("PORTLEASE_AUTOSTART", "0")
    monkeypatch.delenv("PORTLEASE_SOCKET", raising=False)
    assert user_socket() == str(base / "portlease" / "portlease.sock")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Fake:
    """The attacker's broker process; :meth:`received` is everything it was sent."""

    def __init__(self, who: Attacker, path: Path, dir_mode: str = "-") -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={who.uid}", f"--regid={who.gid}", "--clear-groups",
             SYSTEM_PYTHON, "-c", FAKE_BROKER, str(path), dir_mode],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", line

    def received(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        return "\n".join(line for line in out.splitlines() if line.startswith("GOT"))


def clients_all_refuse(sock: str, *, note: str, expect: str) -> None:
    """The sync client, the async client (both loops) and the CLI refuse ``sock``, unheard."""
    with pytest.raises(UnsafeSocket) as exc:
        Connection(timeout=5).lease(1, note=note)
    assert sock in str(exc.value) and expect in str(exc.value)

    async def via_async() -> None:
        with pytest.raises(UnsafeSocket) as aexc:
            async with open_lease(1, note=note, timeout=5):
                pass
        assert sock in str(aexc.value) and expect in str(aexc.value)

    for backend in ("asyncio", "trio"):
        anyio.run(via_async, backend=backend)
    cli = subprocess.run([sys.executable, "-m", "portlease", "lease", "--note", note,
                          "--", "true"], capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0
    assert "refusing the portlease socket" in cli.stderr and sock in cli.stderr, cli.stderr


def test_a_planted_world_writable_directory_is_refused(attacker: Attacker, runtime: Path) -> None:
    sock = runtime / "portlease" / "portlease.sock"
    fake = Fake(attacker, sock, dir_mode="0777")
    try:
        clients_all_refuse(str(sock), note="secret-note-1", expect=f"belongs to uid {attacker.uid}")
    finally:
        got = fake.received()
    assert got == ""  # nothing was sent, the note least of all


def test_a_world_writable_directory_of_ones_own_is_refused_too(
    attacker: Attacker, runtime: Path
) -> None:
    directory = runtime / "portlease"
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o777)
    # The attacker put a socket in it, which that mode allows.
    fake = Fake(attacker, directory / "portlease.sock")
    try:
        clients_all_refuse(str(directory / "portlease.sock"), note="secret-note-2",
                           expect="writable by group or others (mode 0777)")
    finally:
        got = fake.received()
    assert got == ""


def test_a_planted_symlink_is_refused(attacker: Attacker, runtime: Path) -> None:
    evil = runtime / "evil"
    fake = Fake(attacker, evil / "portlease.sock", dir_mode="0755")
    (runtime / "portlease").symlink_to(evil)
    try:
        clients_all_refuse(str(runtime / "portlease" / "portlease.sock"), note="secret-note-3",
                           expect="is a symlink")
    finally:
        got = fake.received()
    assert got == ""


def test_a_socket_served_by_another_uid_is_refused_after_connect(
    attacker: Attacker, runtime: Path
) -> None:
    # The directory is ours and private; the socket in it is the attacker's
    # (moved in by root here). Only SO_PEERCRED can tell.
    directory = runtime / "portlease"
    directory.mkdir(mode=0o700)
    fake = Fake(attacker, runtime / "evil" / "s.sock", dir_mode="0755")
    os.rename(runtime / "evil" / "s.sock", directory / "portlease.sock")
    try:
        clients_all_refuse(str(directory / "portlease.sock"), note="secret-note-4",
                           expect=f"runs as uid {attacker.uid}, not as you")
    finally:
        got = fake.received()
    assert got == ""


def test_the_same_fake_is_believed_when_configured_explicitly(
    attacker: Attacker, runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: the fake does answer a client that trusts it, so the refusals above are real."""
    fake = Fake(attacker, runtime / "evil" / "s.sock", dir_mode="0755")
    monkeypatch.setenv("PORTLEASE_SOCKET", str(runtime / "evil" / "s.sock"))
    try:
        with Connection(timeout=5) as conn:
            assert conn.lease(1, note="explicit-note").ports == (40123,)
    finally:
        got = fake.received()
    assert "explicit-note" in got


def test_the_system_socket_must_be_served_by_root(
    attacker: Attacker, runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = runtime / "system"
    system.mkdir(mode=0o755)
    monkeypatch.setenv("PORTLEASE_SYSTEM_DIR", str(system))
    fake = Fake(attacker, runtime / "evil" / "s.sock", dir_mode="0755")
    os.rename(runtime / "evil" / "s.sock", system / "portlease.sock")
    try:
        with pytest.raises(UnsafeSocket, match="not as root or you"):
            Connection(timeout=5)
    finally:
        got = fake.received()
    assert got == ""


class UserBroker(BrokerProc):
    """A real broker on the per-user socket."""

    @property
    def socket(self) -> str:
        return user_socket()


def test_a_reconnect_checks_again_and_never_reaches_a_planted_broker(
    attacker: Attacker, runtime: Path, capfd: pytest.CaptureFixture[str], port_range: str
) -> None:
    directory = runtime / "portlease"
    directory.mkdir(mode=0o700)
    state = runtime / "state"
    state.mkdir()
    broker = UserBroker(state, range=port_range).start()
    fake: Fake | None = None
    lost: list[LeaseLost] = []
    try:
        with Connection(timeout=2, on_lost=lambda held, exc: lost.append(exc)) as conn:
            held = conn.lease(1, note="before")
            broker.kill()
            # The attacker's socket takes the path while the broker is away
            # (moved in by root here, standing for any way it could get there).
            os.unlink(user_socket())
            fake = Fake(attacker, runtime / "evil" / "s.sock", dir_mode="0755")
            os.rename(runtime / "evil" / "s.sock", user_socket())
            deadline = time.monotonic() + 10
            while not lost and time.monotonic() < deadline:
                time.sleep(0.02)
            assert lost and held.lost is lost[0]
            assert f"runs as uid {attacker.uid}" in str(lost[0])
            with pytest.raises(LeaseLost):
                conn.lease(1, note="after")
            with pytest.raises(UnsafeSocket):
                conn.lease(1, note="after")
    finally:
        broker.stop()
        got = fake.received() if fake is not None else ""
    assert got == ""
    assert "lost after a broker restart" in capfd.readouterr().err


def test_a_directory_that_is_ours_and_private_is_used(runtime: Path, port_range: str) -> None:
    """Control: the checks let the rightful broker through, on the per-user path."""
    (runtime / "portlease").mkdir(mode=0o700)
    state = runtime / "state"
    state.mkdir()
    broker = UserBroker(state, range=port_range).start()
    try:
        wait_for_socket(user_socket())
        with Connection(timeout=5) as conn:
            assert len(conn.lease(2).ports) == 2
    finally:
        broker.stop()


def test_no_broker_with_autostart_off_says_so(runtime: Path) -> None:
    with pytest.raises(BrokerUnavailable, match=r"autostart is off \(PORTLEASE_AUTOSTART=0"):
        Connection(timeout=1)
    with contextlib.suppress(FileNotFoundError):
        assert os.listdir(runtime / "portlease") == []
