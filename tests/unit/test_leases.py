"""The lease table's rules, checked over random histories (hypothesis state machine)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from portlease.broker.allocator import Allocator
from portlease.broker.leases import EXPIRY_SLACK, LeaseRecord, LeaseState, LeaseTable, Limits, Peer
from portlease.client.protocol.errors import Exhausted, InUse, LeaseError, NotFound, QuotaExceeded, TooLarge

LOW, HIGH = 1000, 1063
always = lambda port: True  # noqa: E731


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = LeaseTable(
            Allocator(LOW, HIGH),
            Limits(max_ports_per_request=16, max_ports_per_uid=40, max_leases_per_connection=5),
        )
        self.now = 0.0
        self.tokens = (f"t{i}" for i in itertools.count())
        self.live_connections: set[int] = {1, 2, 3}
        self.next_conn = 4
        self.known: list[str] = []  # tokens ever granted (some since ended)
        self.free_at_start = self.table.allocator.free_count

    # ------------------------------------------------------------ rules

    @rule(count=st.integers(1, 20), conn=st.integers(1, 6), uid=st.integers(0, 2),
          detach=st.booleans())
    def grant(self, count: int, conn: int, uid: int, detach: bool) -> None:
        if conn not in self.live_connections:
            return
        free_before = self.table.allocator.free_count
        try:
            record = self.table.grant(
                token=next(self.tokens), count=count, ttl=10.0, now=self.now, bind_ok=always,
                peer=Peer(pid=conn, uid=uid, gid=uid), connection=None if detach else conn,
            )
        except TooLarge:
            assert count > 16
            return
        except QuotaExceeded:
            assert (
                self.table.ports_of_uid(uid) + count > 40
                or len(self.table.leases_of(conn)) >= 5
            )
            return
        except Exhausted as exc:
            assert exc.largest is not None and exc.largest < count
            return
        assert record.count == count
        assert self.table.allocator.free_count == free_before - count
        self.known.append(record.token)

    @precondition(lambda self: self.known)
    @rule(i=st.integers(0, 10_000))
    def release(self, i: int) -> None:
        token = self.known[i % len(self.known)]
        record = self.table.get(token)
        free_before = self.table.allocator.free_count
        if record is None:
            with pytest.raises(NotFound):
                self.table.release(token)
            return
        got = self.table.release(token)
        assert got is record
        # Every release returns exactly its ports.
        assert self.table.allocator.free_count == free_before + record.count
        assert all(self.table.allocator.is_free(port) for port in record.ports)

    @rule(conn=st.integers(1, 6))
    def connection_closes(self, conn: int) -> None:
        if conn not in self.live_connections:
            return
        held = self.table.leases_of(conn)
        dropped = self.table.drop_connection(conn)
        assert {r.token for r in dropped} == {r.token for r in held}
        self.live_connections.discard(conn)
        for r in dropped:
            assert self.table.get(r.token) is None

    @rule()
    def connection_opens(self) -> None:
        self.live_connections.add(self.next_conn)
        self.next_conn += 1

    @precondition(lambda self: self.known)
    @rule(i=st.integers(0, 10_000), conn=st.integers(1, 8))
    def reclaim(self, i: int, conn: int) -> None:
        token = self.known[i % len(self.known)]
        record = self.table.get(token)
        if conn not in self.live_connections:
            return
        try:
            got = self.table.reclaim(token, conn)
        except NotFound:
            assert record is None
        except InUse:
            assert record is not None and record.connection not in (None, conn)
        except QuotaExceeded:
            assert len(self.table.leases_of(conn)) >= 5
        else:
            assert got.connection == conn and got.expires is None

    @precondition(lambda self: self.known)
    @rule(i=st.integers(0, 10_000))
    def detach(self, i: int) -> None:
        token = self.known[i % len(self.known)]
        try:
            record = self.table.detach(token, self.now)
        except NotFound:
            return
        assert record.state is LeaseState.DETACHED and record.expires == self.now + 10.0

    @precondition(lambda self: self.known)
    @rule(i=st.integers(0, 10_000))
    def renew(self, i: int) -> None:
        token = self.known[i % len(self.known)]
        try:
            record = self.table.renew(token, self.now)
        except LeaseError:
            return
        if record.connection is None:
            assert record.expires == self.now + record.ttl

    @rule(dt=st.floats(0.5, 15.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        for record in self.table.expire(self.now):
            # Only unbound leases expire, and only once their time has come.
            assert record.connection is None
        for record in self.table:
            assert record.expires is None or record.expires > self.now

    @rule()
    def broker_restarts(self) -> None:
        """Everything becomes an orphan in a fresh table, as after a crash."""
        records = [
            LeaseRecord(token=r.token, start=r.start, count=r.count, ttl=r.ttl,
                        granted=r.granted, peer=r.peer, note=r.note, expires=r.expires)
            for r in self.table
        ]
        fresh = LeaseTable(Allocator(LOW, HIGH), self.table.limits)
        skipped = fresh.restore(records, self.now)
        assert skipped == []
        assert all(r.state is LeaseState.ORPHANED for r in fresh)
        self.table = fresh
        self.live_connections = {self.next_conn}
        self.next_conn += 1

    # ------------------------------------------------------------ invariants

    @invariant()
    def no_port_in_two_leases(self) -> None:
        seen: dict[int, str] = {}
        for record in self.table:
            for port in record.ports:
                assert port not in seen, f"port {port} in {seen[port]} and {record.token}"
                seen[port] = record.token
                assert not self.table.allocator.is_free(port)
        assert self.table.ports_held == len(seen)
        assert self.table.allocator.free_count == self.free_at_start - len(seen)

    @invariant()
    def indexes_agree(self) -> None:
        for record in self.table:
            if record.connection is not None:
                assert record.connection in self.live_connections
                assert record in self.table.leases_of(record.connection)
                assert record.expires is None
            else:
                assert record.expires is not None
        per_uid: dict[int | None, int] = {}
        for record in self.table:
            per_uid[record.peer.uid] = per_uid.get(record.peer.uid, 0) + record.count
        for uid, n in per_uid.items():
            assert self.table.ports_of_uid(uid) == n <= 40

    @invariant()
    def expiry_heap_is_bounded_by_the_leases(self) -> None:
        entries, live = self.table.expiry_entries
        assert live == sum(r.expires is not None for r in self.table)
        assert entries <= 2 * live + EXPIRY_SLACK


LeaseMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestLeaseMachine = LeaseMachine.TestCase


def detached_table(n: int, ttl: float = 10.0) -> tuple[LeaseTable, list[str]]:
    table = LeaseTable(Allocator(LOW, HIGH))
    tokens = [f"d{i}" for i in range(n)]
    for t in tokens:
        table.grant(token=t, count=1, ttl=ttl, now=0.0, bind_ok=always, peer=Peer(uid=1), connection=None)
    return table, tokens


def test_renewing_in_a_loop_keeps_one_heap_entry_per_lease() -> None:
    """Issue 20: 4.74 M renews grew the heap (and the broker) by ~480 MB, never freed."""
    table, (token,) = detached_table(1)
    for i in range(20_000):
        table.renew(token, now=i * 1e-3)
        entries, live = table.expiry_entries
        assert live == 1 and entries <= 2 + EXPIRY_SLACK
    # The lease still expires exactly once, at its last renewal's time.
    last = table.get(token)
    assert last is not None and last.expires is not None
    assert table.expire(last.expires - 1e-6) == []
    assert [r.token for r in table.expire(last.expires)] == [token]
    assert table.expiry_entries[1] == 0


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["renew"] * 6 + ["release", "reclaim", "detach", "expire"]),
                              st.integers(0, 7), st.sampled_from([0.0, 0.5, 2.0, 40.0])),
                    min_size=150, max_size=400))
def test_heap_stays_bounded_and_expiry_matches_the_records(ops: list[tuple[str, int, float]]) -> None:
    """Whatever mix of renews, binds and ends: at most 2 * live + EXPIRY_SLACK heap entries,
    and expire() ends exactly the unbound leases whose own expiry has come."""
    table, tokens = detached_table(8, ttl=100.0)
    now = 0.0
    for op, i, dt in ops:
        now += dt
        token = tokens[i]
        record = table.get(token)
        if op == "expire":
            due = {r.token for r in table if r.connection is None and r.expires is not None
                   and r.expires <= now}
            assert {r.token for r in table.expire(now)} == due
        elif record is None:  # released or expired: a new lease under the same token
            table.grant(token=token, count=1, ttl=100.0, now=now, bind_ok=always, peer=Peer(uid=1),
                        connection=None)
        elif op == "renew":
            table.renew(token, now)
        elif op == "release":
            table.release(token)
        elif op == "reclaim":
            table.reclaim(token, connection=i + 1)
        else:
            table.detach(token, now)
        entries, live = table.expiry_entries
        assert live == sum(r.expires is not None for r in table)
        assert entries <= 2 * live + EXPIRY_SLACK


def test_restore_skips_records_that_overlap_or_leave_the_range() -> None:
    table = LeaseTable(Allocator(LOW, HIGH))
    a = LeaseRecord(token="a", start=1000, count=4, ttl=5, granted=0, peer=Peer(), expires=None)
    b = LeaseRecord(token="b", start=1003, count=2, ttl=5, granted=0, peer=Peer())
    c = LeaseRecord(token="c", start=1062, count=4, ttl=5, granted=0, peer=Peer())
    skipped = table.restore([a, b, c], now=100.0)
    assert [r.token for r in skipped] == ["b", "c"]
    restored = table.get("a")
    assert restored is not None and restored.state is LeaseState.ORPHANED
    assert restored.expires == 105.0  # the TTL counts from the restart


def test_reclaimed_orphan_is_bound_and_freed_with_its_new_connection() -> None:
    table = LeaseTable(Allocator(LOW, HIGH))
    table.restore([LeaseRecord(token="a", start=1010, count=2, ttl=5, granted=0, peer=Peer())], 0.0)
    table.reclaim("a", connection=7)
    assert table.expire(1000.0) == []  # bound leases do not expire
    assert [r.token for r in table.drop_connection(7)] == ["a"]
    assert table.allocator.is_free(1010) and table.allocator.is_free(1011)


def test_orphan_of_a_live_owner_outlives_its_ttl_but_detached_leases_do_not() -> None:
    table = LeaseTable(Allocator(LOW, HIGH))
    alive = Peer(pid=1, uid=0, started="boot:1")
    table.restore([LeaseRecord(token="orphan", start=1000, count=1, ttl=5, granted=0, peer=alive)], 0.0)
    table.grant(token="detached", count=1, ttl=5, now=0.0, bind_ok=always, peer=alive,
                connection=None)
    running = {"boot:1"}
    expired = table.expire(6.0, lambda peer: peer.started in running)
    assert [r.token for r in expired] == ["detached"]
    kept = table.get("orphan")
    assert kept is not None and kept.expires == 11.0  # another TTL from now
    running.clear()  # the owner is gone: the next sweep after its TTL frees the port
    assert table.expire(10.0, lambda peer: peer.started in running) == []
    assert [r.token for r in table.expire(11.0, lambda peer: peer.started in running)] == ["orphan"]
