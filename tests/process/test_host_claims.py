"""Host-wide claims: brokers of different users on one host never grant the same port.

Real processes and real second uids (throw-away users from tests/localusers.py,
run with setpriv). The interpreter of this suite usually lives under /root
(mode 0700), which another uid cannot reach; those users' portlease processes
therefore run with one ambient capability, CAP_DAC_READ_SEARCH (read any
file), and nothing else. It changes nothing that is tested here: the uid seen
by SO_PEERCRED and by the kernel's socket tables is theirs, and no capability
lets a process bind an abstract socket name that is bound already. The hostile
claimer runs the system's plain python3 with no capability at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from brokerproc import PYTHON, BrokerProc, Raw
from localusers import temporary_users
from portlease.broker.config import Config
from portlease.broker.core import Session
from portlease.broker.handler import Broker
from portlease.broker.leases import Peer
from portlease.broker.state import Journal
from portlease.client.host import procnet

SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class User:
    name: str
    uid: int
    gid: int

    def prefix(self, *, caps: bool = True) -> list[str]:
        """The command prefix that runs a program as this user."""
        if self.uid == 0:
            return []
        extra = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"] if caps else []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *extra, "--"]

    def private_dir(self, parent: Path, name: str) -> Path:
        """A 0700 directory of this user's own (a runtime directory, a socket's directory)."""
        d = parent / name
        d.mkdir(mode=0o700)
        os.chown(d, self.uid, self.gid)
        return d


ROOT = User("root", 0, 0)


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, User]]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is missing (Debian package util-linux)")
    with temporary_users("plclm", {"a": False, "b": False}) as (_group, names):
        found = {}
        for key, name in names.items():
            pw = pwd.getpwnam(name)
            found[key] = User(name, pw.pw_uid, pw.pw_gid)
        found["root"] = ROOT
        yield found


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A short directory every user may enter (Unix socket paths are at most 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="plc-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class UserBroker(BrokerProc):
    """A real ``portlease serve`` run as ``user``, its socket in a directory of that user's."""

    user: User = field(default_factory=lambda: ROOT)

    def command(self) -> list[str]:
        return [*self.user.prefix(), *super().command()]


def start_broker(user: User, parent: Path, name: str, port_range: str) -> UserBroker:
    return UserBroker(user.private_dir(parent, name), range=port_range, user=user).start()


def lease(raw: Raw, count: int = 1) -> dict[str, Any]:
    return raw.call({"op": "lease", "count": count})


def fill(raw: Raw) -> dict[int, str]:
    """Lease single ports on ``raw`` until the broker says exhausted; port → token."""
    got: dict[int, str] = {}
    while True:
        reply = lease(raw)
        if reply.get("reply") != "granted":
            assert reply.get("code") == "exhausted", reply
            return got
        got[reply["ports"][0]] = reply["token"]


def eventually(pred: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``pred`` until it returns something true. A port another broker claimed
    is passed over for the allocator's quarantine (5 s), hence the generous timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.2)


def holder(sock: str, user: User = ROOT, hold: float = 60) -> tuple[subprocess.Popen[str], int]:
    """A ``portlease lease -n 1 -- sh`` process holding one port of ``sock``'s broker; (process, port)."""
    proc = subprocess.Popen(
        [*user.prefix(), PYTHON, "-m", "portlease", "lease", "--socket", sock, "-n", "1", "--",
         "sh", "-c", f'echo "$PORTLEASE_PORT"; exec sleep {hold}'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PORTLEASE_AUTOSTART="0"), start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        kill_group(proc)
        raise AssertionError(f"the holder printed {line!r}: {proc.communicate()[1]}")
    return proc, int(line)


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


# ---------------------------------------------------------------- the reproduction


def _autostart_env(user: User, runtime: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTLEASE_", "XDG_"))}
    env.update(
        XDG_RUNTIME_DIR=str(runtime), HOME=str(runtime), PORTLEASE_AUTOSTART="1",
        PORTLEASE_SYSTEM_DIR=str(runtime / "no-system"),
        PORTLEASE_SYSTEM_CONFIG=str(runtime / "no-system.toml"),
    )
    return env


def _brokers_under(directory: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if b"serve" in argv and any(str(directory).encode() in a for a in argv):
                    found.append(int(entry))
    return found


def test_two_users_autostarted_brokers_grant_two_different_ports(
    users: dict[str, User], shared_tmp: Path
) -> None:
    """The issue: root and another user each run ``portlease lease`` with no system service."""
    other = users["a"]
    runtimes = {u.name: u.private_dir(shared_tmp, f"run-{u.name}") for u in (ROOT, other)}
    cmd = [PYTHON, "-m", "portlease", "lease", "-n", "1", "--", "sh", "-c"]
    a = subprocess.Popen(
        [*cmd, 'echo "$PORTLEASE_PORT"; exec sleep 60'], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=_autostart_env(ROOT, runtimes["root"]),
        start_new_session=True,
    )
    try:
        assert a.stdout is not None
        first = a.stdout.readline().strip()
        if not first.isdigit():
            kill_group(a)
            raise AssertionError(f"root's lease printed {first!r}: {a.communicate()[1]}")
        b = subprocess.run(
            [*other.prefix(), *cmd, 'echo "$PORTLEASE_PORT"'], capture_output=True, text=True,
            env=_autostart_env(other, runtimes[other.name]), timeout=60,
        )
        assert b.returncode == 0, b.stderr
        second = b.stdout.strip()
        assert second.isdigit() and second != first, (first, second)
        # Two users' brokers live here now: the second client says once that a
        # system service would give them one broker and one status view.
        notices = [line for line in b.stderr.splitlines() if "system service" in line]
        assert len(notices) == 1 and "docs/systemd.md" in notices[0], b.stderr
    finally:
        kill_group(a)
        for d in runtimes.values():
            for pid in _brokers_under(d):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- two brokers, one range


@pytest.mark.parametrize(("first", "second"), [("a", "b"), ("root", "a")],
                         ids=["two-per-user-brokers", "per-user-beside-system"])
def test_two_brokers_on_one_range_never_grant_one_port_twice(
    users: dict[str, User], shared_tmp: Path, port_range: str, first: str, second: str
) -> None:
    """Many concurrent leases from two brokers of two uids; then SIGKILL of a holder and of a broker."""
    ua, ub = users[first], users[second]
    ba = start_broker(ua, shared_tmp, "a", port_range)
    bb = start_broker(ub, shared_tmp, "b", port_range)
    try:
        ra, rb = Raw(ba.socket), Raw(bb.socket)
        # Both brokers lease at once, one thread each, until neither can:
        # every port of the range is then held by exactly one of them.
        got: dict[str, dict[int, str]] = {}
        threads = [threading.Thread(target=lambda k, r: got.__setitem__(k, fill(r)), args=(k, r))
                   for k, r in (("a", ra), ("b", rb))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got["a"] and got["b"], got
        assert not set(got["a"]) & set(got["b"]), sorted(set(got["a"]) & set(got["b"]))
        claims = procnet.port_claims(*map(int, port_range.split("-")))
        assert {p: claims[p].uid for p in got["a"]} == dict.fromkeys(got["a"], ua.uid)
        assert {p: claims[p].uid for p in got["b"]} == dict.fromkeys(got["b"], ub.uid)

        # One of A's ports goes to a `portlease lease` process of A's; B still
        # cannot have it. The holder is SIGKILLed: A ends its lease, the claim
        # goes, and B grants that port.
        freed, token = got["a"].popitem()
        assert ra.call({"op": "release", "token": token})["reply"] == "released"
        proc, port = holder(ba.socket, ua)
        try:
            assert port == freed
            assert lease(rb).get("code") == "exhausted"
            kill_group(proc)
            again = eventually(lambda: lease(rb).get("ports"), "broker B grants the freed port")
            assert again == [port]
        finally:
            kill_group(proc)

        # Broker A is killed: every claim it held goes with it, and B grants them all.
        held_by_a = {p for p, c in procnet.port_claims(*map(int, port_range.split("-"))).items()
                     if c.uid == ua.uid}
        ba.kill(signal.SIGKILL)
        taken: list[int] = []
        eventually(lambda: taken.extend(fill(rb)) or held_by_a <= set(taken),
                   "broker B grants every port the killed broker A held")
    finally:
        for b in (ba, bb):
            b.stop()


# ---------------------------------------------------------------- a hostile claimer

HOSTILE = """
import socket, sys
low, high = map(int, sys.argv[1:3])
held = []
for port in range(low, high + 1):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            s.bind(f"\\0portlease/port/{port}")
        except OSError:
            s.close()
            continue
        held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""


def test_a_user_who_claims_every_name_can_only_deny_ports(
    users: dict[str, User], shared_tmp: Path, port_range: str
) -> None:
    low, high = map(int, port_range.split("-"))
    b = start_broker(ROOT, shared_tmp, "b", port_range)
    hostile = users["b"]
    try:
        r = Raw(b.socket)
        mine = lease(r, 3)
        assert mine["reply"] == "granted"
        attacker = subprocess.Popen(
            [*hostile.prefix(caps=False), SYSTEM_PYTHON, "-c", HOSTILE, str(low), str(high)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert attacker.stdout is not None
            bound = int(attacker.stdout.readline())
            # Every name but the three the broker holds (stream), and every datagram name.
            assert bound == 2 * (high - low + 1) - 3
            claims = procnet.port_claims(low, high)
            assert all(claims[p].uid == 0 for p in mine["ports"])  # not stolen
            assert {c.uid for p, c in claims.items() if p not in mine["ports"]} == {hostile.uid}
            # Denied, the same as if every port were bound: a clear refusal, no crash.
            refused = lease(r)
            assert refused["code"] == "exhausted", refused
            assert r.call({"op": "renew", "token": mine["token"]})["reply"] == "renewed"
            out = subprocess.run([PYTHON, "-m", "portlease", "status", "--socket", b.socket],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert f"{high - low + 1 - 3} ports of the range held by other brokers" in out.stdout
            assert hostile.name in out.stdout and str(attacker.pid) in out.stdout
        finally:
            attacker.kill()
            attacker.wait(timeout=10)
        # The attacker's names went with it; the broker grants again.
        assert eventually(lambda: lease(r).get("reply") == "granted", "grants resume")
        assert Raw(b.socket).call({"op": "ping"})["reply"] == "pong"
    finally:
        b.stop()


# ---------------------------------------------------------------- status


def test_status_names_other_brokers_claims_apart_from_squatters(
    users: dict[str, User], shared_tmp: Path, port_range: str
) -> None:
    other = users["a"]
    ba = start_broker(other, shared_tmp, "a", port_range)
    bb = start_broker(ROOT, shared_tmp, "b", port_range)
    squat = socket.socket()
    bound = socket.socket()
    try:
        proc, port = holder(ba.socket, other)
        try:
            # The other broker's client binds its leased port: a socket, but no squatter.
            bound.bind(("127.0.0.1", port))
            mine = lease(Raw(bb.socket), 2)
            assert port not in mine["ports"]
            squat_port = mine["ports"][-1] + 1
            squat.bind(("127.0.0.1", squat_port))

            def status(*args: str, user: User = ROOT) -> str:
                out = subprocess.run(
                    [*user.prefix(), PYTHON, "-m", "portlease", "status", "--socket", bb.socket, *args],
                    capture_output=True, text=True, timeout=30)
                assert out.returncode == 0, out.stderr
                return out.stdout

            text = status()
            row = next(line for line in text.splitlines() if line.strip().startswith(f"{port} "))
            # Root sees the holder's pid in /proc: it is broker A's.
            assert row.split()[1:4] == [str(other.uid), other.name, str(ba.proc.pid)], row  # type: ignore[union-attr]
            assert "1 port of the range held by other brokers" in text
            squatters = status("--squatters")
            table, _, claims = squatters.partition("held by other brokers")
            assert f"{squat_port} tcp" in table and f"{port} tcp" not in table, squatters
            assert "1 squatter" in table
            assert f"\n  {port} " in claims
        finally:
            kill_group(proc)
    finally:
        squat.close()
        bound.close()
        ba.stop()
        bb.stop()


# ---------------------------------------------------------------- file descriptors


def test_out_of_file_descriptors_is_a_clear_busy_not_a_crash(
    tmp_path: Path, port_range: str
) -> None:
    """Each held port costs the broker one fd: at the limit a grant is refused ``busy``."""
    b = BrokerProc(tmp_path, range=port_range)
    command = b.command
    b.command = lambda: ["prlimit", "--nofile=90:90", "--", *command()]  # type: ignore[method-assign]
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit is missing (Debian package util-linux)")
    b.start()
    try:
        r = Raw(b.socket)
        granted: list[dict[str, Any]] = []
        while True:
            reply = lease(r)
            if reply.get("reply") != "granted":
                break
            granted.append(reply)
            assert len(granted) < 100, "the fd limit never bit"
        assert reply["code"] == "busy", reply
        assert "out of file descriptors" in reply["message"], reply
        assert "open-file limit 90" in reply["message"], reply
        # Still serving: a release gives the fd back and the next grant succeeds.
        assert r.call({"op": "release", "token": granted[-1]["token"]})["reply"] == "released"
        assert lease(r)["reply"] == "granted"
        assert b.proc is not None and b.proc.poll() is None
    finally:
        b.stop()


# ---------------------------------------------------------------- the shell keeps claims as long as leases


def _inproc(tmp_path: Path, port_range: str) -> Broker:
    low, high = map(int, port_range.split("-"))
    config = Config(port_min=low, port_max=high, ttl=30.0)
    broker = Broker(config=config, journal=Journal(str(tmp_path / "s.jsonl")))
    broker.restore()
    return broker


def _call(broker: Broker, session: Session, **msg: Any) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(broker.answer(session, json.dumps({"id": 1, **msg}).encode()))
    return reply


def _claimed(port_range: str) -> set[int]:
    return set(procnet.port_claims(*map(int, port_range.split("-"))))


def test_claims_are_held_for_exactly_the_life_of_each_lease(tmp_path: Path, port_range: str) -> None:
    broker = _inproc(tmp_path, port_range)
    assert broker.claims is not None
    s = Session(id=1, peer=Peer(pid=os.getpid(), uid=0, gid=0))
    assert _call(broker, s, op="hello", version=1)["reply"] == "hello"
    first = _call(broker, s, op="lease", count=3)["ports"]
    assert _claimed(port_range) == set(first)
    # The next run's middle port is claimed elsewhere: the claim taken for the
    # run's first port goes back, and the lease lands past the busy port.
    busy = first[-1] + 2
    elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    elsewhere.bind(f"\0portlease/port/{busy}")
    try:
        second = _call(broker, s, op="lease", count=3)
        assert busy < second["ports"][0]
        assert _claimed(port_range) == {*first, *second["ports"], busy}
        assert len(broker.claims) == 6
    finally:
        elsewhere.close()
    # A grant the journal refuses is rolled back with its claims.
    def refuse(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    broker.journal.granted = refuse  # type: ignore[method-assign]
    refused = _call(broker, s, op="lease", count=4)
    assert refused["code"] == "busy" and len(broker.claims) == 6
    del broker.journal.granted
    # Released, detached-then-expired, and closed-connection leases give theirs back.
    assert _call(broker, s, op="release", token=second["token"])["reply"] == "released"
    assert _claimed(port_range) == set(first)
    detached = _call(broker, s, op="lease", count=1, detach=True, ttl=1)
    assert set(detached["ports"]) <= _claimed(port_range)
    broker.clock = lambda: time.monotonic() + 5  # its TTL is over
    broker.tick()
    broker.clock = time.monotonic
    assert _claimed(port_range) == set(first)
    broker.closed(s)
    assert _claimed(port_range) == set() and len(broker.claims) == 0

    # Restored leases take their claims back; one whose port another broker
    # claimed meanwhile is dropped (that broker's live lease wins).
    a = _call(broker, s2 := Session(id=2, peer=Peer(pid=os.getpid(), uid=0, gid=0)), op="hello", version=1)
    assert a["reply"] == "hello"
    kept = _call(broker, s2, op="lease", count=2, detach=True)["ports"]
    lost = _call(broker, s2, op="lease", count=2, detach=True)["ports"]
    broker.shutdown()
    assert _claimed(port_range) == set()  # a stopped broker holds nothing
    elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    elsewhere.bind(f"\0portlease/port/{lost[1]}")
    try:
        again = _inproc(tmp_path, port_range)
        assert [r.ports for r in again.table] == [kept]
        assert _claimed(port_range) == {*kept, lost[1]}
        again.shutdown()
    finally:
        elsewhere.close()
