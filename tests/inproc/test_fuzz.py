"""Hostile input: hypothesis over the message structs and over raw bytes.

Two targets:

- ``Broker.answer`` in-process (a real Broker with a real journal, driven
  through trio): many examples, fast. Every reply must be encodable, carry a
  code from :class:`ErrorCode` (never ``internal``), echo the request's id, and
  leave a victim connection's lease exactly as it was.
- a real broker process over its socket, fewer examples: arbitrary byte
  chunks (no framing respected), lines of exactly and just over MAX_LINE. The
  broker never dies, every bad frame gets an error reply or a clean close, and
  the victim's lease and connection stay as they were.

Port ranges here (20900-20949, 20950-20999) are used by no other test module.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from brokerproc import BrokerProc, Raw
from portlease.broker.config import Config
from portlease.broker.core import Session
from portlease.broker.handler import Broker
from portlease.broker.leases import Peer
from portlease.broker.state import Journal
from portlease.client import protocol as p

INPROC_RANGE = (20900, 20949)
PROC_RANGE = "20950-20999"
OPS = ["hello", "lease", "release", "renew", "detach", "reclaim", "status", "ping"]
HEX = "0123456789abcdef"

# ---------------------------------------------------------------- strategies

ids = st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=12))
wild_ids = st.one_of(
    ids, st.none(), st.booleans(), st.floats(), st.integers(min_value=2**63, max_value=2**80),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
counts = st.one_of(
    st.integers(1, 12), st.integers(-5, 0), st.integers(13, 300), st.integers(49, 51),
    st.integers(65535, 65537), st.integers(2**63, 2**70), st.integers(-(2**70), -(2**63)),
)
ttls = st.one_of(
    st.none(), st.floats(0.5, 100), st.floats(-1e9, 0), st.floats(86400, 1e300),
    st.sampled_from([0.0, -0.0, 1e-300, 86400.0, 86400.0001]),
)
guessed_tokens = st.one_of(
    st.text(alphabet=HEX, min_size=32, max_size=32), st.text(max_size=40), st.just(""),
    st.text(alphabet=HEX, min_size=129, max_size=140),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


def structs() -> st.SearchStrategy[p.Request]:
    """Requests built from the structs themselves, with values in and around their limits."""
    return st.one_of(
        st.builds(p.Hello, id=ids, version=st.one_of(st.just(p.PROTOCOL_VERSION), st.integers()),
                  client=st.text(max_size=300)),
        st.builds(p.Lease, id=ids, count=counts, ttl=ttls,
                  note=st.none() | st.text(max_size=1030), detach=st.booleans()),
        st.builds(p.Release, id=ids, token=guessed_tokens),
        st.builds(p.Renew, id=ids, token=guessed_tokens),
        st.builds(p.Detach, id=ids, token=guessed_tokens),
        st.builds(p.Reclaim, id=ids, token=guessed_tokens),
        st.builds(p.Status, id=ids),
        st.builds(p.Ping, id=ids),
    )


def near_valid_dicts() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"op": st.one_of(st.sampled_from(OPS), st.sampled_from(["", "LEASE", "fly", "lease "]),
                         json_values)},
        optional={
            "id": wild_ids, "count": st.one_of(counts, json_values), "ttl": ttls,
            "token": st.one_of(guessed_tokens, json_values), "version": st.integers() | json_values,
            "note": st.text(max_size=20) | json_values, "detach": json_values,
            "extra": json_values,
        },
    )


def encode_dict(d: dict[str, Any]) -> bytes:
    return json.dumps(d, allow_nan=True).encode("utf-8", "surrogatepass")


def deep(n: int) -> bytes:
    return b'{"op":"ping","id":' + b"[" * n + b"]" * n + b"}"


raw_lines = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda b: b'{"op":"lease","id":1,"note":"' + b + b'"}', st.binary(max_size=12)),
    st.integers(1, 200_000).map(lambda n: b"[" * n),
    st.integers(1, 5000).map(deep),
    st.builds(lambda n: b'{"op":"lease","id":1,"count":' + str(n).encode() + b"}",
              st.integers(-(10**40), 10**40)),
    st.just(b'{"op":"ping","id":1,"id":2}'),
    st.just(b'{"op":"lease","op":"release","id":3}'),
    st.just(b'{"op":"ping","id":"\\ud800"}'),
    st.just(b'\xef\xbb\xbf{"op":"ping","id":1}'),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request line with a few bytes flipped, inserted or cut."""
    line = bytearray(p.encode(draw(structs()))[:-1])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "cut"]))
        i = draw(st.integers(0, max(0, len(line) - 1)))
        if kind == "flip" and line:
            line[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            line[i:i] = draw(st.binary(min_size=1, max_size=3))
        elif line:
            del line[i]
    return bytes(line.replace(b"\n", b" "))


any_line = st.one_of(
    structs().map(lambda r: p.encode(r)[:-1]),
    near_valid_dicts().map(encode_dict),
    raw_lines.map(lambda b: b.replace(b"\n", b"")),
    mutated(),
)

# ---------------------------------------------------------------- in-process broker


@dataclass
class InProc:
    broker: Broker
    victim: Session
    token: str
    ports: list[int]
    next_id: int = 100

    def run(self, conn: Session, lines: list[bytes]) -> list[p.Reply]:
        """Each line through the broker's shell and core, as the connection driver passes it."""
        return [p.decode_reply(self.broker.answer(conn, line)[:-1]) for line in lines]


@pytest.fixture(scope="module")
def inproc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProc]:
    d = tmp_path_factory.mktemp("fuzz")
    config = Config(
        port_min=INPROC_RANGE[0], port_max=INPROC_RANGE[1], ttl=30.0, max_ports_per_request=16,
        max_ports_per_uid=40, max_leases_per_connection=8,
    )
    broker = Broker(config=config, journal=Journal(str(d / "state.jsonl")))
    broker.restore()
    victim = Session(id=1, peer=Peer(pid=os.getpid(), uid=4242, gid=4242))
    _welcome, granted = InProc(broker, victim, "", []).run(victim, [
        p.encode(p.Hello(id=0, version=p.PROTOCOL_VERSION))[:-1],
        p.encode(p.Lease(id=1, count=3, note="victim"))[:-1],
    ])
    assert isinstance(granted, p.Granted), granted
    yield InProc(broker, victim, granted.token, granted.ports)
    broker.shutdown()


def check_reply(line: bytes, reply: p.Reply, low: int, high: int) -> None:
    # The server must be able to send it, and a client to read it back.
    assert p.decode_reply(p.encode(reply)[:-1]) == reply
    try:
        request: p.AnyRequest | None = p.decode_request(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        request = None
    if request is not None:
        assert reply.id == request.id, (line[:80], reply)
    if isinstance(reply, p.Error):
        assert reply.code in set(p.ErrorCode)
        assert reply.code != p.ErrorCode.INTERNAL, (line[:200], reply)
        if request is None:
            assert reply.code in (p.ErrorCode.BAD_REQUEST, p.ErrorCode.UNKNOWN_OP)
    if isinstance(reply, p.Granted):
        assert isinstance(request, p.Lease)
        assert len(reply.ports) == request.count
        assert all(low <= port <= high for port in reply.ports)
        assert len(reply.token) == 2 * p.TOKEN_BYTES


def check_victim(env: InProc) -> None:
    record = env.broker.table.get(env.token)
    assert record is not None, "the victim's lease disappeared"
    assert record.ports == env.ports
    assert record.connection == env.victim.id and record.expires is None
    assert record.note == "victim"


def check_no_port_held_twice(env: InProc) -> None:
    seen: set[int] = set()
    for record in env.broker.table:
        assert not seen & set(record.ports), "a port is in two live leases"
        seen |= set(record.ports)


def settle(env: InProc, conn: Session) -> None:
    """Close the attacker's connection as the server does, and drop its detached leases."""
    table = env.broker.table
    for record in table.drop_connection(conn.id):
        env.broker.journal.ended(record)
    for record in [r for r in table if r.token != env.token]:
        env.broker.journal.ended(table.release(record.token))
    assert len(table) == 1 and table.ports_held == len(env.ports)
    a = table.allocator
    quarantined = len(a._quarantined)  # ports some other process held at a bind check
    assert a.free_count + quarantined + len(env.ports) == a.size


def victim_token_guess(token: str, how: str, i: int) -> str:
    i %= len(token)
    flipped = HEX[(HEX.index(token[i]) + 1) % 16]
    return {
        "flip": token[:i] + flipped + token[i + 1:],
        "upper": token.upper(),
        "prefix": token[:i],
        "suffix": token + token[i],
        "space": " " + token,
        "swap": token[i:] + token[:i],
    }[how]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(any_line, min_size=1, max_size=6),
    hello=st.booleans(),
    uid=st.sampled_from([4242, 1000, 0]),
)
@example(lines=[deep(100_000)], hello=True, uid=0)
@example(lines=[b"[" * 200_000], hello=False, uid=0)
@example(lines=[b'{"op":"lease","id":1,"count":70000}'], hello=True, uid=0)
@example(lines=[b'{"op":"lease","id":1,"count":48}'], hello=True, uid=0)  # over the range free
@example(lines=[b'{"op":"lease","id":5,"count":2}'] * 3, hello=True, uid=0)  # duplicate ids
# An op spelled with a JSON escape is the same op: the shell must not tell ops apart by bytes.
@example(lines=[b'{"op":"metric\\u0073","id":1}', b'{"op":"statu\\u0073","id":2}'], hello=True, uid=0)
def test_answer_survives_anything(inproc: InProc, lines: list[bytes], hello: bool, uid: int) -> None:
    inproc.next_id += 1
    conn = Session(id=inproc.next_id, peer=Peer(pid=os.getpid(), uid=uid, gid=uid), hello=hello)
    low, high = INPROC_RANGE
    replies = inproc.run(conn, lines)
    for line, reply in zip(lines, replies, strict=True):
        check_reply(line, reply, low, high)
    check_no_port_held_twice(inproc)
    check_victim(inproc)
    settle(inproc, conn)
    check_victim(inproc)


@settings(max_examples=200, deadline=None)
@given(
    op=st.sampled_from(["release", "renew", "detach", "reclaim"]),
    how=st.sampled_from(["flip", "upper", "prefix", "suffix", "space", "swap"]),
    i=st.integers(0, 31),
    random_token=st.text(alphabet=HEX, min_size=32, max_size=32),
)
def test_token_guessing_never_touches_the_victim(
    inproc: InProc, op: str, how: str, i: int, random_token: str
) -> None:
    inproc.next_id += 1
    conn = Session(id=inproc.next_id, peer=Peer(pid=1, uid=1000, gid=1000), hello=True)
    guesses = [victim_token_guess(inproc.token, how, i), random_token]
    assume(inproc.token not in guesses)
    lines = [json.dumps({"op": op, "id": n, "token": g}).encode() for n, g in enumerate(guesses)]
    for line, reply in zip(lines, inproc.run(conn, lines), strict=True):
        assert isinstance(reply, p.Error), (line, reply)
        assert reply.code in (p.ErrorCode.NOT_FOUND, p.ErrorCode.BAD_REQUEST), reply
    check_victim(inproc)
    settle(inproc, conn)


def test_journal_matches_the_table_after_fuzzing(inproc: InProc) -> None:
    """Whatever the fuzzing did, the journal on disk lists exactly the live leases."""
    loaded = Journal(inproc.broker.journal.path, boot=inproc.broker.journal.boot)._read(inproc.broker.now())
    assert {r.token for r in loaded.records} == {r.token for r in inproc.broker.table}
    assert loaded.bad_lines == 0


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), any_line))
def test_decoder_raises_only_its_own_errors(line: bytes) -> None:
    try:
        p.decode_request(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        err = p.error_for_bad_line(line, exc)
        assert err.code in (p.ErrorCode.BAD_REQUEST, p.ErrorCode.UNKNOWN_OP)
        p.encode(err)


# ---------------------------------------------------------------- a real broker process


@dataclass
class Live:
    broker: BrokerProc
    victim: Raw
    ports: list[int]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    d = tmp_path_factory.mktemp("fuzzproc")
    config = d / "c.toml"
    config.write_text("max_ports_per_request = 16\nmax_leases_per_connection = 8\n")
    b = BrokerProc(Path(d), ["--config", str(config)], range=PROC_RANGE).start()
    victim = Raw(b.socket)
    held = victim.call({"op": "lease", "count": 3, "note": "victim"})
    assert held["reply"] == "granted"
    yield Live(b, victim, held["ports"])  # type: ignore[arg-type]
    victim.close()
    b.stop()


def read_until_probe(sock: socket.socket, probe: str) -> tuple[list[dict[str, Any]], bool]:
    """Replies up to the probe's (inclusive); the flag says the broker closed instead."""
    buf = b""
    out: list[dict[str, Any]] = []
    while True:
        while b"\n" not in buf:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not buf.strip(), f"half a reply before the close: {buf[:100]!r}"
                return out, True
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        out.append(json.loads(line))
        if out[-1].get("id") == probe:
            return out, False


def exchange(path: str, chunks: list[bytes], hello: bool, probe: str) -> tuple[list[dict[str, Any]], bool]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    try:
        data = b"".join(chunks)
        if hello:
            sock.sendall(b'{"op":"hello","id":"h","version":1}\n')
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            # End whatever line the fuzz left open, then ask for a sign of life.
            sock.sendall(b"\n" + json.dumps({"op": "ping", "id": probe}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        replies, closed = read_until_probe(sock, probe)
    finally:
        sock.close()
    for reply in replies:
        decoded = p.decode_reply(json.dumps(reply).encode())
        if isinstance(decoded, p.Error):
            assert decoded.code != p.ErrorCode.INTERNAL, reply
    if closed:
        # Only an overlong line closes a connection, and it is told why first.
        assert replies and replies[-1]["code"] == "line-too-long", replies[-3:]
        assert any(len(line) > p.MAX_LINE for line in data.split(b"\n"))
    return replies, closed


def check_live(env: Live) -> None:
    assert env.broker.proc is not None and env.broker.proc.poll() is None, "the broker died"
    assert env.victim.call({"op": "ping"})["reply"] == "pong"
    status = env.victim.call({"op": "status"})
    mine = [i for i in status["leases"] if i["ports"] == env.ports]  # type: ignore[union-attr]
    assert len(mine) == 1 and mine[0]["state"] == "attached" and mine[0]["note"] == "victim"


def padded(n: int) -> bytes:
    """A valid ping line of exactly ``n`` bytes (leading JSON whitespace)."""
    body = b'{"op":"ping","id":"pad"}'
    return b" " * (n - len(body)) + body


_probe = [0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(any_line, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 400), max_size=4),
    newline=st.booleans(),
    hello=st.booleans(),
)
def test_real_broker_survives_arbitrary_frames(
    live: Live, lines: list[bytes], cuts: list[int], newline: bool, hello: bool
) -> None:
    data = b"\n".join(lines) + (b"\n" if newline else b"")
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if data[a:b]]
    _probe[0] += 1
    replies, closed = exchange(live.broker.socket, chunks, hello, f"probe-{_probe[0]}")
    if not closed:
        assert replies[-1]["reply"] in ("pong", "error")
    check_live(live)


@pytest.mark.parametrize(
    ("size", "split", "answered"),
    [
        (p.MAX_LINE - 1, False, True),
        (p.MAX_LINE, False, True),
        (p.MAX_LINE, True, True),
        (p.MAX_LINE + 1, False, False),
        (p.MAX_LINE + 1, True, False),
        (p.MAX_LINE + 2, True, False),
    ],
)
def test_lines_at_the_limit(live: Live, size: int, split: bool, answered: bool) -> None:
    """A valid line of exactly MAX_LINE bytes is served, also when its newline comes later."""
    line = padded(size)
    chunks = [b'{"op":"ping","id":"before"}\n' + line[:1000], line[1000:]] if split else [line]
    if split:
        chunks.append(b"")  # the newline arrives with the probe, in a later write
    _probe[0] += 1
    probe = f"probe-{_probe[0]}"
    replies, closed = exchange(live.broker.socket, [c for c in chunks if c], True, probe)
    ids = [r.get("id") for r in replies]
    if answered:
        assert not closed and "pad" in ids and ids[-1] == probe
    else:
        assert closed and "pad" not in ids and replies[-1]["code"] == "line-too-long"
    check_live(live)


# ---------------------------------------------------------------- regressions


@pytest.mark.parametrize(
    "line",
    [b'{"op":"ping","id":"\x80"}', b'{"op":"\x80hello","id":0,"version":1}',
     b'{"op":"lease","id":"\xff\xfe","count":1}'],
)
def test_invalid_utf8_in_a_string_gets_an_error_reply(live: Live, line: bytes) -> None:
    """Regression: msgspec raised UnicodeDecodeError, which escaped error_for_bad_line; the
    broker dropped the connection without a reply and logged a traceback."""
    with pytest.raises(msgspec.DecodeError):
        p.decode_request(line)
    raw = Raw(live.broker.socket)
    raw.send(line + b"\n")
    reply = raw.line()
    assert reply["reply"] == "error" and reply["code"] == "bad-request"
    assert raw.call({"op": "ping"})["reply"] == "pong"  # and the connection stays usable
    raw.close()
    check_live(live)
