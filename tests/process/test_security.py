"""Security: the socket's group, tokens, and per-uid quotas, with real second uids.

As root the module creates a group and three users (two members, one outsider)
with groupadd/useradd and removes them afterwards. Clients run as those users
in a forked child that drops its privileges (setgroups/setresgid/setresuid),
so no interpreter has to be reachable by them. Without root (or without the
passwd tools) the uid tests skip; the token tests run anyway.

Ports 20800-20899 are used by no other test module.
"""

from __future__ import annotations

import errno
import grp
import itertools
import json
import os
import pwd
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from brokerproc import BrokerProc, Raw, wait_for_socket
from localusers import shared_directory, temporary_users
from portlease.broker import handler
from portlease.broker.config import Config
from portlease.broker.core import Session
from portlease.broker.handler import Broker
from portlease.broker.leases import Peer
from portlease.broker.state import Journal
from portlease.client import BrokerUnavailable
from portlease.client import Connection as Client
from portlease.client import protocol as p

RANGE = "20800-20899"
HEX = set("0123456789abcdef")


@dataclass
class Users:
    group: str
    gid: int
    member: str
    member2: str
    outsider: str


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    with temporary_users("plsec", {"a": True, "b": True, "x": False}) as (group, names):
        yield Users(group=group, gid=grp.getgrnam(group).gr_gid, member=names["a"],
                    member2=names["b"], outsider=names["x"])


def as_user(user: str, fn: Callable[[], Any], *, ready: Callable[[], None] | None = None) -> Any:
    """Run ``fn`` in a forked child as ``user`` (with its groups); return its result (JSON)."""
    pw = pwd.getpwnam(user)
    groups = os.getgrouplist(user, pw.pw_gid)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.setgroups(groups)
            os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
            os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
            out = {"ok": fn()}
        except BaseException as exc:
            out = {"error": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc)}
            code = 1
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    if ready is not None:
        ready()
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def talk(s: socket.socket, *msgs: dict[str, Any]) -> list[dict[str, Any]]:
    """Send requests (ids 1..n), return their replies in order."""
    s.sendall(b"".join(json.dumps({"id": i, **m}).encode() + b"\n" for i, m in enumerate(msgs, 1)))
    buf, out = b"", []
    while len(out) < len(msgs):
        while b"\n" not in buf:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise EOFError("closed")
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        out.append(json.loads(line))
    return out


HELLO = {"op": "hello", "version": p.PROTOCOL_VERSION}


@pytest.fixture
def open_dir() -> Iterator[Path]:
    with shared_directory("plsec-") as d:
        yield d


def group_broker(d: Path, users: Users, *extra: str) -> BrokerProc:
    return BrokerProc(d, ["--group", users.group, *extra], range=RANGE).start()


# ---------------------------------------------------------------- the socket's group


def test_socket_refuses_a_user_outside_its_group(users: Users, open_dir: Path) -> None:
    b = group_broker(open_dir, users)
    try:
        st = os.stat(b.socket)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == users.gid

        def outsider() -> Any:
            try:
                connect(b.socket)
            except PermissionError as exc:
                return {"errno": exc.errno}
            return {"errno": None}

        assert as_user(users.outsider, outsider) == {"ok": {"errno": errno.EACCES}}

        def outsider_client() -> Any:
            try:
                Client(b.socket, autostart=False)
            except BrokerUnavailable as exc:
                return str(exc)
            return "connected"

        message = as_user(users.outsider, outsider_client)["ok"]
        assert "permission denied" in message and b.socket in message

        def member() -> Any:
            s = connect(b.socket)
            return talk(s, HELLO, {"op": "lease", "count": 2})

        welcome, granted = as_user(users.member, member)["ok"]
        assert welcome["reply"] == "hello" and granted["reply"] == "granted"
    finally:
        b.stop()


def test_socket_directory_made_by_the_broker_keeps_others_out(users: Users, open_dir: Path) -> None:
    run = open_dir / "run"  # does not exist yet: the broker makes it
    path = str(run / "broker.sock")
    b = BrokerProc(open_dir, ["--group", users.group, "--socket", path], range=RANGE)  # last wins
    b.start(wait=False)
    try:
        wait_for_socket(path, proc=b.proc)
        st = os.stat(run)
        assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == users.gid

        def attempt() -> Any:
            try:
                s = connect(path)
            except OSError as exc:
                return {"errno": exc.errno}
            return {"reply": talk(s, HELLO)[0]["reply"]}

        assert as_user(users.outsider, attempt) == {"ok": {"errno": errno.EACCES}}
        assert as_user(users.member, attempt) == {"ok": {"reply": "hello"}}
    finally:
        b.stop()


# ---------------------------------------------------------------- tokens


def test_another_uid_cannot_touch_a_lease_without_its_token(users: Users, open_dir: Path) -> None:
    b = group_broker(open_dir, users)
    try:
        owner = Raw(b.socket)
        attached = owner.call({"op": "lease", "count": 3, "note": "attached"})
        detached = owner.call({"op": "lease", "count": 2, "note": "detached", "detach": True, "ttl": 600})
        before = owner.call({"op": "status"})
        tokens = [str(attached["token"]), str(detached["token"])]
        guesses: list[str] = [secrets.token_hex(16) for _ in range(20)]
        for t in tokens:
            for i in (0, 7, 16, 31):
                flipped = format((int(t[i], 16) + 1) % 16, "x")
                guesses.append(t[:i] + flipped + t[i + 1:])
            guesses += [t.upper(), t[:31], t[1:], t + "0", " " + t, t + " ", t[::-1]]
        assert not set(guesses) & set(tokens)

        def attacker() -> Any:
            s = connect(b.socket)
            msgs: list[dict[str, Any]] = [HELLO]
            for op in ("release", "renew", "detach", "reclaim"):
                msgs += [{"op": op, "token": g} for g in guesses]
            msgs.append({"op": "status"})
            replies = talk(s, *msgs)
            return {"codes": sorted({r.get("code", r["reply"]) for r in replies[1:-1]}),
                    "status": replies[-1]}

        got = as_user(users.member, attacker)["ok"]
        assert got["codes"] == ["not-found"]
        raw_status = json.dumps(got["status"])
        assert '"token":' not in raw_status and not any(t in raw_status for t in tokens)

        after = owner.call({"op": "status"})
        assert before["leases"] == after["leases"]  # same ports, states, owners and expiries
        states = {tuple(i["ports"]): i["state"] for i in after["leases"]}  # type: ignore[union-attr]
        assert states == {tuple(attached["ports"]): "attached", tuple(detached["ports"]): "detached"}
    finally:
        b.stop()


def test_tokens_are_128_bit_and_unguessable(tmp_path: Path) -> None:
    config = Config(port_min=20800, port_max=20899, ttl=30.0)
    broker = Broker(config=config, journal=Journal(str(tmp_path / "s.jsonl")))
    broker.restore()
    session = Session(id=1, peer=Peer(pid=os.getpid(), uid=0, gid=0), hello=True)

    def grant_and_release(n: int) -> list[str]:
        out = []
        for _ in range(n):
            reply = broker.core.handle_line(session, b'{"op":"lease","id":1}', broker.now(), 1).reply
            assert isinstance(reply, p.Granted), reply
            out.append(reply.token)
            line = json.dumps({"op": "release", "id": 2, "token": reply.token}).encode()
            broker.core.handle_line(session, line, broker.now(), 1)
        return out

    try:
        tokens = grant_and_release(4000)
    finally:
        broker.shutdown()
    assert p.TOKEN_BYTES * 8 == 128 and handler.secrets is secrets  # the CSPRNG, not random
    assert broker.core.new_token.func is secrets.token_hex  # type: ignore[attr-defined]  # the CSPRNG, not random
    assert len(set(tokens)) == len(tokens)
    assert all(len(t) == 32 and set(t) <= HEX for t in tokens)
    # Every bit is set in about half the tokens: 2000 +- 6 sigma (sigma = 31.6).
    ones = [0] * 128
    for t in tokens:
        v = int(t, 16)
        for bit in range(128):
            ones[bit] += (v >> bit) & 1
    assert all(1810 <= n <= 2190 for n in ones), (min(ones), max(ones))
    # Consecutive tokens are unrelated: no long shared prefixes, no small differences.
    for a, c in itertools.pairwise(tokens):
        shared = next((i for i, (x, y) in enumerate(zip(a, c, strict=True)) if x != y), 32)
        assert shared < 9
        assert abs(int(a, 16) - int(c, 16)) > 1 << 64


# ---------------------------------------------------------------- quotas


def test_per_uid_quota_holds_when_one_runner_floods(users: Users, open_dir: Path) -> None:
    config = open_dir / "c.toml"
    config.write_text("max_ports_per_uid = 30\nmax_ports_per_request = 12\n"
                      "max_leases_per_connection = 4\n")
    b = group_broker(open_dir, users, "--config", str(config))
    go_r, go_w = os.pipe()
    try:
        def flood() -> Any:
            os.close(go_w)
            conns, codes, ports = [], [], 0
            for _ in range(20):  # one runner tries to take the whole range
                s = connect(b.socket)
                conns.append(s)
                replies = talk(s, HELLO, *[{"op": "lease", "count": 12}] * 4,
                               {"op": "lease", "count": 1, "detach": True})
                for r in replies[1:]:
                    if r["reply"] == "granted":
                        ports += len(r["ports"])
                    else:
                        codes.append(r["code"])
            os.read(go_r, 1)  # hold everything until the other uid has been served
            return {"ports": ports, "codes": sorted(set(codes))}

        result: dict[str, Any] = {}

        def while_flooding() -> None:
            # The flooder holds what it could get; poll until it stops growing.
            raw = Raw(b.socket)
            held = -1
            for _ in range(200):
                st = raw.call({"op": "status"})
                now = sum(len(i["ports"]) for i in st["leases"])  # type: ignore[union-attr]
                if now == held and now > 0:
                    break
                held = now
                time.sleep(0.05)

            def other() -> Any:
                s = connect(b.socket)
                return [r.get("code", r["reply"]) for r in
                        talk(s, HELLO, {"op": "lease", "count": 12}, {"op": "lease", "count": 12},
                             {"op": "lease", "count": 12})[1:]]

            result["other"] = as_user(users.member2, other)["ok"]
            result["root"] = raw.call({"op": "lease", "count": 5})["reply"]
            result["flooder_held"] = held
            raw.close()
            os.write(go_w, b"x")

        flooder = as_user(users.member, flood, ready=while_flooding)["ok"]
        # 2 x 12 attached, then only 1-port detached leases fit: never past the 30 of the quota.
        assert flooder["ports"] == 30 and flooder["codes"] == ["quota"]
        assert result["flooder_held"] == 30
        assert result["other"] == ["granted", "granted", "quota"]
        assert result["root"] == "granted"
    finally:
        os.close(go_r)
        b.stop()
