"""The broker's connection handler: what each connection and each request does to the leases.

What the broker *answers* is decided by :mod:`.core` (pure); which lease may do
what, by :mod:`.leases`. This module feeds them the time, fresh tokens and the
bind check (with the host-wide claims of :mod:`.claims`), writes their journal
changes before a reply leaves (rolling a grant back when the journal refuses
it), and ties leases to the life of their connection through
:mod:`.connections`. The service loop around it (signals, reload, systemd, the
metrics file) is :mod:`.service`; start-up is :mod:`.server`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from portlease.client import protocol as p
from portlease.client.host.procinfo import process_started, read_cmdline, user_name
from portlease.client.protocol.errors import LeaseError

from . import kernel
from . import portalloc as pa
from .allocator import Allocator, BindCheck
from .claims import Claims, FdStore, announce
from .config import Config
from .connections import Driver, Reply
from .core import (
    BrokerCore,
    Change,
    ExpiryChanged,
    Identified,
    LeaseEnded,
    NewLease,
    Outcome,
    Session,
    decode_line,
)
from .leases import Instant, LeaseRecord, LeaseTable, Limits
from .logs import set_level
from .metrics import Metrics, Snapshot
from .peers import holders_now, identify, owner_alive, peer_of
from .share import PortallocShare
from .state import Journal

log = logging.getLogger("portlease.broker")

JOURNAL_RETRY = 30.0
"""Seconds between compaction attempts while the state file cannot be written."""
WALL_JITTER = 0.01
"""Seconds the wall clock may seem to move against the monotonic one before the
broker follows it (reading the two clocks is not one instant)."""
LOG_EVERY = 1.0
"""Seconds between two log lines about the same kind of client fault or refusal."""
TOKEN_MISS_WARN = 100
"""Requests of one uid naming a token no lease has, per warning in the log (token guessing)."""
_TOKEN_OPS = frozenset({"release", "renew", "detach", "reclaim"})


def make_allocator(config: Config) -> tuple[Allocator, str | None]:
    """The allocator for ``config``'s range, and the sentence explaining what it never grants."""
    runs, warnings = kernel.excluded_runs(config.port_min, config.port_max, extra=config.exclude)
    for w in warnings:
        log.warning("%s", w)
    hint = kernel.range_hint(config.port_min, config.port_max)
    return Allocator(config.port_min, config.port_max, runs), hint


def limits_of(config: Config) -> Limits:
    return Limits(
        max_ports_per_request=config.max_ports_per_request,
        max_ports_per_uid=config.max_ports_per_uid,
        max_leases_per_connection=config.max_leases_per_connection,
        max_connections_per_uid=config.max_connections_per_uid,
    )


class _RateLimited:
    """A log line said at most once per LOG_EVERY seconds, with the count since."""

    def __init__(self, level: int, text: str) -> None:
        self.level, self.text = level, text
        self.count = 0
        self.last = -1e9
        self.detail = ""

    def note(self, detail: str = "") -> None:
        self.count += 1
        self.detail = detail
        self.flush()

    def flush(self) -> None:
        now = time.monotonic()
        if self.count and now - self.last >= LOG_EVERY:
            log.log(self.level, self.text, self.count, self.detail)
            self.count = 0
            self.last = now


@dataclass
class Broker:
    """One broker: the core, its journal, and the connections that hold leases."""

    config: Config
    journal: Journal
    bind_ok: BindCheck | None = None
    """The bind check; default: the kernel's, counted in the metrics."""
    host_claims: bool = True
    """Hold a host-wide claim per leased port (:mod:`.claims`), so that no other broker
    on the host grants it meanwhile; the claim is taken before ``bind_ok``."""
    fd_store: FdStore | None = None
    """systemd's file descriptor store: the claims of every lease are kept there too, so
    that they outlive a crash or a restart of this process (:mod:`.claims`)."""
    fd_store_capacity: int = 0
    """How many fds the store keeps for this service (``$FDSTORE``); claims past it are not stored."""
    stored_claims: dict[str, list[socket.socket]] = field(default_factory=dict)
    """The claims a predecessor stored, passed back by systemd on this start."""
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    max_connections: int = 1 << 20
    core: BrokerCore = field(init=False)
    metrics: Metrics = field(default_factory=Metrics)
    share: PortallocShare | None = field(init=False, default=None)
    driver: Driver | None = field(init=False, default=None)
    claims: Claims | None = field(init=False, default=None)
    _check: BindCheck = field(init=False, repr=False)
    _presence: socket.socket | None = field(init=False, default=None)
    _conn_inodes: dict[int, int] = field(default_factory=dict)
    """Connection id → the inode of our end of it."""
    stopping: bool = False
    """Set once the broker stops: connections closed from then on keep their leases for reclaim."""
    _idle_since: float = 0.0
    _wall_offset: float = 0.0
    _compact_after: float = 0.0
    _identify_soon: dict[int, Session] = field(default_factory=dict)
    """Sessions granted a detached lease, by id: /proc is read right after the reply leaves."""
    _identify_later: dict[int, Session] = field(default_factory=dict)
    """Sessions granted bound leases, by id: /proc is read at the next tick or ``status``, if still open."""
    _faults: _RateLimited = field(init=False)
    _refusals: _RateLimited = field(init=False)
    _journal_errors: _RateLimited = field(init=False)
    _portserver_refusals: _RateLimited = field(init=False)
    _token_misses: _RateLimited = field(init=False)

    def __post_init__(self) -> None:
        allocator, notice = make_allocator(self.config)
        check = self._check = self.bind_ok or self._kernel_bind_ok
        if self.host_claims:
            self.claims = Claims(store=self.fd_store, capacity=self.fd_store_capacity)
            check = self._claimed_bind_ok
        self.core = BrokerCore(
            table=LeaseTable(allocator, limits_of(self.config)), ttl=self.config.ttl,
            new_token=functools.partial(secrets.token_hex, p.TOKEN_BYTES),
            bind_ok=check, pid=os.getpid(), user_name=user_name,
            started_of=process_started,
            range_notice=notice, metrics_text=self.metrics_text,
        )
        if self.config.portalloc_dir:
            self.share = PortallocShare(
                self.config.portalloc_dir, snapshot=self._share_snapshot,
                allocator=lambda: self.core.table.allocator, log=log,
                memo=f"{self.journal.path}.portalloc",
            )
        self._faults = _RateLimited(logging.ERROR, "%d request(s) met a broker bug, the last: %s")
        self._refusals = _RateLimited(logging.WARNING, "refused %d connection(s): %s")
        self._journal_errors = _RateLimited(
            logging.ERROR, f"cannot write the state journal {self.journal.path}: %d time(s), last: %s"
        )
        self._portserver_refusals = _RateLimited(
            logging.WARNING, "portserver: refused %d request(s) (empty reply), the last: %s"
        )
        self._claims_full = _RateLimited(logging.ERROR, "refused %d grant(s): %s")
        self._token_misses = _RateLimited(
            logging.WARNING, f"token guessing? %d time(s) {TOKEN_MISS_WARN} more requests of one uid "
            "named a token no lease has; the last: %s"
        )

    @property
    def table(self) -> LeaseTable:
        return self.core.table

    @property
    def clients(self) -> int:
        """Open client connections (0 before :meth:`serve`)."""
        return len(self.driver) if self.driver is not None else 0

    def now(self) -> Instant:
        mono, wall = self.clock(), self.wall_clock()
        offset = wall - mono
        # Kept until the wall clock moves by more than a little: a step (NTP) is
        # followed, the few microseconds between reading two clocks are not.
        if abs(offset - self._wall_offset) > WALL_JITTER:
            self._wall_offset = offset
        return Instant(mono, wall, self._wall_offset)

    def _kernel_bind_ok(self, port: int) -> bool:
        failure = kernel.bind_failure(port)
        if failure is None:
            return True
        self.metrics.bind_check_failed(*failure)
        return False

    def _claimed_bind_ok(self, port: int) -> bool:
        """The host-wide claim first (another broker's lease is "in use"), then the bind check.

        A claim taken here stays pending until :meth:`_finish` keeps it for a
        lease or releases it; one whose port then fails the bind check goes back at once.
        """
        claims = self.claims
        assert claims is not None
        try:
            if not claims.take_pending(port):
                return False
            ok = self._check(port)
        except OSError as exc:
            if not kernel.out_of_fds(exc):
                raise
            # The claims hold most of the fds, so say so, whichever socket failed.
            exc = claims.fds_exhausted(exc)
            self._claims_full.note(str(exc.strerror))
            raise exc from None
        if not ok:
            claims.release((port,))
        return ok

    def _reclaim_claims(self) -> None:
        """Take the claims of restored leases; one whose port another holder claims now is dropped.

        While no broker held them (between this broker's death and now) another
        broker may have granted those ports: its live lease wins, and the
        restored one ends here (its owner's reclaim then says it is gone).
        """
        if self.claims is None:
            return
        self.claims.adopt(self.stored_claims)
        self.stored_claims = {}
        for record in list(self.table):
            try:
                taken_by_other = self.claims.take_run(record.start, record.count)
            except OSError as exc:
                log.error("state: cannot claim ports %s host-wide (%s); kept without a claim",
                          _span(record), exc.strerror or exc)
                continue
            if taken_by_other is not None:
                log.warning("state: not restoring lease of ports %s: port %d is claimed by "
                            "another broker on this host now", _span(record), taken_by_other)
                self.table.release(record.token)
        self.claims.restored((record.start, record.count) for record in self.table)

    # -------------------------------------------------------- start

    def restore(self) -> None:
        """Read the journal and take back its leases (bound ones as orphans awaiting reclaim)."""
        now = self.now()
        loaded = self.journal.open(now)
        if loaded.bad_lines:
            log.warning(
                "state %s: skipped %d unreadable lines (a torn write or corruption); "
                "kept %d leases", self.journal.path, loaded.bad_lines, len(loaded.records),
            )
        for record in self.core.restore(loaded.records, now, loaded.detached):
            log.warning(
                "state: not restoring lease of ports %s (outside the range or overlapping "
                "another)", _span(record),
            )
        self._reclaim_claims()
        if loaded.records:
            log.info("restored %d leases (%d detached); bound ones await reclaim",
                     len(self.table), len(loaded.detached))
        # A snapshot now drops what the restore skipped and starts a short journal.
        try:
            self.journal.compact(self.table, now)
        except OSError as exc:
            log.error("state %s: cannot compact (%s); appending to it as it is",
                      self.journal.path, exc.strerror or exc)

    def shutdown(self) -> None:
        """Leave the journal as a snapshot of the leases (for the next run) and close it;
        the service's ``serve`` ends with this."""
        self.stopping = True
        self._identify_pending()
        with contextlib.suppress(OSError):
            self.journal.compact(self.table, self.now())
        self.journal.close()
        # The leases stay in the journal; their claims go with this process, but
        # for those kept in systemd's fd store.
        if self.claims is not None:
            self.claims.close()
        if self._presence is not None:
            self._presence.close()
            self._presence = None

    # -------------------------------------------------------- connections (connections.Handler)

    def _session_for(self, conn_id: int, sock: socket.socket) -> Session:
        # Our end's inode: `status` finds who holds the other end once the
        # process that connected is gone (see _show_holders_now).
        self._conn_inodes[conn_id] = os.fstat(sock.fileno()).st_ino
        return Session(id=conn_id, peer=peer_of(sock))

    def opened(self, session: Session) -> bytes | None:
        """Admit a connection, or the error line that refuses it (the core decides)."""
        assert self.driver is not None
        refusal = self.core.opened(session, len(self.driver), self.max_connections)
        if refusal is None:
            return None
        why = (f"{len(self.driver)} open, the limit (RLIMIT_NOFILE)" if refusal.code is p.ErrorCode.BUSY
               else f"uid {session.peer.uid} is at its limit (max_connections_per_uid)")
        self._refusals.note(why)
        self.metrics.refused(refusal.code.value)
        return p.encode(refusal)

    def closed(self, session: Session) -> None:
        """A connection is gone: its count drops and its bound leases end."""
        self._conn_inodes.pop(session.id, None)
        if not self.stopping:
            self._apply(self.core.closed(session), self.now())

    async def portserver_lease(self, session: Session, note: str) -> p.Reply:
        """One port for a portpicker request: the same path as a ``lease`` on the main socket."""
        request = p.Lease(id=0, count=1, note=note)
        if self.share is not None:
            return await self.share.around_grant(functools.partial(self._reply, session, request))
        return self._reply(session, request)

    def portserver_adopt(self, session: Session, record: LeaseRecord) -> bool:
        """Bind a restored portpicker lease to its process's stand-in connection again."""
        if self.table.get(record.token) is not record or not record.orphaned:
            return False
        try:
            self.table.reclaim(record.token, session.id)
        except LeaseError:
            return False
        self._apply([ExpiryChanged(record)], self.now())
        return True

    def portserver_refused(self, detail: str) -> None:
        self._portserver_refusals.note(detail)

    def request(self, session: Session, line: bytes) -> Reply:
        """The reply to one line, or (a lease while the portalloc share is on) a task that makes it."""
        request = decode_line(line)
        if (self.share is not None and session.hello and isinstance(request, p.Lease)
                and request.count <= self.table.limits.max_ports_per_request
                and self.table.ports_of_uid(session.peer.uid) + request.count
                <= self.table.limits.max_ports_per_uid):
            if not self.share.has_room(request.count):
                # Only a grant that needs a new block of the crate's table waits (for its lock).
                return functools.partial(self._shared_request, session, request)
            now = self.now()
            outcome = self.core.handle(session, request, now, self.clients)
            if isinstance(outcome.reply, p.Error) and outcome.reply.code is p.ErrorCode.EXHAUSTED:
                # The published blocks had room by count, but their ports failed the
                # bind check or are claimed by another broker on this host: wait for a
                # new block and try once more, rather than say exhausted while the
                # range has room.
                return functools.partial(self._shared_request, session, request, fresh=True)
            return p.encode(self._finish(session, outcome, now))
        return self._answer(session, request)

    def answer(self, session: Session, line: bytes) -> bytes:
        """Carry out one request line: the core decides, the journal records, then the reply."""
        return self._answer(session, decode_line(line))

    def _answer(self, session: Session, request: p.AnyRequest | Outcome) -> bytes:
        return p.encode(self._reply(session, request))

    def _reply(self, session: Session, request: p.AnyRequest | Outcome) -> p.Reply:
        if isinstance(request, p.Status):
            self._identify_pending()  # status shows every holder's command line
        now = self.now()
        if isinstance(request, Outcome):  # the line did not decode
            outcome = request
        else:
            outcome = self.core.handle(session, request, now, self.clients)
        reply = self._finish(session, outcome, now)
        if isinstance(reply, p.StatusReply):
            self._show_holders_now(reply)
        return reply

    def _show_holders_now(self, reply: p.StatusReply) -> None:
        """Name the process that holds each bound lease now, where the one that took it is gone.

        A child that inherited the connection (``portlease lease -- sh -c
        'server &'``) keeps the lease after the wrapper exits; the pid the kernel
        gave at connect() is then the wrapper's, long gone. Only for those leases,
        and only on ``status``: the other end of each such connection is looked up
        (socket diagnostics) and its holder found in /proc (one scan of every
        process's fds, which a broker that is neither root nor the holder's uid
        cannot read: the original pid is shown then).
        """
        bound = {r.start: r for r in self.table if r.connection is not None}
        stale: dict[int, list[p.LeaseInfo]] = {}
        alive: dict[int, bool] = {}
        for info in reply.leases:
            record = bound.get(info.ports[0])
            if record is None or record.connection is None:
                continue
            conn = record.connection
            if conn not in alive:
                alive[conn] = owner_alive(record.peer)
            if not alive[conn]:
                stale.setdefault(conn, []).append(info)
        ends = {conn: self._conn_inodes[conn] for conn in stale if conn in self._conn_inodes}
        if not ends:
            return
        for conn, pid in holders_now(ends).items():
            cmdline = read_cmdline(pid)
            if cmdline is not None and len(cmdline) > p.STATUS_TEXT_MAX:
                cmdline = cmdline[: p.STATUS_TEXT_MAX - 1] + "…"
            for info in stale[conn]:
                info.pid, info.cmdline = pid, cmdline

    async def _shared_request(self, session: Session, request: p.Lease, *, fresh: bool = False) -> bytes:
        share = self.share
        assert share is not None
        give_up = trio.current_time() + share.grant_wait
        while True:
            try:
                refusal = await share.make_room(request.count, fresh=fresh)
            except Exception as exc:  # the share must never end the connection driver
                self._faults.note(f"portalloc share: {exc!r}"[:300])
                refusal = "the fedimint-portalloc share failed; try again"
            if refusal is not None:
                self.metrics.refused(p.ErrorCode.BUSY.value)
                return p.encode(p.Error(id=request.id, code=p.ErrorCode.BUSY, message=refusal))
            now = self.now()
            outcome = self.core.handle(session, request, now, self.clients)
            # A new block whose ports another broker claims (or something binds) is
            # no room either: place the next one while blocks still fit.
            if (isinstance(outcome.reply, p.Error) and outcome.reply.code is p.ErrorCode.EXHAUSTED
                    and share.placed_last and trio.current_time() < give_up):
                fresh = True
                continue
            return p.encode(self._finish(session, outcome, now))

    def _finish(self, session: Session, outcome: Outcome, now: Instant) -> p.Reply:
        reply = outcome.reply
        if outcome.fault is not None:
            self._faults.note(outcome.fault)
        kept: list[tuple[int, int]] = []
        for change in outcome.changes:
            if isinstance(change, NewLease):
                try:
                    self.journal.granted(change.record, now)
                except OSError as exc:
                    self._journal_errors.note(str(exc.strerror or exc))
                    reply = self.core.roll_back(reply.id, change.record, str(exc.strerror or exc))
                    break
                kept.append((change.record.start, change.record.count))
                self.metrics.granted(change.record.count)
            else:
                self._apply([change], now)
        if self.claims is not None:
            # Claims of a run passed over, or of a grant rolled back, go back now.
            self.claims.settle(kept)
        if isinstance(reply, p.Error):
            self.metrics.refused(reply.code.value)
            if reply.code is p.ErrorCode.NOT_FOUND and outcome.op in _TOKEN_OPS:
                peer = session.peer
                misses = self.metrics.token_missed(outcome.op, peer.uid)
                if misses % TOKEN_MISS_WARN == 0:
                    self._token_misses.note(f"uid {peer.uid} (pid {peer.pid}), {misses} in all")
        elif isinstance(reply, p.Reclaimed):
            self.metrics.reclaimed()
        if session.unidentified and not session.identified:
            # Only the newest lease can change which queue is due: after an
            # earlier detached one the session is queued to be read this turn.
            detached = session.unidentified[-1].connection is None
            (self._identify_soon if detached else self._identify_later)[session.id] = session
        if log.isEnabledFor(logging.DEBUG):
            peer = session.peer
            log.debug("connection %d (pid %s uid %s): %s -> %s", session.id, peer.pid, peer.uid,
                      outcome.op, _describe(reply))
        return reply

    def _apply(self, changes: list[Change], now: Instant) -> None:
        """Journal changes already made to the table; a failed write is logged, not raised.

        A missing end or expiry errs on the safe side: after a restart the lease
        comes back and expires within its TTL (see leases.ORPHAN_KEEP_TTLS).
        """
        journal = self.journal
        for change in changes:
            try:
                if isinstance(change, LeaseEnded):
                    journal.ended(change.record)
                elif isinstance(change, ExpiryChanged):
                    journal.expiry_changed(change.record, now)
                elif isinstance(change, Identified):
                    journal.identified(change.record)
                else:
                    journal.granted(change.record, now)
            except OSError as exc:
                self._journal_errors.note(str(exc.strerror or exc))
            if isinstance(change, LeaseEnded):
                if self.claims is not None:
                    self.claims.release_run(change.record.start, change.record.count)
                self.metrics.lease_ended(now.mono - change.record.since)
                if self.share is not None:
                    self.share.lease_ended()

    def turn_done(self) -> None:
        """After replies are out: read /proc for sessions just granted a detached lease.

        The command line is for ``status`` only (the start time the orphan rule
        needs was read at the grant), so it stays off the grant's critical path.
        A detached lease's holder often exits at once (``portlease lease
        --detach``), so its command line is read right after the reply; for
        bound leases it waits for the next tick, by when a one-shot client has
        closed its connection and there is nothing left to read it for.
        """
        if self._identify_soon:
            sessions, self._identify_soon = self._identify_soon, {}
            self._identify(sessions.values())

    def _identify(self, sessions: Iterable[Session]) -> None:
        now = self.now()
        for session in sessions:
            if not session.identified and session.unidentified:
                self._apply(self.core.identified(session, identify(session.peer)), now)

    def _identify_pending(self) -> None:
        sessions = [*self._identify_soon.values(), *self._identify_later.values()]
        self._identify_soon, self._identify_later = {}, {}
        self._identify(sessions)

    def tick(self) -> bool:
        """Expire, compact, flush rate-limited logs; True once idle for ``idle_exit``."""
        self._identify_pending()
        now = self.now()
        ended = self.core.expire(now, owner_alive)
        for change in ended:
            log.info("lease of ports %s expired", _span(change.record))
            if change.record.orphaned:
                self.metrics.orphan_expired()
        self._apply(ended, now)
        if self.claims is not None:
            self.claims.retry()
        if self.journal.needs_compaction(len(self.table)) and now.mono >= self._compact_after:
            try:
                self.journal.compact(self.table, now)
            except OSError as exc:
                log.error("state %s: cannot compact (%s); trying again in %g s",
                          self.journal.path, exc.strerror or exc, JOURNAL_RETRY)
                self._compact_after = now.mono + JOURNAL_RETRY
        for limited in (self._faults, self._refusals, self._journal_errors, self._claims_full,
                        self._portserver_refusals, self._token_misses):
            limited.flush()
        if self.clients or len(self.table):
            self._idle_since = now.mono
            return False
        return bool(self.config.idle_exit) and now.mono - self._idle_since >= self.config.idle_exit

    def start_serving(self, listener: socket.socket) -> Driver:
        """The connection driver for ``listener``, and this broker's presence on the host."""
        self.driver = Driver(listener, self, self._session_for)
        self._idle_since = self.clock()
        self._presence = announce(os.geteuid(), os.getpid())
        return self.driver

    def apply_config(self, new: Config) -> None:
        """Take a reloaded configuration: range, exclusions, TTL, limits and log level; leases stay."""
        old = self.config
        if (new.port_min, new.port_max, new.exclude) != (old.port_min, old.port_max, old.exclude):
            allocator, self.core.range_notice = make_allocator(new)
            if self.share is not None:
                self.share.reapply(allocator)
            self.table.rebind_allocator(allocator)
        self.table.limits = limits_of(new)
        self.core.ttl = new.ttl
        if new.log_level != old.log_level:
            set_level(new.log_level)
        self.config = new

    def status_text(self) -> str:
        """The one-line summary sent to systemd as STATUS."""
        a = self.table.allocator
        return (
            f"{_n(len(self.table), 'lease')}, {self.table.ports_held} ports held, "
            f"{_n(self.clients, 'client')}, {a.free_count} free, largest free run {a.largest_free_run}"
        )

    def metrics_text(self, *, squatted: int | None = None, openmetrics: bool = True) -> str:
        """The metrics now: OpenMetrics text, or the classic Prometheus format."""
        a = self.table.allocator
        by_state: dict[str, int] = {}
        for record in self.table:
            by_state[record.state.value] = by_state.get(record.state.value, 0) + 1
        snapshot = Snapshot(
            ports_held=self.table.ports_held, ports_free=a.free_count,
            ports_quarantined=a.quarantined_count, ports_excluded=a.excluded_count,
            largest_free_run=a.largest_free_run, leases=by_state,
            clients=self.clients,
            squatted_ports=squatted, range_low=a.low, range_high=a.high,
        )
        return self.metrics.render(snapshot, openmetrics=openmetrics)

    def _share_snapshot(self) -> dict[int, tuple[int, float | None]]:
        return pa.snapshot(self.table, self.clock())


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _describe(reply: p.Reply) -> str:
    if isinstance(reply, p.Error):
        return f"error {reply.code.value}: {reply.message}"
    ports = getattr(reply, "ports", None)
    if ports:
        return f"{type(reply).__name__.lower()} ports {_span_ports(ports)}"
    return type(reply).__name__.lower()


def _span_ports(ports: list[int]) -> str:
    return str(ports[0]) if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"


def _span(record: LeaseRecord) -> str:
    return _span_ports(record.ports)


__all__ = ["Broker", "limits_of", "make_allocator"]
