"""The broker's protocol core by plain calls: no sockets, no trio, no clock."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from portlease.broker.allocator import Allocator
from portlease.broker.core import BrokerCore, ExpiryChanged, Identified, LeaseEnded, NewLease, Session
from portlease.broker.leases import ORPHAN_KEEP_TTLS, Instant, LeaseTable, Limits, Peer
from portlease.client import protocol as p

T0 = Instant(mono=100.0, wall=1_700_000_000.0)


def make_core(low: int = 40000, high: int = 40009, **limits: int) -> BrokerCore:
    tokens = (f"{i:032x}" for i in itertools.count(1))
    return BrokerCore(
        table=LeaseTable(Allocator(low, high), Limits(**limits)), ttl=30.0,
        new_token=lambda: next(tokens), bind_ok=lambda port: True, pid=4321,
        started_of=lambda pid: f"boot:{pid}", user_name=lambda uid: {1000: "alice"}.get(uid),
    )


def session(sid: int = 1, uid: int = 1000, pid: int = 50, hello: bool = True) -> Session:
    return Session(id=sid, peer=Peer(pid=pid, uid=uid, gid=uid), hello=hello)


def line(**fields: object) -> bytes:
    return json.dumps({"id": 1, **fields}).encode()


def test_hello_gate_and_version() -> None:
    core = make_core()
    s = session(hello=False)
    refused = core.handle_line(s, line(op="lease"), T0, 1).reply
    assert isinstance(refused, p.Error) and refused.code is p.ErrorCode.HELLO_REQUIRED
    wrong = core.handle_line(s, line(op="hello", version=99), T0, 1).reply
    assert isinstance(wrong, p.Error) and wrong.code is p.ErrorCode.VERSION and not s.hello
    welcome = core.handle_line(s, line(op="hello", version=p.PROTOCOL_VERSION), T0, 1).reply
    assert isinstance(welcome, p.Welcome) and welcome.pid == 4321 and s.hello


def test_a_grant_asks_for_its_journal_line_and_knows_its_holders_start() -> None:
    core = make_core()
    s = session()
    out = core.handle_line(s, line(op="lease", count=3, note="pg"), T0, 1)
    assert isinstance(out.reply, p.Granted) and out.reply.ports == [40000, 40001, 40002]
    assert out.reply.expires is None
    (change,) = out.changes
    assert isinstance(change, NewLease) and change.record.peer.started == "boot:50"
    # The command line is read later, off the critical path, and journaled then.
    assert s.unidentified == [change.record]
    later = core.identified(s, Peer(pid=50, uid=1000, gid=1000, cmdline="pytest", started="boot:50"))
    assert [type(c) for c in later] == [Identified] and change.record.peer.cmdline == "pytest"


def test_roll_back_frees_the_ports_and_answers_busy() -> None:
    core = make_core()
    s = session()
    out = core.handle_line(s, line(op="lease", count=10), T0, 1)
    assert isinstance(out.changes[0], NewLease)
    err = core.roll_back(1, out.changes[0].record, "No space left on device")
    assert err.code is p.ErrorCode.BUSY and "No space left" in err.message
    assert len(core.table) == 0 and core.table.allocator.free_count == 10


def test_detached_lease_expires_on_the_monotonic_clock_whatever_the_wall_does() -> None:
    core = make_core()
    s = session()
    out = core.handle_line(s, line(op="lease", detach=True, ttl=5), T0, 1)
    assert isinstance(out.reply, p.Granted) and out.reply.expires == T0.wall + 5
    # The wall clock jumps 600 s forward: nothing expires, 1 s has passed.
    jumped = Instant(mono=T0.mono + 1, wall=T0.wall + 600)
    assert core.expire(jumped, lambda peer: False) == []
    renewed = core.handle_line(s, line(op="renew", token=out.reply.token), jumped, 1)
    assert isinstance(renewed.reply, p.Renewed) and renewed.reply.expires == jumped.wall + 5
    # It jumps an hour back: the lease still lapses 5 s (monotonic) after its renewal.
    back = Instant(mono=T0.mono + 6.5, wall=T0.wall - 3600)
    ended = core.expire(back, lambda peer: False)
    assert [type(c) for c in ended] == [LeaseEnded]


def test_connection_close_ends_its_leases_only() -> None:
    core = make_core()
    a, b = session(1), session(2, uid=1001)
    core.handle_line(a, line(op="lease", count=2), T0, 2)
    kept = core.handle_line(b, line(op="lease", count=2), T0, 2).reply
    ended = core.closed(a)
    assert [c.record.ports for c in ended if isinstance(c, LeaseEnded)] == [[40000, 40001]]
    assert isinstance(kept, p.Granted) and core.table.get(kept.token) is not None


def test_reclaim_by_another_uid_moves_the_holder_and_the_quota() -> None:
    core = make_core(max_ports_per_uid=4)
    owner, thief = session(1, uid=1000), session(2, uid=2000, pid=77)
    granted = core.handle_line(owner, line(op="lease", count=3, detach=True), T0, 2).reply
    assert isinstance(granted, p.Granted)
    core.handle_line(thief, line(op="lease", count=2), T0, 2)  # thief holds 2 of its 4
    over = core.handle_line(thief, line(op="reclaim", token=granted.token), T0, 2).reply
    assert isinstance(over, p.Error) and over.code is p.ErrorCode.QUOTA
    assert over.message == "uid 2000 holds 2 ports; this lease's 3 more would pass the per-uid limit of 4"
    core.closed(thief)
    thief = session(3, uid=2000, pid=78)
    out = core.handle_line(thief, line(op="reclaim", token=granted.token), T0, 2)
    assert isinstance(out.reply, p.Reclaimed) and isinstance(out.changes[0], ExpiryChanged)
    assert core.table.ports_of_uid(1000) == 0 and core.table.ports_of_uid(2000) == 3
    status = core.handle_line(owner, line(op="status"), T0, 2).reply
    assert isinstance(status, p.StatusReply)
    assert [(i.uid, i.pid) for i in status.leases] == [(2000, 78)]


def test_status_cuts_long_text_pages_and_filters() -> None:
    core = make_core(low=41000, high=42099, max_leases_per_connection=2000, max_ports_per_uid=5000)
    s = session()
    for i in range(p.MAX_STATUS_LEASES + 5):
        uid_session = s if i % 2 else session(9, uid=1001)
        core.handle_line(uid_session, line(op="lease", note="x" * 1000 if i == 0 else f"n{i}"), T0, 2)
    first = core.handle_line(s, line(op="status"), T0, 2).reply
    assert isinstance(first, p.StatusReply) and first.more and len(first.leases) == p.MAX_STATUS_LEASES
    assert first.leases[0].note is not None and len(first.leases[0].note) == p.STATUS_TEXT_MAX
    assert first.leases[0].note.endswith("…")
    rest = core.handle_line(s, line(op="status", after=first.leases[-1].ports[0]), T0, 2).reply
    assert isinstance(rest, p.StatusReply) and not rest.more and len(rest.leases) == 5
    mine = core.handle_line(s, line(op="status", uid=1000, limit=10), T0, 2).reply
    assert isinstance(mine, p.StatusReply) and {i.uid for i in mine.leases} == {1000}
    assert len(mine.leases) == 10 and mine.more
    assert mine.summary.leases == p.MAX_STATUS_LEASES + 5 and mine.summary.clients == 2


def test_exhausted_names_the_kernels_share_of_the_range() -> None:
    core = make_core()
    core.range_notice = "ports 40005-40009 are in the kernel's ephemeral range"
    out = core.handle_line(session(), line(op="lease", count=11), T0, 1).reply
    assert isinstance(out, p.Error) and out.code is p.ErrorCode.TOO_LARGE
    core.handle_line(session(), line(op="lease", count=10), T0, 1)
    out = core.handle_line(session(2), line(op="lease", count=1), T0, 1).reply
    assert isinstance(out, p.Error) and out.code is p.ErrorCode.EXHAUSTED
    assert "ephemeral range" in out.message and out.largest == 0


def test_restore_brings_attached_leases_back_orphaned_and_detached_ones_detached() -> None:
    core = make_core()
    s = session()
    attached = core.handle_line(s, line(op="lease", count=2), T0, 1).changes[0].record
    detached = core.handle_line(s, line(op="lease", count=2, detach=True, ttl=5), T0, 1).changes[0].record
    records = list(core.table)
    fresh = make_core()
    restart = Instant(mono=T0.mono + 2, wall=T0.wall + 2)
    assert fresh.restore(records, restart, {detached.token}) == []
    a, d = fresh.table.get(attached.token), fresh.table.get(detached.token)
    assert a is not None and a.state.value == "orphaned" and a.expires == restart.mono + 30
    # A detached lease keeps the lifetime it had: a restart must not lengthen it.
    assert d is not None and d.state.value == "detached" and d.expires == T0.mono + 5
    # The owner-alive rule applies to the orphan only, and only up to ORPHAN_KEEP_TTLS.
    alive = lambda peer: True  # noqa: E731
    assert [c.record for c in fresh.expire(Instant(restart.mono + 4, 0), alive)] == [d]
    end = restart.mono + ORPHAN_KEEP_TTLS * 30
    assert fresh.expire(Instant(end - 1, 0), alive) == []
    assert [c.record for c in fresh.expire(Instant(end + 1, 0), alive)] == [a]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.integers(1, 3000).map(lambda n: b"[" * n)),
                max_size=5))
def test_handle_line_never_raises_and_answers_with_a_stable_code(lines: list[bytes]) -> None:
    core = make_core()
    s = session()
    for raw in [*lines, b'{"op":"ping","id":[' + b"[" * 5000 + b"]" * 5001 + b"}"]:
        out = core.handle_line(s, raw, T0, 1)
        assert out.fault is None
        assert isinstance(out.reply, p.Error | p.Pong)
        if isinstance(out.reply, p.Error):
            assert out.reply.code in (p.ErrorCode.BAD_REQUEST, p.ErrorCode.UNKNOWN_OP)
        assert p.decode_reply(p.encode(out.reply)[:-1]) == out.reply


def test_admission_is_the_cores_rule() -> None:
    core = make_core(max_connections_per_uid=2)
    a, b, c = session(1), session(2), session(3)
    assert core.opened(a, 0, 100) is None and core.opened(b, 1, 100) is None
    refused = core.opened(c, 2, 100)
    assert refused is not None and refused.code is p.ErrorCode.QUOTA and refused.id is None
    assert "uid 1000 has 2 connections open" in refused.message
    root = [session(10 + i, uid=0) for i in range(5)]  # root is never capped
    assert all(core.opened(s, 2, 100) is None for s in root)
    full = core.opened(session(20, uid=1001), 100, 100)
    assert full is not None and full.code is p.ErrorCode.BUSY
    core.closed(a)  # a slot of uid 1000 is free again, once
    core.closed(a)
    assert core.connections_of(1000) == 1
    assert core.opened(c, 1, 100) is None


def test_metrics_is_answered_by_the_core_after_hello() -> None:
    core = make_core()
    core.metrics_text = lambda: "# EOF\n"
    early = core.handle_line(session(hello=False), line(op="metrics", id=1), T0, 0).reply
    assert isinstance(early, p.Error) and early.code is p.ErrorCode.HELLO_REQUIRED
    reply = core.handle_line(session(), line(op="metrics", id=2), T0, 0).reply
    assert reply == p.MetricsReply(id=2, text="# EOF\n")
