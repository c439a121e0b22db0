"""Hostile neighbours against a real broker: floods, connection hoarding, slow-loris,
nesting bombs, unsafe directories and planted symlinks (issue 11).

Each test runs a real ``portlease serve`` process. The attackers and the honest
client are real second uids: as root the module creates a group and two member
users with groupadd/useradd (removed afterwards), and each client runs in a
forked child that drops its privileges (setgroups/setresgid/setresuid) and talks
to the test over a socketpair of JSON lines, so the test can hold an attack in
place while it checks that the other uid is still served. Without root (or the
passwd tools) the uid tests skip.

"Served" means answered at all within a generous socket timeout (5 s): the
figures (p99, RSS under each flood) belong to ``bench/load.py``, not here. The
one number asserted is the broker's resident memory (VmRSS and its peak VmHWM
from ``/proc/PID/status``) staying below 256 MiB while a flood is pending:
without backpressure the pipelined ``status`` flood below needs about 1 GB.

Ports 5000-7499 are used by no other test module.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import selectors
import signal
import socket
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from brokerproc import PYTHON, BrokerProc, Raw
from localusers import shared_directory, temporary_users
from portlease.client import protocol as p

RANGE = "5000-7499"
HELLO = {"op": "hello", "version": p.PROTOCOL_VERSION}
SERVED_WITHIN = 5.0
"""Socket timeout of the honest client: a reply later than this counts as not served."""
RSS_LIMIT_KIB = 256 * 1024
CODES = {c.value for c in p.ErrorCode}


# ---------------------------------------------------------------- users and their processes


@dataclass
class Users:
    group: str
    attacker: str
    honest: str


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    with temporary_users("plhos", {"a": True, "b": True}) as (group, names):
        yield Users(group=group, attacker=names["a"], honest=names["b"])


class Ctl:
    """One end of the test's control channel: JSON objects, one a line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, obj: Any) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def recv(self, timeout: float) -> Any:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the other side of the control channel is gone")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


class UserProc:
    """``fn(ctl)`` in a forked child running as ``user``; its return value is the result."""

    def __init__(self, user: str, fn: Callable[[Ctl], Any]) -> None:
        pw = pwd.getpwnam(user)
        groups = os.getgrouplist(user, pw.pw_gid)
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            mine.close()
            ctl = Ctl(theirs)
            try:
                os.setgroups(groups)
                os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
                os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
                out: dict[str, Any] = {"ok": fn(ctl)}
            except BaseException as exc:
                out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                code = 1
            try:
                ctl.send({"result": out})
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self.uid = pw.pw_uid
        self.ctl = Ctl(mine)
        self.done = False

    def recv(self, timeout: float = 60.0) -> Any:
        """The child's next message; a failure in the child is raised here."""
        msg = self.ctl.recv(timeout)
        if isinstance(msg, dict) and "result" in msg:
            self._reap()
            result = msg["result"]
            if "error" in result:
                raise AssertionError(f"child failed: {result['error']}\n{result['traceback']}")
            return {"result": result["ok"]}
        return msg

    def expect(self, what: str, timeout: float = 60.0) -> Any:
        msg = self.recv(timeout)
        assert isinstance(msg, dict) and what in msg, f"expected {what!r} from the child, got {msg!r}"
        return msg[what]

    def send(self, obj: Any) -> None:
        self.ctl.send(obj)

    def result(self, timeout: float = 60.0) -> Any:
        return self.expect("result", timeout)

    def _reap(self) -> None:
        if not self.done:
            self.done = True
            os.waitpid(self.pid, 0)

    def kill(self) -> None:
        if not self.done:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._reap()
        self.ctl.sock.close()


@pytest.fixture
def spawn() -> Iterator[Callable[[str, Callable[[Ctl], Any]], UserProc]]:
    """Start user processes; any still running at the end are SIGKILLed."""
    procs: list[UserProc] = []

    def start(user: str, fn: Callable[[Ctl], Any]) -> UserProc:
        proc = UserProc(user, fn)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    with shared_directory("plhos-") as d:
        yield d


def start_broker(d: Path, users: Users, config: str = "", *args: str) -> BrokerProc:
    extra: list[str] = ["--group", users.group, *args]
    if config:
        cfg = d / "broker.toml"
        cfg.write_text(config)
        extra += ["--config", str(cfg)]
    return BrokerProc(d, extra, range=RANGE).start()


def vm_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid`` in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def no_traceback(b: BrokerProc) -> None:
    log = b.log.read_text()
    assert "Traceback" not in log, log[-4000:]


# ---------------------------------------------------------------- client code run in the children


def connect(path: str, timeout: float = SERVED_WITHIN) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


class Lines:
    """Reply lines of one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.scanned = 0
        """Bytes of ``buf`` already searched for a newline (a large reply comes in many pieces)."""

    def raw(self) -> bytes:
        while True:
            nl = self.buf.find(b"\n", self.scanned)
            if nl >= 0:
                break
            self.scanned = len(self.buf)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"broker closed the connection; pending {self.buf[:200]!r}")
            self.buf += chunk
        line = bytes(self.buf[:nl])
        del self.buf[:nl + 1]
        self.scanned = 0
        return line

    def next(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.raw())
        return out

    def eof(self) -> bool:
        """True once the broker has closed (after any lines still buffered)."""
        try:
            return self.buf == b"" and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def encode(*msgs: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(m).encode() + b"\n" for m in msgs)


def call(s: socket.socket, lines: Lines, msg: dict[str, Any]) -> dict[str, Any]:
    s.sendall(encode(msg))
    reply = lines.next()
    assert reply.get("id") == msg.get("id"), (msg, reply)
    return reply


def honest_cycles(path: str, cycles: int) -> Callable[[Ctl], Any]:
    """An honest client: ``cycles`` times lease 2 ports and release them, each within SERVED_WITHIN."""

    def run(ctl: Ctl) -> Any:
        s = connect(path)
        lines = Lines(s)
        assert call(s, lines, {"id": 0, **HELLO})["reply"] == "hello"
        ports = []
        for i in range(cycles):
            granted = call(s, lines, {"id": 2 * i + 1, "op": "lease", "count": 2, "note": "honest"})
            assert granted["reply"] == "granted", granted
            ports.append(granted["ports"])
            released = call(s, lines, {"id": 2 * i + 2, "op": "release", "token": granted["token"]})
            assert released["reply"] == "released", released
        s.close()
        return ports

    return run


def run_honest(spawn: Callable[[str, Callable[[Ctl], Any]], UserProc], users: Users,
               b: BrokerProc, cycles: int = 20) -> tuple[list[list[int]], int]:
    """Run the honest client of the other uid; return its grants and the broker's highest VmRSS meanwhile."""
    assert b.proc is not None
    honest = spawn(users.honest, honest_cycles(b.socket, cycles))
    rss = vm_kib(b.proc.pid)["VmRSS"]
    deadline = time.monotonic() + cycles * 2 * SERVED_WITHIN + 10
    while True:
        try:
            ports = honest.result(timeout=0.05)
            break
        except TimeoutError:
            rss = max(rss, vm_kib(b.proc.pid)["VmRSS"])
            assert time.monotonic() < deadline, "the honest client never finished"
    rss = max(rss, vm_kib(b.proc.pid)["VmRSS"])
    assert len(ports) == cycles and all(len(x) == 2 for x in ports), ports
    return ports, rss


# ---------------------------------------------------------------- pipelined status amplification

FLOOD_LEASES = 2000
FLOOD_STATUS = 400
NOTE = "n" * 1000


class _Shown(msgspec.Struct):
    note: str = ""


class _Page(msgspec.Struct):
    """The parts of a ``status`` reply the flooder checks (400 pages of ~660 kB each:
    msgspec reads them several times faster than json)."""

    id: int | str | None
    reply: str
    leases: list[_Shown] = []
    more: bool = False


def leased_with_notes(path: str, n: int, note: str) -> tuple[socket.socket, Lines]:
    """A connection past hello that holds ``n`` one-port leases with ``note``, taken in
    pipelined batches of 100 (each batch's replies read before the next is sent)."""
    s = connect(path, timeout=30)
    lines = Lines(s)
    assert call(s, lines, {"id": "hello", **HELLO})["reply"] == "hello"
    for start in range(0, n, 100):
        ids = range(start, min(start + 100, n))
        s.sendall(encode(*({"id": f"l{i}", "op": "lease", "count": 1, "note": note} for i in ids)))
        for i in ids:
            reply = lines.next()
            assert reply["reply"] == "granted" and reply["id"] == f"l{i}", reply
    return s, lines


def status_flooder(path: str) -> Callable[[Ctl], Any]:
    def run(ctl: Ctl) -> Any:
        s, lines = leased_with_notes(path, FLOOD_LEASES, NOTE)
        ctl.send({"leased": FLOOD_LEASES})
        ctl.recv(60)
        flood = encode(*({"id": i, "op": "status"} for i in range(FLOOD_STATUS)))
        s.sendall(flood)  # one write; then not a byte is read until the test says so
        ctl.send({"flooded": len(flood)})
        ctl.recv(120)
        ids, shown, longest, more = [], 0, 0, 0
        page_decoder = msgspec.json.Decoder(_Page)
        for _ in range(FLOOD_STATUS):
            page = page_decoder.decode(lines.raw())
            assert page.reply == "status", page.reply
            ids.append(page.id)
            shown = max(shown, len(page.leases))
            longest = max(longest, *(len(x.note) for x in page.leases))
            more += page.more
        return {"ids": ids, "most_leases_shown": shown, "longest_note": longest, "more": more}

    return run


def test_pipelined_status_flood_neither_starves_another_uid_nor_grows_the_broker(
    users: Users, open_dir: Path, spawn: Callable[[str, Callable[[Ctl], Any]], UserProc]
) -> None:
    b = start_broker(open_dir, users, f"max_leases_per_connection = {FLOOD_LEASES}\n",
                     "--log-level", "info")
    try:
        assert b.proc is not None
        flooder = spawn(users.attacker, status_flooder(b.socket))
        assert flooder.expect("leased", timeout=120) == FLOOD_LEASES
        flooder.send({"go": True})
        assert flooder.expect("flooded") < 16 * 1024  # one small write asks for ~1 GB of replies
        _, rss = run_honest(spawn, users, b)
        mem = vm_kib(b.proc.pid)
        assert max(rss, mem["VmRSS"], mem["VmHWM"]) < RSS_LIMIT_KIB, (rss, mem)
        assert b.proc.poll() is None
        flooder.send({"read": True})
        got = flooder.result(timeout=120)
        # Every reply arrives, in order, each one page of at most MAX_STATUS_LEASES
        # leases with notes cut to STATUS_TEXT_MAX characters.
        assert got["ids"] == list(range(FLOOD_STATUS))
        assert got["most_leases_shown"] == p.MAX_STATUS_LEASES
        assert got["more"] == FLOOD_STATUS
        assert 0 < got["longest_note"] <= p.STATUS_TEXT_MAX
        assert vm_kib(b.proc.pid)["VmHWM"] < RSS_LIMIT_KIB
        no_traceback(b)
    finally:
        b.stop()


# ---------------------------------------------------------------- connections per uid

CONN_CAP = 20


def send_tolerant(s: socket.socket, data: bytes) -> None:
    """Write to a connection the broker may already have refused and closed."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(data)


def connection_hoarder(path: str) -> Callable[[Ctl], Any]:
    def admitted(s: socket.socket, lines: Lines) -> dict[str, Any]:
        s.sendall(encode({"id": 1, **HELLO}))
        return lines.next()

    def run(ctl: Ctl) -> Any:
        held = []
        for _ in range(CONN_CAP):
            s = connect(path)
            lines = Lines(s)
            reply = admitted(s, lines)
            assert reply["reply"] == "hello", reply
            held.append(s)
        # The cap is checked at accept: the refusal is the first (and only) line,
        # and the broker may have closed before our hello is even written.
        s = connect(path)
        lines = Lines(s)
        send_tolerant(s, encode({"id": 1, **HELLO}))
        refusal = lines.next()
        closed = lines.eof()
        ctl.send({"refused": refusal, "closed": closed})
        ctl.recv(60)
        held.pop().close()
        # The broker sees the close on its next turn: retry until the slot is free.
        tries = 0
        while True:
            tries += 1
            s = connect(path)
            lines = Lines(s)
            send_tolerant(s, encode({"id": 1, **HELLO}))
            try:
                reply = lines.next()
            except (EOFError, ConnectionResetError) as exc:
                reply = {"reply": "eof", "message": str(exc)}
            if reply["reply"] == "hello":
                held.append(s)
                break
            s.close()
            assert reply.get("code") == "quota" and tries < 100, reply
            time.sleep(0.05)
        s = connect(path)
        lines = Lines(s)
        send_tolerant(s, encode({"id": 1, **HELLO}))
        again = lines.next()
        return {"reopened": True, "tries": tries, "refused_again": again}

    return run


def test_a_uid_at_its_connection_cap_gets_quota_and_others_still_connect(
    users: Users, open_dir: Path, spawn: Callable[[str, Callable[[Ctl], Any]], UserProc]
) -> None:
    b = start_broker(open_dir, users, f"max_connections_per_uid = {CONN_CAP}\n")
    try:
        hoarder = spawn(users.attacker, connection_hoarder(b.socket))
        msg = hoarder.recv()
        assert msg["refused"]["reply"] == "error" and msg["refused"]["code"] == "quota", msg
        assert str(hoarder.uid) in msg["refused"]["message"]
        assert msg["closed"]
        # Another uid connects and leases while the hoarder sits at its cap ...
        ports, _ = run_honest(spawn, users, b, cycles=3)
        assert ports
        # ... and so does root, uncapped: more connections than the cap.
        roots = [Raw(b.socket) for _ in range(CONN_CAP + 5)]
        assert roots[-1].call({"op": "lease", "count": 1})["reply"] == "granted"
        for r in roots:
            r.close()
        hoarder.send({"close_one": True})
        got = hoarder.result()
        assert got["reopened"]
        assert got["refused_again"]["code"] == "quota", got
        no_traceback(b)
    finally:
        b.stop()


# ---------------------------------------------------------------- slow-loris and long lines

LORIS = 300
PARTIAL = 8000
"""Bytes of an unfinished line each slow-loris connection leaves buffered (MAX_LINE is 8192)."""


def slow_loris(path: str) -> Callable[[Ctl], Any]:
    def run(ctl: Ctl) -> Any:
        conns = []
        for i in range(LORIS):
            s = connect(path)
            lines = Lines(s)
            assert call(s, lines, {"id": 0, **HELLO})["reply"] == "hello"
            head = json.dumps({"id": i + 1, "op": "ping"}).encode()[:-1]  # no closing brace
            line = head + b" " * (PARTIAL - len(head))
            # In two writes, so the broker keeps a partial line across reads.
            s.sendall(line[:PARTIAL // 2])
            conns.append((s, lines, line[PARTIAL // 2:]))
        for s, _, rest in conns:
            s.sendall(rest)
        ctl.send({"holding": LORIS})
        ctl.recv(60)
        # Finish every line: the broker kept them all and answers each one.
        for s, _, _ in conns:
            s.sendall(b"}\n")
        pongs = 0
        for i, (s, lines, _) in enumerate(conns):
            reply = lines.next()
            assert reply == {"id": i + 1, "reply": "pong"}, reply
            pongs += 1
            s.close()
        return pongs

    return run


def test_slow_loris_partial_lines_do_not_starve_another_uid(
    users: Users, open_dir: Path, spawn: Callable[[str, Callable[[Ctl], Any]], UserProc]
) -> None:
    b = start_broker(open_dir, users)
    try:
        assert b.proc is not None
        loris = spawn(users.attacker, slow_loris(b.socket))
        assert loris.expect("holding") == LORIS
        _, rss = run_honest(spawn, users, b)
        assert rss < RSS_LIMIT_KIB
        loris.send({"finish": True})
        assert loris.result() == LORIS
        no_traceback(b)
    finally:
        b.stop()


@pytest.mark.parametrize("newline", [False, True], ids=["unfinished", "finished"])
def test_a_line_over_max_line_gets_line_too_long_and_a_close(
    tmp_path: Path, port_range: str, newline: bool
) -> None:
    b = BrokerProc(tmp_path, range=port_range).start()
    try:
        r = Raw(b.socket)
        lease = r.call({"op": "lease", "count": 1})
        assert lease["reply"] == "granted"
        head = b'{"id": 9, "op": "ping"'
        # One byte over the limit: without a newline yet, or as a whole line in one write.
        r.send(head + b" " * (p.MAX_LINE + 1 - len(head)) + (b"}\n" if newline else b""))
        reply = r.line()
        assert reply["reply"] == "error" and reply["code"] == "line-too-long", reply
        assert r.closed_by_peer()
        # The connection's lease went with it; the broker serves on.
        other = Raw(b.socket)
        status = other.call({"op": "status"})
        assert status["summary"]["leases"] == 0, status  # type: ignore[index]
        no_traceback(b)
    finally:
        b.stop()


# ---------------------------------------------------------------- nesting bombs


def nested_lines() -> list[tuple[bytes, int | None]]:
    """Lines nesting as deep as a line may be (MAX_LINE), where no schema looks, with each one's own id.

    How deep the decoder goes before it gives up depends on the interpreter's C
    recursion limit (3.11 stops near 1000 levels, 3.12 near 2000, 3.13 reads any
    line that fits), so the depth is the most MAX_LINE allows, not a guess at a limit.
    """
    depth = (p.MAX_LINE - 64) // 2
    arrays = b"[" * depth + b"]" * depth
    depth = (p.MAX_LINE - 96) // 6
    objects = b'{"a":' * depth + b"1" + b"}" * depth
    return [
        (b'{"id": 11, "op": "ping", "x": ' + arrays + b"}", 11),
        (b'{"id": 12, "op": "lease", "count": 1, "junk": ' + objects + b"}", 12),
        (b'{"id": 13, "op": "no-such-op", "x": ' + arrays + b"}", 13),
        (b'{"x": ' + arrays + b', "id": 14, "op": "ping"}', 14),
        (arrays, None),
    ]


def test_deep_nesting_gets_an_error_reply_and_the_connection_and_its_lease_stay(
    tmp_path: Path, port_range: str
) -> None:
    # At the default level a client's bad line is answered, not logged: a burst
    # of them must not flood the log (debug logs every reply by design).
    b = BrokerProc(tmp_path, ["--log-level", "info"], range=port_range).start()
    try:
        logged = len(b.log.read_text().splitlines())
        before_hello = Raw(b.socket, hello=False)
        r = Raw(b.socket)
        lease = r.call({"op": "lease", "count": 1})
        assert lease["reply"] == "granted"
        for conn in (before_hello, r):
            for _ in range(20):  # a burst, as a hostile client would send
                for line, own_id in nested_lines():
                    assert 8000 < len(line) < p.MAX_LINE
                    conn.send(line + b"\n")
                    reply = conn.line()
                    assert reply["reply"] == "error", reply
                    assert reply["code"] in CODES and reply["code"] != "internal", reply
                    # The id is echoed when the decoder can still read it (on 3.13
                    # it always can); too deep a line gets a null id, never another
                    # request's.
                    assert reply["id"] in (own_id, None), reply
        assert r.call({"op": "ping"})["reply"] == "pong"
        status = r.call({"op": "status"})
        assert [x["ports"] for x in status["leases"]] == [lease["ports"]], status  # type: ignore[union-attr,index]
        assert before_hello.call({"op": "ping"})["code"] == "hello-required"
        assert b.proc is not None and b.proc.poll() is None
        no_traceback(b)
        assert len(b.log.read_text().splitlines()) <= logged + 2, b.log.read_text()[-4000:]
    finally:
        b.stop()


@pytest.mark.parametrize("ttl", [0, 0.001, 0.999, -1, 1e300])
def test_a_ttl_outside_its_bounds_is_refused_and_grants_nothing(
    tmp_path: Path, port_range: str, ttl: float
) -> None:
    b = BrokerProc(tmp_path, range=port_range).start()
    try:
        r = Raw(b.socket)
        reply = r.call({"op": "lease", "count": 1, "detach": True, "ttl": ttl})
        assert reply["reply"] == "error" and reply["code"] == "bad-request", reply
        assert r.call({"op": "status"})["summary"]["leases"] == 0  # type: ignore[index]
        ok = r.call({"op": "lease", "count": 1, "detach": True, "ttl": p.MIN_TTL})
        assert ok["reply"] == "granted", ok
    finally:
        b.stop()


# ---------------------------------------------------------------- a leaked token, reclaimed by another uid

UID_PORTS = 4


def detached_owner(path: str) -> Callable[[Ctl], Any]:
    def run(ctl: Ctl) -> Any:
        s = connect(path)
        lines = Lines(s)
        assert call(s, lines, {"id": 0, **HELLO})["reply"] == "hello"
        granted = call(s, lines, {"id": 1, "op": "lease", "count": 3, "detach": True, "ttl": 600})
        assert granted["reply"] == "granted", granted
        return {"token": granted["token"], "ports": granted["ports"]}

    return run


def token_thief(path: str, token: str) -> Callable[[Ctl], Any]:
    def run(ctl: Ctl) -> Any:
        first = connect(path)
        lines = Lines(first)
        assert call(first, lines, {"id": 0, **HELLO})["reply"] == "hello"
        assert call(first, lines, {"id": 1, "op": "lease", "count": 2})["reply"] == "granted"
        # 2 held + the stolen 3 > 4: the reclaim counts against the thief's own quota.
        over = call(first, lines, {"id": 2, "op": "reclaim", "token": token})
        first.close()
        s = connect(path)
        lines = Lines(s)
        assert call(s, lines, {"id": 0, **HELLO})["reply"] == "hello"
        taken = call(s, lines, {"id": 1, "op": "reclaim", "token": token})
        more = call(s, lines, {"id": 2, "op": "lease", "count": 2})
        last = call(s, lines, {"id": 3, "op": "lease", "count": 1})
        ctl.send({"over": over, "taken": taken, "more": more, "last": last, "pid": os.getpid()})
        ctl.recv(60)
        s.close()
        return True

    return run


def test_a_leaked_token_reclaimed_by_another_uid_moves_holder_and_quota(
    users: Users, open_dir: Path, spawn: Callable[[str, Callable[[Ctl], Any]], UserProc]
) -> None:
    b = start_broker(open_dir, users, f"max_ports_per_uid = {UID_PORTS}\n")
    try:
        owner = spawn(users.honest, detached_owner(b.socket))
        lease = owner.result()
        thief = spawn(users.attacker, token_thief(b.socket, lease["token"]))
        got = thief.recv()
        assert got["over"]["reply"] == "error" and got["over"]["code"] == "quota", got
        assert got["taken"] == {"id": 1, "reply": "reclaimed", "ports": lease["ports"]}, got
        assert got["more"]["code"] == "quota", got  # 3 + 2 > 4
        assert got["last"]["reply"] == "granted", got  # 3 + 1 = 4
        shown = Raw(b.socket).call({"op": "status"})["leases"]
        held = {tuple(x["ports"]): (x["uid"], x["pid"], x["state"]) for x in shown}  # type: ignore[union-attr]
        assert held[tuple(lease["ports"])] == (thief.uid, got["pid"], "attached"), shown
        # The owner's 3 ports no longer count against it: 2 more fit its 4.
        again = spawn(users.honest, honest_cycles(b.socket, 1))
        assert len(again.result()) == 1
        probe = Raw(b.socket)
        thief.send({"close": True})
        assert thief.result() is True
        # The stolen lease was bound to the thief's connection: it ends with it.
        for _ in range(100):
            if probe.call({"op": "status"})["summary"]["leases"] == 0:  # type: ignore[index]
                break
            time.sleep(0.05)
        assert probe.call({"op": "status"})["summary"]["leases"] == 0  # type: ignore[index]
        no_traceback(b)
    finally:
        b.stop()


# ---------------------------------------------------------------- unsafe directories and planted symlinks


def serve_once(
    socket_path: Path, state_path: Path, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """``portlease serve`` that must refuse; a broker that starts instead is killed at ``timeout``."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return subprocess.run(
        [PYTHON, "-m", "portlease", "serve", "--socket", str(socket_path), "--state",
         str(state_path), "--range", RANGE],
        env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


UNSAFE = ["other-owner", "group-writable", "other-writable", "sticky-world-writable", "symlink"]


def make_unsafe(kind: str, where: Path, users: Users) -> tuple[Path, Path, str]:
    """An unsafe directory at ``where``; return it, the directory nothing may appear in, and
    the reason the broker must give."""
    if kind == "symlink":
        target = where.parent / (where.name + "-target")
        target.mkdir(mode=0o700)
        where.symlink_to(target)
        return where, target, "it is a symbolic link"
    where.mkdir(mode=0o700)
    if kind == "other-owner":
        uid = pwd.getpwnam(users.attacker).pw_uid
        os.chown(where, uid, -1)
        return where, where, f"it is owned by uid {uid}"
    mode = {"group-writable": 0o770, "other-writable": 0o703, "sticky-world-writable": 0o1777}[kind]
    where.chmod(mode)
    return where, where, "group or others may write to it"


@pytest.mark.parametrize("which", ["socket", "state"])
@pytest.mark.parametrize("kind", UNSAFE)
def test_serve_refuses_an_unsafe_directory(
    users: Users, open_dir: Path, kind: str, which: str
) -> None:
    good = open_dir / "good"
    good.mkdir(mode=0o700)
    bad, inside, reason = make_unsafe(kind, open_dir / "bad", users)
    before = os.lstat(inside)
    sock_dir, state_dir = (bad, good) if which == "socket" else (good, bad)
    res = serve_once(sock_dir / "broker.sock", state_dir / "state.jsonl")
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert f"refusing to use {bad}: {reason}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert list(inside.iterdir()) == [], "the broker created files in a directory it refused"
    after = os.lstat(inside)
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)


def test_a_symlink_planted_at_the_state_temporary_is_not_followed(tmp_path: Path, port_range: str) -> None:
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "precious"
    victim.write_text("the victim's data\n")
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir(mode=0o700)
    b = BrokerProc(broker_dir, range=port_range)
    # A journal with a lease, so start-up compaction has something to write.
    b.start()
    r = Raw(b.socket)
    assert r.call({"op": "lease", "count": 1, "detach": True, "ttl": 600})["reply"] == "granted"
    r.close()
    b.kill()
    tmp = Path(b.state + ".tmp")
    tmp.symlink_to(victim)
    b.start()  # start-up compacts through <state>.tmp
    try:
        assert victim.read_text() == "the victim's data\n"
        assert not tmp.is_symlink()
        assert not Path(b.state).is_symlink()
        status = Raw(b.socket).call({"op": "status"})
        assert status["summary"]["leases"] == 1, status  # type: ignore[index]
    finally:
        b.stop()
    assert victim.read_text() == "the victim's data\n"  # and the compaction at shutdown
    no_traceback(b)


@pytest.mark.parametrize("name", ["state", "state lock", "socket lock"])
def test_a_symlink_planted_at_a_broker_file_is_refused(tmp_path: Path, name: str) -> None:
    victim = tmp_path / "precious"
    victim.write_text("the victim's data\n")
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir(mode=0o700)
    sock, state = broker_dir / "broker.sock", broker_dir / "state.jsonl"
    planted = {"state": state, "state lock": Path(f"{state}.lock"), "socket lock": Path(f"{sock}.lock")}[name]
    planted.symlink_to(victim)
    res = serve_once(sock, state)
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    # O_NOFOLLOW's ELOOP, told as what it means, after the path.
    assert f"{planted}: it is a symbolic link" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert victim.read_text() == "the victim's data\n"
    assert planted.is_symlink()


# ---------------------------------------------------------------- half-close (issue 20)

_HALF_CLOSER = """
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b'{"op":"hello","id":0,"version":1}\\n{"op":"lease","id":1,"count":2}\\n')
s.shutdown(socket.SHUT_WR)
f = s.makefile("rb")
f.readline()
print(f.readline().decode().strip(), flush=True)
time.sleep(600)
"""


def held_ports(path: str) -> set[int]:
    r = Raw(path)
    try:
        return {port for lease in r.call({"op": "status"})["leases"] for port in lease["ports"]}
    finally:
        r.close()


def wait_until_free(path: str, ports: list[int]) -> None:
    for _ in range(500):
        if not set(ports) & held_ports(path):
            return
        time.sleep(0.01)
    raise AssertionError(f"ports {ports} still held")


def test_a_half_closed_client_keeps_its_lease_until_it_closes(broker: BrokerProc) -> None:
    """Issue 20: hello + lease, then shutdown(SHUT_WR): the client was told ``granted``
    for a lease the broker had already ended at the end of input. The lease now lives
    while the client can still read, and ends when it closes: no longer than a
    connection that stays open would hold it."""
    s = connect(broker.socket)
    lines = Lines(s)
    s.sendall(encode({"id": 0, **HELLO}, {"id": 1, "op": "lease", "count": 2}))
    s.shutdown(socket.SHUT_WR)
    assert lines.next()["reply"] == "hello"
    granted = lines.next()
    assert granted["reply"] == "granted", granted
    assert set(granted["ports"]) <= held_ports(broker.socket)
    # Still held by that connection: another one cannot take it over.
    other = Raw(broker.socket)
    assert other.call({"op": "reclaim", "token": granted["token"]})["code"] == "in-use"
    other.close()
    s.close()
    wait_until_free(broker.socket, granted["ports"])
    no_traceback(broker)


def test_a_half_closed_client_that_dies_frees_its_lease(broker: BrokerProc) -> None:
    """A half-closed connection pins nothing past its holder: SIGKILL closes it, and the
    lease ends as it does for any connection."""
    proc = subprocess.Popen([PYTHON, "-c", _HALF_CLOSER, broker.socket], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        granted = json.loads(proc.stdout.readline())
        assert granted["reply"] == "granted", granted
        assert set(granted["ports"]) <= held_ports(broker.socket)
    finally:
        proc.kill()
        proc.wait()
    wait_until_free(broker.socket, granted["ports"])


# ---------------------------------------------------------------- token guessing (issue 20)


def test_guessed_tokens_are_counted_per_uid_and_warned_about(broker: BrokerProc) -> None:
    """Issue 20: 83-85k guessed tokens a second left no trace. Each miss is counted in the
    metrics by op and uid, and the log warns (rate-limited) per 100 misses of one uid."""
    r = Raw(broker.socket)
    guesses = 250
    r.send(b"".join(json.dumps({"id": i, "op": "reclaim" if i % 2 else "release",
                                "token": f"{i:032x}"}).encode() + b"\n" for i in range(guesses)))
    for _ in range(guesses):
        assert r.line()["code"] == "not-found"
    text = r.call({"op": "metrics"})["text"]
    r.close()
    uid = os.getuid()
    for op, n in (("reclaim", guesses // 2), ("release", guesses - guesses // 2)):
        assert f'portlease_token_misses_total{{op="{op}",uid="{uid}"}} {n}\n' in text, text
    for _ in range(300):
        if "token guessing?" in broker.log.read_text():
            break
        time.sleep(0.01)
    assert "token guessing?" in broker.log.read_text()


# ---------------------------------------------------------------- reply memory per uid (issue 20)

HOARD_CONNS = 900
HOARD_LEASES = 300
"""Few enough to share RANGE with the status flood running in another xdist worker."""
HOARD_NOTE = "\x01" * 1000
"""Six bytes a character in a JSON reply: a page of HOARD_LEASES leases is ~570 kB."""


def page_hoarder(path: str) -> Callable[[Ctl], Any]:
    """HOARD_LEASES leases with long escaped notes, then HOARD_CONNS connections that each
    send one ``status`` (a page of ~570 kB) and never read, until the test says so."""

    def run(ctl: Ctl) -> Any:
        s, _lines = leased_with_notes(path, HOARD_LEASES, HOARD_NOTE)
        hoard = []
        for _ in range(HOARD_CONNS):
            # Without waiting for hello: once this uid is over its bound, none of its
            # connections is answered (new ones included) until it reads.
            h = connect(path, timeout=60)
            h.sendall(encode({"id": 0, **HELLO}, {"id": 1, "op": "status"}))
            hoard.append((h, Lines(h)))
        ctl.send({"hoarding": len(hoard)})
        ctl.recv(120)
        # Read every connection as its bytes come (a client reading them in a fixed
        # order could wait on one whose turn comes after its uid's bound is full again).
        sizes = []
        sel = selectors.DefaultSelector()
        for h, _ in hoard:
            h.setblocking(False)
            sel.register(h, selectors.EVENT_READ, bytearray())
        while sel.get_map():
            events = sel.select(60)
            assert events, "no reply for 60 s"
            for key, _ in events:
                buf = key.data
                buf += key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
                if buf.count(b"\n") == 2:
                    hello_line, page, _ = bytes(buf).split(b"\n")
                    assert json.loads(hello_line)["reply"] == "hello"
                    sizes.append(len(page))
                    sel.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
        s.close()
        return {"replies": len(sizes), "smallest": min(sizes)}

    return run


def test_connections_that_never_read_their_pages_do_not_grow_the_broker(
    users: Users, open_dir: Path, spawn: Callable[[str, Callable[[Ctl], Any]], UserProc]
) -> None:
    """Issue 20: 1,000 connections of one uid each asked for a 700 kB ``status`` page and
    never read: one reply per connection is not a bound per uid, and the broker reached
    699 MB (here, 900 pages of ~570 kB: ~360 MiB). Now reply bytes pending for a uid
    are bounded (PENDING_PER_UID) and that uid is not read while over it: the broker
    stays small, another uid is served, and every page still arrives once it reads."""
    b = start_broker(open_dir, users)
    try:
        assert b.proc is not None
        hoarder = spawn(users.attacker, page_hoarder(b.socket))
        assert hoarder.expect("hoarding", timeout=180) == HOARD_CONNS
        _, rss = run_honest(spawn, users, b)
        mem = vm_kib(b.proc.pid)
        assert max(rss, mem["VmRSS"], mem["VmHWM"]) < RSS_LIMIT_KIB, (rss, mem)
        hoarder.send({"read": True})
        got = hoarder.result(timeout=300)
        assert got["replies"] == HOARD_CONNS and got["smallest"] > 100_000, got
        assert vm_kib(b.proc.pid)["VmHWM"] < RSS_LIMIT_KIB
        no_traceback(b)
    finally:
        b.stop()
