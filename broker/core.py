"""The broker's protocol core: one request in, one reply and the journal changes out.

Pure, in the way h11 is: no trio, sockets, threads or clock of its own. The
shell (:mod:`.handler`) passes in the time (an :class:`~.leases.Instant`),
fresh tokens, the bind check and the peer's credentials, and gets back an
:class:`Outcome`: the reply to send and the :data:`Change` records to journal
*before* the reply leaves. When the journal refuses a new lease, the shell
calls :meth:`BrokerCore.roll_back` and sends the reply it returns instead.

Every rule about *what* the broker answers lives here (the hello gate, from
:mod:`portlease.client.protocol.conversation`; TTL defaults, the reply to each
request, the size of a ``status`` page); every rule about *which* lease may do
what lives in :mod:`.leases`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import assert_never

from portlease import __version__
from portlease.client import protocol as p
from portlease.client.protocol import conversation
from portlease.client.protocol.errors import Busy, LeaseError

from .allocator import BindCheck
from .leases import Instant, LeaseRecord, LeaseTable, Peer

BROKER_NAME = f"portlease/{__version__}"
"""What ``hello`` names the broker, with the one version of the package."""


@dataclass(slots=True)
class Session:
    """What the core keeps about one connection."""

    id: int
    peer: Peer
    """SO_PEERCRED at first; with command line and start time once /proc was read."""
    hello: bool = False
    identified: bool = False
    """``peer`` carries what /proc said (read once, after the first grant's reply left)."""
    unidentified: list[LeaseRecord] = field(default_factory=list)
    """Leases granted to this session before its /proc identity was read."""
    admitted: bool = False
    """Counted among its uid's open connections (:meth:`BrokerCore.opened`)."""


# ---------------------------------------------------------------- journal changes


@dataclass(frozen=True, slots=True)
class NewLease:
    """Journal this lease; if that fails, the grant must be rolled back."""

    record: LeaseRecord


@dataclass(frozen=True, slots=True)
class LeaseEnded:
    """A lease ended: released, expired, or its connection closed."""

    record: LeaseRecord


@dataclass(frozen=True, slots=True)
class ExpiryChanged:
    """A lease's expiry (or whether it is bound to a connection) changed."""

    record: LeaseRecord


@dataclass(frozen=True, slots=True)
class Identified:
    """A lease's holder's command line and start time are known now."""

    record: LeaseRecord


Change = NewLease | LeaseEnded | ExpiryChanged | Identified


@dataclass(slots=True)
class Outcome:
    """The reply to one request, and what to journal before it is sent."""

    reply: p.Reply
    changes: list[Change] = field(default_factory=list)
    fault: str | None = None
    """A bug in the broker met this request (the reply says ``internal``); for the log."""
    op: str = "?"
    """The request's operation, for the log (``?`` when the line did not decode)."""


def _text(value: str | None) -> str | None:
    """A command line or note as ``status`` shows it: at most STATUS_TEXT_MAX characters."""
    if value is None or len(value) <= p.STATUS_TEXT_MAX:
        return value
    return value[: p.STATUS_TEXT_MAX - 1] + "…"


def decode_line(line: bytes) -> p.AnyRequest | Outcome:
    """The request on ``line``, or the error reply's outcome when it does not decode. Never raises.

    The shell decides what it answers itself (``metrics``, a lease that waits on
    the share) from what this returns, never from the line's bytes: JSON may
    spell an op with escapes.
    """
    try:
        return p.decode_request(line)
    except Exception as exc:
        try:
            return Outcome(p.error_for_bad_line(line, exc))
        except Exception as exc2:
            return Outcome(
                p.Error(id=None, code=p.ErrorCode.BAD_REQUEST, message="cannot read request"),
                fault=f"error_for_bad_line failed: {exc2!r}",
            )


@dataclass
class BrokerCore:
    """The lease table and the rules for answering requests about it."""

    table: LeaseTable
    ttl: float
    """TTL of a lease whose request names none."""
    new_token: Callable[[], str]
    bind_ok: BindCheck
    pid: int
    """The broker's pid, told to clients in ``hello``."""
    started_of: Callable[[int | None], str | None] = lambda pid: None
    """The start time of a process (boot id and clock ticks): read when a session
    first takes a lease, so that the journal can tell the very process that took
    it from a later one with its pid, even if the broker dies a moment later."""
    user_name: Callable[[int], str | None] = lambda uid: None
    range_notice: str | None = None
    """Why part of the range is never granted; appended to ``exhausted`` errors."""
    metrics_text: Callable[[], str] = lambda: ""
    """The broker's metrics in the OpenMetrics text format (the shell keeps the counters)."""
    _conns_by_uid: dict[int | None, int] = field(default_factory=dict)

    # -------------------------------------------------------- connections

    def opened(self, session: Session, open_now: int, max_open: int) -> p.Error | None:
        """Admit a new connection, or the error that refuses it (the shell sends it and closes).

        ``open_now`` connections were open before this one; the process may hold
        ``max_open`` (its file descriptors). A uid holds at most
        ``max_connections_per_uid``; root is not capped, so the operator can
        always look (``status``).
        """
        if open_now >= max_open:
            return p.Error(id=None, code=p.ErrorCode.BUSY, message="too many connections")
        uid = session.peer.uid
        held = self._conns_by_uid.get(uid, 0)
        if uid not in (None, 0) and held >= self.table.limits.max_connections_per_uid:
            return p.Error(
                id=None, code=p.ErrorCode.QUOTA,
                message=f"uid {uid} has {held} connections open, the per-uid limit; close some",
            )
        self._conns_by_uid[uid] = held + 1
        session.admitted = True
        return None

    def connections_of(self, uid: int | None) -> int:
        """Open connections of ``uid`` admitted by :meth:`opened`."""
        return self._conns_by_uid.get(uid, 0)

    # -------------------------------------------------------- requests

    def handle_line(self, session: Session, line: bytes, now: Instant, clients: int) -> Outcome:
        """Decode one request line and carry it out. Never raises."""
        request = decode_line(line)
        if isinstance(request, Outcome):
            return request
        return self.handle(session, request, now, clients)

    def handle(self, session: Session, request: p.AnyRequest, now: Instant, clients: int) -> Outcome:
        """Carry out one decoded request. Never raises."""
        try:
            outcome = self._handle(session, request, now, clients)
        except LeaseError as exc:
            message = exc.message
            if exc.code is p.ErrorCode.EXHAUSTED and self.range_notice:
                message = f"{message}; {self.range_notice}"
            outcome = Outcome(p.Error(id=request.id, code=exc.code, message=message, largest=exc.largest))
        except Exception as exc:
            outcome = Outcome(
                p.Error(id=request.id, code=p.ErrorCode.INTERNAL, message="internal error"),
                fault=f"{type(request).__name__} failed: {exc!r}",
            )
        outcome.op = type(request).__name__.lower()
        return outcome

    def _handle(self, session: Session, req: p.AnyRequest, now: Instant, clients: int) -> Outcome:
        refusal = conversation.hello_gate(session.hello, req)
        if refusal is not None:
            return Outcome(refusal)
        if isinstance(req, p.Hello):
            session.hello = True
            return Outcome(p.Welcome(id=req.id, version=p.PROTOCOL_VERSION, broker=BROKER_NAME,
                                     pid=self.pid))
        table = self.table
        match req:
            case p.Lease():
                return self._lease(session, req, now)
            case p.Release():
                record = table.release(req.token)
                return Outcome(p.Released(id=req.id, ports=record.ports), [LeaseEnded(record)])
            case p.Renew():
                record = table.renew(req.token, now.mono)
                if record.expires is None:
                    return Outcome(p.Renewed(id=req.id, ports=record.ports))
                return Outcome(
                    p.Renewed(id=req.id, ports=record.ports, expires=now.to_wall(record.expires)),
                    [ExpiryChanged(record)],
                )
            case p.Detach():
                record = table.detach(req.token, now.mono)
                assert record.expires is not None
                return Outcome(
                    p.Detached(id=req.id, ports=record.ports, expires=now.to_wall(record.expires)),
                    [ExpiryChanged(record)],
                )
            case p.Reclaim():
                self._know_start(session)
                record = table.reclaim(req.token, session.id, session.peer)
                if not session.identified:
                    session.unidentified.append(record)
                return Outcome(p.Reclaimed(id=req.id, ports=record.ports), [ExpiryChanged(record)])
            case p.Status():
                return Outcome(self.status(req, now, clients))
            case p.Metrics():
                return Outcome(p.MetricsReply(id=req.id, text=self.metrics_text()))
            case p.Ping():
                return Outcome(p.Pong(id=req.id))
            case p.Hello():
                raise AssertionError("unreachable")
            case _:
                assert_never(req)

    def _lease(self, session: Session, req: p.Lease, now: Instant) -> Outcome:
        self._know_start(session)
        try:
            record = self.table.grant(
                token=self.new_token(), count=req.count,
                ttl=req.ttl if req.ttl is not None else self.ttl, now=now.mono, wall=now.wall,
                bind_ok=self.bind_ok, peer=session.peer,
                connection=None if req.detach else session.id, note=req.note,
            )
        except OSError as exc:
            # The bind check could not even open a probe socket (EMFILE, ENFILE,
            # ENOBUFS): nothing was granted, and the client may try again.
            raise Busy(f"the broker cannot check ports right now ({exc.strerror})") from None
        if not session.identified:
            session.unidentified.append(record)
        return Outcome(
            p.Granted(
                id=req.id, ports=record.ports, token=record.token, ttl=record.ttl,
                expires=None if record.expires is None else now.to_wall(record.expires),
            ),
            [NewLease(record)],
        )

    def _know_start(self, session: Session) -> None:
        peer = session.peer
        if peer.started is None and not session.identified:
            session.peer = Peer(pid=peer.pid, uid=peer.uid, gid=peer.gid, cmdline=peer.cmdline,
                                started=self.started_of(peer.pid))

    def roll_back(self, request_id: p.RequestId | None, record: LeaseRecord, why: str) -> p.Error:
        """Undo a grant the journal could not record; the reply to send instead."""
        if self.table.get(record.token) is record:
            self.table.release(record.token)
        return p.Error(id=request_id, code=p.ErrorCode.BUSY,
                       message=f"the broker cannot record leases right now ({why})")

    # -------------------------------------------------------- status

    def status(self, req: p.Status, now: Instant, clients: int) -> p.StatusReply:
        """One page of the lease list, sorted by first port, with the summary."""
        a = self.table.allocator
        summary = p.Summary(
            range=(a.low, a.high), leases=len(self.table), ports_held=self.table.ports_held,
            ports_free=a.free_count, largest_free_run=a.largest_free_run,
            clients=clients, ttl=self.ttl, notice=self.range_notice,
        )
        after = req.after if req.after is not None else -1
        chosen = sorted(
            (r for r in self.table if r.start > after and (req.uid is None or r.peer.uid == req.uid)),
            key=lambda r: r.start,
        )
        page = chosen[: req.limit]
        leases = [
            p.LeaseInfo(
                ports=r.ports, state=r.state.value, pid=r.peer.pid, uid=r.peer.uid,
                gid=r.peer.gid, user=self.user_name(r.peer.uid) if r.peer.uid is not None else None,
                cmdline=_text(r.peer.cmdline), note=_text(r.note), granted=r.granted,
                expires=None if r.expires is None else now.to_wall(r.expires),
            )
            for r in page
        ]
        return p.StatusReply(id=req.id, summary=summary, leases=leases, more=len(chosen) > len(page))

    # -------------------------------------------------------- events

    def identified(self, session: Session, peer: Peer) -> list[Change]:
        """The session's /proc identity was read: give it to the leases granted before."""
        session.peer = peer
        session.identified = True
        changes: list[Change] = []
        for record in session.unidentified:
            if self.table.get(record.token) is record and record.peer.pid == peer.pid:
                record.peer = peer
                changes.append(Identified(record))
        session.unidentified.clear()
        return changes

    def closed(self, session: Session) -> list[Change]:
        """The connection closed: every lease bound to it ends."""
        session.unidentified.clear()
        if session.admitted:
            session.admitted = False
            uid = session.peer.uid
            left = self._conns_by_uid.get(uid, 1) - 1
            if left > 0:
                self._conns_by_uid[uid] = left
            else:
                self._conns_by_uid.pop(uid, None)
        return [LeaseEnded(r) for r in self.table.drop_connection(session.id)]

    def expire(self, now: Instant, owner_alive: Callable[[Peer], bool]) -> list[Change]:
        """End the unbound leases whose time is up (orphans of live owners get more)."""
        return [LeaseEnded(r) for r in self.table.expire(now.mono, owner_alive)]

    def restore(self, records: Iterable[LeaseRecord], now: Instant, detached: set[str]) -> list[LeaseRecord]:
        """Take back a previous run's leases; returns those that could not be restored."""
        return self.table.restore(records, now.mono, detached=detached)


__all__ = [
    "BROKER_NAME", "BrokerCore", "Change", "ExpiryChanged", "Identified", "LeaseEnded", "NewLease",
    "Outcome", "Session", "decode_line",
]
