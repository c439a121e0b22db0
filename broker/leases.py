"""The lease table: who holds which ports, until when, and under which limits.

Pure: no sockets, no clock, no randomness of its own. The server passes in
``now`` (elapsed seconds on a monotonic clock: a wall-clock step must neither
expire a live lease nor keep a dead one), the wall time for display, the bind
check and fresh tokens. Every rule about leases lives here:

- a lease bound to a live connection never expires; when the connection ends,
  :meth:`LeaseTable.drop_connection` releases all its leases at once;
- a detached or restored (orphaned) lease lives until ``expires``, pushed
  forward by ``renew`` and ended by ``release`` or :meth:`LeaseTable.expire`;
- ``reclaim`` binds a detached or orphaned lease to a new connection, which
  then holds it (and counts it against its own uid's quota);
- after a broker restart, a lease that was bound to a connection comes back
  *orphaned* and is kept while the very process that took it still runs (it may
  be stopped and unable to reclaim), for at most ORPHAN_KEEP_TTLS of its TTL;
  a detached lease comes back detached, with the lifetime it had left.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field

from portlease.client.protocol.bounds import DEFAULT_PORTS_PER_REQUEST
from portlease.client.protocol.errors import Exhausted, InUse, NotFound, QuotaExceeded, TooLarge

from .allocator import Allocator, BindCheck

EXPIRY_SLACK = 64
"""Stale entries the expiry heap may hold beyond one per live expiry before it is rebuilt
(see :meth:`LeaseTable._set_expiry`): the heap holds at most ``2 * live + EXPIRY_SLACK``
entries, however often leases are renewed."""

ORPHAN_KEEP_TTLS = 10
"""An orphan whose owner still runs is kept at most this many TTLs after the
restart: long enough for a process stopped across it, short enough that a lease
whose end the journal missed (a full disk) cannot outlive the owner's session."""


class LeaseState(enum.StrEnum):
    """What ``status`` shows a lease as; derived from the record, never stored."""

    ATTACHED = "attached"
    """Bound to a live connection; released when it closes."""
    DETACHED = "detached"
    """Unbound on purpose; expires unless renewed."""
    ORPHANED = "orphaned"
    """Restored after a broker restart; expires unless reclaimed or renewed."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Who asked, as the kernel says (SO_PEERCRED), plus the client's own note."""

    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    cmdline: str | None = None
    started: str | None = None
    """When the process started (boot id and start time): tells it from a later
    process that happens to get the same pid."""


class Instant:
    """One moment on both clocks: ``mono`` for every duration, ``wall`` for display
    and the journal.

    ``offset`` is wall minus monotonic time. The broker keeps it fixed until the
    wall clock really moves, so that an expiry shown twice shows the same number.
    A plain class, not a dataclass: the shell makes a few per request.
    """

    __slots__ = ("mono", "offset", "wall")

    def __init__(self, mono: float, wall: float, offset: float | None = None) -> None:
        self.mono = mono
        self.wall = wall
        self.offset = wall - mono if offset is None else offset

    def __repr__(self) -> str:
        return f"Instant(mono={self.mono!r}, wall={self.wall!r}, offset={self.offset!r})"

    def to_wall(self, mono: float) -> float:
        """The wall time of monotonic time ``mono``, as the clocks stand now."""
        return mono + self.offset


@dataclass(frozen=True, slots=True)
class Limits:
    """The configured limits (see :class:`~.config.Config`) the table enforces."""

    max_ports_per_request: int = DEFAULT_PORTS_PER_REQUEST
    max_ports_per_uid: int = 4096
    max_leases_per_connection: int = 1024
    max_connections_per_uid: int = 1024
    """Open connections of one uid (root is not capped); enforced by the core at admission."""


@dataclass(slots=True)
class LeaseRecord:
    """One lease: its ports, its holder, and what binds it or when it lapses."""

    token: str
    start: int
    count: int
    ttl: float
    granted: float
    """Wall time of the grant: for display only."""
    peer: Peer
    note: str | None = None
    connection: int | None = None
    """The connection the lease is bound to; None when detached or orphaned."""
    expires: float | None = None
    """Monotonic time the lease lapses; None while bound to a connection."""
    orphaned: bool = False
    since: float = 0.0
    """Monotonic time of the grant (how long a lease was held)."""
    keep_until: float | None = None
    """For an orphan: the latest time it is kept while its owner still runs."""

    @property
    def ports(self) -> list[int]:
        """Every port of the lease, in order."""
        return list(range(self.start, self.start + self.count))

    @property
    def state(self) -> LeaseState:
        """Attached, detached or orphaned, from ``connection`` and ``orphaned``."""
        if self.connection is not None:
            return LeaseState.ATTACHED
        return LeaseState.ORPHANED if self.orphaned else LeaseState.DETACHED


@dataclass(slots=True)
class LeaseTable:
    """All leases, indexed by token, by connection and by uid."""

    allocator: Allocator
    limits: Limits = field(default_factory=Limits)
    _by_token: dict[str, LeaseRecord] = field(default_factory=dict)
    _by_connection: dict[int, set[str]] = field(default_factory=dict)
    _ports_by_uid: dict[int | None, int] = field(default_factory=dict)
    _expiries: list[tuple[float, str]] = field(default_factory=list)
    """A heap of (expiry, token); an entry whose token's live expiry differs is stale."""
    _expiry_of: dict[str, float] = field(default_factory=dict)
    """The one live expiry of each unbound lease (what :meth:`expire` acts on)."""
    _ports_held: int = 0

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._by_token)

    def __iter__(self) -> Iterator[LeaseRecord]:
        return iter(self._by_token.values())

    def get(self, token: str) -> LeaseRecord | None:
        return self._by_token.get(token)

    @property
    def ports_held(self) -> int:
        return self._ports_held

    def ports_of_uid(self, uid: int | None) -> int:
        return self._ports_by_uid.get(uid, 0)

    def leases_of(self, connection: int) -> list[LeaseRecord]:
        return [self._by_token[t] for t in self._by_connection.get(connection, ())]

    @property
    def expiry_entries(self) -> tuple[int, int]:
        """(entries in the expiry heap, live expiries): the heap's bound is checkable."""
        return len(self._expiries), len(self._expiry_of)

    # ------------------------------------------------------------ operations

    def grant(
        self,
        *,
        token: str,
        count: int,
        ttl: float,
        now: float,
        bind_ok: BindCheck,
        peer: Peer,
        connection: int | None,
        note: str | None = None,
        wall: float | None = None,
    ) -> LeaseRecord:
        """Allocate ``count`` consecutive ports and record the lease.

        ``connection=None`` makes a detached lease expiring at ``now + ttl``.
        ``wall`` is the wall time shown as the grant's time (default ``now``).
        Raises :class:`TooLarge`, :class:`QuotaExceeded` or :class:`Exhausted`.
        """
        limits = self.limits
        if count > limits.max_ports_per_request:
            raise TooLarge(
                f"count {count} is above the per-request limit of "
                f"{limits.max_ports_per_request} ports"
            )
        if count > self.allocator.size:
            raise TooLarge(f"count {count} is larger than the whole range ({self.allocator.size})")
        self._check_uid_room(peer.uid, count)
        if connection is not None:
            self._check_connection_room(connection)
        if token in self._by_token:
            raise ValueError("token reused")
        start = self.allocator.allocate(count, bind_ok, now)
        if start is None:
            largest = self.allocator.largest_free_run
            raise Exhausted(
                f"no run of {count} free ports in {self.allocator.low}-{self.allocator.high}; "
                f"the largest free run is {largest}",
                largest=largest,
            )
        record = LeaseRecord(
            token=token, start=start, count=count, ttl=ttl, granted=now if wall is None else wall,
            peer=peer, note=note, since=now,
        )
        self._insert(record, held=True)
        if connection is None:
            self._set_expiry(record, now + ttl)
        else:
            self._bind(record, connection)
        return record

    def release(self, token: str) -> LeaseRecord:
        """End a lease by token; its ports are free at once."""
        record = self._lookup(token)
        self._remove(record)
        return record

    def renew(self, token: str, now: float) -> LeaseRecord:
        """Push an unbound lease's expiry to ``now + ttl``; a bound lease is left as is."""
        record = self._lookup(token)
        if record.connection is None:
            self._set_expiry(record, now + record.ttl)
        return record

    def detach(self, token: str, now: float) -> LeaseRecord:
        """Unbind a lease from its connection; it expires at ``now + ttl``."""
        record = self._lookup(token)
        self._unbind(record)
        record.orphaned = False
        self._set_expiry(record, now + record.ttl)
        return record

    def reclaim(self, token: str, connection: int, peer: Peer | None = None) -> LeaseRecord:
        """Bind an unbound lease to ``connection``. A lease bound elsewhere is :class:`InUse`.

        The reclaiming ``peer`` becomes the holder: ``status`` shows it, and when
        it runs as another uid (a token handed on, or leaked), the ports count
        against that uid's quota from now on.
        """
        record = self._lookup(token)
        if record.connection == connection:
            return record
        if record.connection is not None:
            raise InUse("the lease is held by another live connection")
        self._check_connection_room(connection)
        if peer is not None and peer.uid != record.peer.uid:
            self._check_uid_room(peer.uid, record.count, reclaimed=True)
            self._uncount(record)
            record.peer = peer
            self._count(record)
        elif peer is not None and peer.pid is not None:
            record.peer = peer
        record.orphaned = False
        record.expires = None
        record.keep_until = None
        self._bind(record, connection)
        return record

    def drop_connection(self, connection: int) -> list[LeaseRecord]:
        """Release every lease bound to ``connection`` (it closed)."""
        tokens = self._by_connection.pop(connection, set())
        dropped = []
        for token in tokens:
            record = self._by_token[token]
            record.connection = None  # already unindexed by the pop above
            self._remove(record)
            dropped.append(record)
        return dropped

    def expire(
        self, now: float, owner_alive: Callable[[Peer], bool] | None = None
    ) -> list[LeaseRecord]:
        """Release every unbound lease whose expiry is at or before ``now``.

        An *orphan* (restored after a restart, never reclaimed) whose owner
        ``owner_alive`` says is still running gets another TTL instead, up to
        its ``keep_until``: a client that was stopped (SIGSTOP, a debugger) while
        the broker restarted could not reclaim, yet still means to use its
        ports. Detached leases expire regardless: their owners chose the TTL.
        """
        out = []
        # Not a local alias: removing a lease may rebuild the heap (_bound_expiries).
        while self._expiries and self._expiries[0][0] <= now:
            when, token = heapq.heappop(self._expiries)
            # A renew or a bind leaves the old entry in the heap: skip it.
            if self._expiry_of.get(token) != when:
                continue
            record = self._by_token[token]
            if (
                record.orphaned
                and owner_alive is not None
                and (record.keep_until is None or now < record.keep_until)
                and owner_alive(record.peer)
            ):
                until = now + record.ttl
                if record.keep_until is not None:
                    until = min(until, record.keep_until)
                self._set_expiry(record, max(until, now))
                continue
            self._remove(record)
            out.append(record)
        return out

    def restore(
        self, records: Iterable[LeaseRecord], now: float, *, detached: Collection[str] = ()
    ) -> list[LeaseRecord]:
        """Take back leases from a previous broker run.

        A lease that was bound to a connection comes back as an orphan and keeps
        its ports for one TTL (and while its owner runs, up to ORPHAN_KEEP_TTLS
        TTLs) unless its owner reclaims it. A lease whose token is in
        ``detached`` comes back detached and keeps the expiry it had (its
        ``expires``, on this ``now``'s clock): a restart must not lengthen a
        lifetime its owner chose. A record that overlaps one already restored,
        or falls outside the range, is skipped and returned, so that restore can
        never create a port held twice.
        """
        skipped = []
        for record in records:
            end = record.start + record.count
            if (
                record.token in self._by_token
                or record.start < self.allocator.low
                or end - 1 > self.allocator.high
                or self._overlaps_lease(record.start, record.count)
            ):
                skipped.append(record)
                continue
            record.connection = None
            self._insert(record, held=False)
            if record.token in detached and record.expires is not None:
                record.orphaned = False
                record.keep_until = None
                self._set_expiry(record, record.expires)
            else:
                record.orphaned = True
                record.keep_until = now + ORPHAN_KEEP_TTLS * record.ttl
                self._set_expiry(record, now + record.ttl)
        return skipped

    def rebind_allocator(self, allocator: Allocator) -> None:
        """Move every lease onto a new allocator (a reloaded range), keeping them all."""
        for record in self._by_token.values():
            allocator.hold(record.start, record.count)
        self.allocator = allocator

    # ------------------------------------------------------------ internals

    def _lookup(self, token: str) -> LeaseRecord:
        record = self._by_token.get(token)
        if record is None:
            raise NotFound("no lease has this token (released, expired or never granted)")
        return record

    def _check_uid_room(self, uid: int | None, count: int, *, reclaimed: bool = False) -> None:
        """Raise :class:`QuotaExceeded` unless ``uid`` may hold ``count`` more ports
        (a new grant's, or a ``reclaimed`` lease's)."""
        held = self._ports_by_uid.get(uid, 0)
        if held + count > self.limits.max_ports_per_uid:
            what = f"this lease's {count} more" if reclaimed else f"{count} more"
            raise QuotaExceeded(
                f"uid {uid} holds {held} ports; {what} would pass the "
                f"per-uid limit of {self.limits.max_ports_per_uid}"
            )

    def _check_connection_room(self, connection: int) -> None:
        """Raise :class:`QuotaExceeded` when ``connection`` holds its limit of leases."""
        n = len(self._by_connection.get(connection, ()))
        if n >= self.limits.max_leases_per_connection:
            raise QuotaExceeded(f"this connection holds {n} leases, the per-connection limit")

    def _overlaps_lease(self, start: int, count: int) -> bool:
        # Leases are the only holders at restore time apart from the permanent
        # exclusions, so a held port inside the range means another lease or an
        # excluded port; either way the record must not be restored over it.
        return self.allocator.held_by_anyone(start, count)

    def _insert(self, record: LeaseRecord, *, held: bool) -> None:
        """Index a record; ``held`` says the allocator already holds its run."""
        self._by_token[record.token] = record
        self._count(record)
        self._ports_held += record.count
        if not held:
            self.allocator.hold(record.start, record.count)

    def _remove(self, record: LeaseRecord) -> None:
        del self._by_token[record.token]
        self._unbind(record)
        self._uncount(record)
        self._ports_held -= record.count
        self.allocator.unhold(record.start, record.count)
        record.expires = None
        if self._expiry_of.pop(record.token, None) is not None:
            self._bound_expiries()

    def _count(self, record: LeaseRecord) -> None:
        uid = record.peer.uid
        self._ports_by_uid[uid] = self._ports_by_uid.get(uid, 0) + record.count

    def _uncount(self, record: LeaseRecord) -> None:
        uid = record.peer.uid
        left = self._ports_by_uid[uid] - record.count
        if left:
            self._ports_by_uid[uid] = left
        else:
            del self._ports_by_uid[uid]

    def _bind(self, record: LeaseRecord, connection: int) -> None:
        record.connection = connection
        record.expires = None
        if self._expiry_of.pop(record.token, None) is not None:
            self._bound_expiries()
        self._by_connection.setdefault(connection, set()).add(record.token)

    def _unbind(self, record: LeaseRecord) -> None:
        connection = record.connection
        if connection is None:
            return
        tokens = self._by_connection.get(connection)
        if tokens is not None:
            tokens.discard(record.token)
            if not tokens:
                del self._by_connection[connection]
        record.connection = None

    def _set_expiry(self, record: LeaseRecord, when: float) -> None:
        """Arm the lease's one live expiry: O(log n), and the heap stays O(leases).

        The entry an earlier expiry pushed stays in the heap, stale, until it is
        popped or the heap is rebuilt from the live expiries, which happens once
        stale entries outnumber live ones (plus EXPIRY_SLACK; a bind or an end
        makes an entry stale too): a rebuild costs O(live) and follows at least
        as many new stale entries, so a renew loop costs amortised O(log n) time
        and no memory.
        """
        record.expires = when
        self._expiry_of[record.token] = when
        heapq.heappush(self._expiries, (when, record.token))
        self._bound_expiries()

    def _bound_expiries(self) -> None:
        if len(self._expiries) > 2 * len(self._expiry_of) + EXPIRY_SLACK:
            self._expiries = [(w, t) for t, w in self._expiry_of.items()]
            heapq.heapify(self._expiries)
