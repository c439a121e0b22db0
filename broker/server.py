"""The trio shell around the lease table: sockets in, replies out.

Everything that decides anything lives in :mod:`.leases` and :mod:`.allocator`;
this module reads lines, calls the table, writes the journal before the reply
leaves, and ties leases to the life of their connection.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import logging
import os
import pwd
import resource
import secrets
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from portlease.client import protocol as p
from portlease.client.errors import Busy, LeaseError

from . import activation, kernel
from . import portalloc as pa
from .allocator import Allocator, BindCheck
from .config import Config, default_state_path
from .errors import ConfigError, StartupError
from .leases import LeaseRecord, LeaseTable, Limits, Peer
from .notify import Notifier
from .state import Journal

log = logging.getLogger("portlease.broker")

BROKER_NAME = "portlease/0.1.0"
TICK = 0.5  # seconds between expiry sweeps, STATUS updates and idle checks
PORTALLOC_REFRESH = 30.0  # seconds between pushes of our entries' expiry into the crate's table
FD_MARGIN = 64  # fds kept back from connections for the journal, logs, bind probes
LARGE_STATE = 4 << 20  # bytes of journal above which start-up asks systemd for more time
JOURNAL_RETRY = 30.0  # seconds between compaction attempts while the state file cannot be written


@dataclass(slots=True)
class Connection:
    id: int
    peer: Peer
    hello: bool = False
    cmdline_read: bool = False


def peer_of(sock: trio.socket.SocketType) -> Peer:
    """The connecting process's pid/uid/gid, as the kernel recorded them at connect()."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return Peer(pid=pid, uid=uid, gid=gid)
    except OSError:
        return Peer()


@functools.cache
def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "?"


def process_started(pid: int | None) -> str | None:
    """``"<boot id>:<start time>"`` of a live process, None if it is gone or unreadable.

    The start time (clock ticks after boot, field 22 of /proc/PID/stat) and the
    boot id together name one process for good, where a pid alone is reused.
    """
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = raw[raw.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None  # a zombie holds no sockets
    return f"{boot_id()}:{fields[19].decode()}"


def owner_alive(peer: Peer) -> bool:
    """Whether the very process that took a lease still runs."""
    return peer.started is not None and process_started(peer.pid) == peer.started


def read_cmdline(pid: int | None) -> str | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    return text or None


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def make_allocator(config: Config) -> Allocator:
    runs, warnings = kernel.excluded_runs(config.port_min, config.port_max)
    for w in warnings:
        log.warning("%s", w)
    return Allocator(config.port_min, config.port_max, runs)


def limits_of(config: Config) -> Limits:
    return Limits(
        max_ports_per_request=config.max_ports_per_request,
        max_ports_per_uid=config.max_ports_per_uid,
        max_leases_per_connection=config.max_leases_per_connection,
    )


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


# ---------------------------------------------------------------- listening socket


@dataclass(slots=True)
class Listening:
    sock: socket.socket
    path: str
    owned: bool
    """True when this broker created the socket file (and removes it on exit)."""
    lock_fd: int = -1


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_unix_socket(path: str, mode: int, group: str | None) -> Listening:
    """Create the listening socket at ``path``, safely replacing a stale one.

    A lock file next to the socket serialises brokers racing to start (two
    autostarting clients): the loser finds the lock held and stops with a clear
    message instead of stealing the path.
    """
    gid = -1
    if group is not None:
        try:
            import grp

            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"group {group!r} does not exist") from None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o750 if group else 0o700)
            if gid >= 0:
                os.chown(directory, -1, gid)
        except OSError as exc:
            raise StartupError(f"cannot create socket directory {directory}: {exc.strerror}") from None
    try:
        lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot create {path}.lock: {exc.strerror}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise StartupError(f"another portlease broker is serving on {path}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            os.close(lock_fd)
            raise StartupError(f"{path} exists and is not a socket; not replacing it")
        if _answers(path):
            os.close(lock_fd)
            raise StartupError(f"another broker is already serving on {path}")
        log.info("removing stale socket %s (nothing answers on it)", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window where the socket is wider than asked
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        os.close(lock_fd)
        raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if gid >= 0:
        os.chown(path, -1, gid)
    sock.listen(socket.SOMAXCONN)
    return Listening(sock=sock, path=path, owned=True, lock_fd=lock_fd)


# ---------------------------------------------------------------- the broker


@dataclass
class Broker:
    """One broker: a lease table, its journal, and the connections that hold leases."""

    config: Config
    journal: Journal
    notifier: Notifier
    config_loader: Callable[[], Config] | None = None
    """Re-reads the configuration on SIGHUP; None when there is no file to re-read."""
    bind_ok: BindCheck = kernel.bind_ok
    clock: Callable[[], float] = time.time
    max_connections: int = 1 << 20
    table: LeaseTable = field(init=False)
    connections: dict[int, Connection] = field(default_factory=dict)
    _next_id: int = 0
    _stopping: bool = False
    _idle_since: float = 0.0
    _last_status: str = ""
    _cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    _compact_after: float = 0.0
    portalloc: pa.AsyncPortallocTable | None = field(init=False, default=None)
    _foreign: list[tuple[int, int]] = field(default_factory=list)
    _refused: int = 0
    _refusal_logged: float = -1e9
    _portalloc_dirty: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.table = LeaseTable(make_allocator(self.config), limits_of(self.config))
        if self.config.portalloc_dir:
            self.portalloc = pa.AsyncPortallocTable(pa.PortallocTable(self.config.portalloc_dir))

    # -------------------------------------------------------- start

    def restore(self) -> None:
        """Read the journal and keep its leases as orphans awaiting reclaim."""
        loaded = self.journal.open()
        if loaded.bad_lines:
            log.warning(
                "state %s: skipped %d unreadable lines (a torn write or corruption); "
                "kept %d leases", self.journal.path, loaded.bad_lines, len(loaded.records),
            )
        skipped = self.table.restore(loaded.records, self.clock())
        for record in skipped:
            log.warning(
                "state: not restoring lease of ports %d-%d (outside the range or overlapping "
                "another)", record.start, record.start + record.count - 1,
            )
        if loaded.records:
            log.info("restored %d leases as orphans awaiting reclaim", len(self.table))
        # A snapshot now drops what the restore skipped and starts a short journal.
        try:
            self.journal.compact(self.table)
        except OSError as exc:
            log.error("state %s: cannot compact (%s); appending to it as it is",
                      self.journal.path, exc.strerror or exc)

    # -------------------------------------------------------- serving

    async def serve(
        self, listener: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        tsock = trio.socket.from_stdlib_socket(listener)
        listeners = [trio.SocketListener(tsock)]
        self._idle_since = self.clock()
        with self._cancel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals)
                nursery.start_soon(self._tick)
                nursery.start_soon(self._watchdog)
                if self.portalloc is not None:
                    # Publish restored leases before the first grant, then keep them fresh.
                    await self._sync_portalloc()
                    nursery.start_soon(self._portalloc_refresher)
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                self.notifier.ready()
                self._update_status(force=True)
                log.info("serving; range %d-%d", self.config.port_min, self.config.port_max)
                task_status.started()
        self.shutdown()

    def stop(self) -> None:
        """Stop serving; leases stay in the journal for reclaim after restart."""
        self._stopping = True
        self._cancel.cancel()

    def shutdown(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self.journal.compact(self.table)
        self.journal.close()
        self.notifier.close()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload()
                    continue
                log.info("%s: stopping; leases are kept for reclaim", signal.Signals(signum).name)
                self.notifier.stopping()
                self.stop()
                return

    def reload(self) -> None:
        """Re-read the config file: range, TTL and limits change, leases stay."""
        if self.config_loader is None:
            log.info("SIGHUP: no config file to reload")
            return
        self.notifier.reloading()
        try:
            new = self.config_loader()
        except ConfigError as exc:
            log.error("reload failed, keeping the old settings: %s", exc)
            self.notifier.ready()
            return
        # Socket, state, group and the portalloc directory are fixed for the life
        # of the process: changing them under live connections has no safe meaning.
        for key in ("socket", "state", "group", "portalloc_dir", "socket_mode"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: %s changes only at restart; keeping %r", key,
                            getattr(self.config, key))
                setattr(new, key, getattr(self.config, key))
        if (new.port_min, new.port_max) != (self.config.port_min, self.config.port_max):
            allocator = make_allocator(new)
            for start, count in self._foreign:
                allocator.hold(start, count)
            self.table.rebind_allocator(allocator)
        self.table.limits = limits_of(new)
        self.config = new
        log.info("reloaded: range %d-%d, ttl %g s", new.port_min, new.port_max, new.ttl)
        self.notifier.ready()
        self._update_status(force=True)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        # From inside the event loop on purpose: a wedged loop stops the pings.
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    async def _tick(self) -> None:
        while True:
            await trio.sleep(TICK)
            now = self.clock()
            for record in self.table.expire(now, owner_alive):
                log.info("lease of ports %s expired", _span(record))
                self._ended(record)
            if self.journal.needs_compaction(len(self.table)) and now >= self._compact_after:
                try:
                    self.journal.compact(self.table)
                except OSError as exc:
                    log.error("state %s: cannot compact (%s); trying again in %g s",
                              self.journal.path, exc.strerror or exc, JOURNAL_RETRY)
                    self._compact_after = now + JOURNAL_RETRY
            self._update_status()
            self._flush_refusals()
            if self.connections or len(self.table):
                self._idle_since = now
            elif self.config.idle_exit and now - self._idle_since >= self.config.idle_exit:
                log.info("idle for %g s with no lease: exiting", self.config.idle_exit)
                self.stop()

    def status_text(self) -> str:
        a = self.table.allocator
        return (
            f"{len(self.table)} leases, {self.table.ports_held} ports held, "
            f"{len(self.connections)} clients, {a.free_count} free, "
            f"largest free run {a.largest_free_run}"
        )

    def _update_status(self, *, force: bool = False) -> None:
        if not self.notifier.enabled:
            return
        text = self.status_text()
        if force or text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    # -------------------------------------------------------- connections

    async def _handle(self, stream: trio.SocketStream) -> None:
        self._next_id += 1
        conn = Connection(id=self._next_id, peer=peer_of(stream.socket))
        self.connections[conn.id] = conn
        try:
            if len(self.connections) > self.max_connections:
                self._log_refusal()
                busy = p.Error(id=None, code=p.ErrorCode.BUSY, message="too many connections")
                await stream.send_all(p.encode(busy))
                return
            await self._converse(stream, conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # One connection's fault must never end the server.
            log.exception("connection %d failed", conn.id)
        finally:
            del self.connections[conn.id]
            if not self._stopping:
                for record in self.table.drop_connection(conn.id):
                    self._ended(record)
            with contextlib.suppress(Exception):
                await stream.aclose()

    def _log_refusal(self) -> None:
        """Log refused connections at most once a second, with a count: a flood
        of clients must not become a flood of log lines."""
        self._refused += 1
        self._flush_refusals()

    def _flush_refusals(self) -> None:
        now = time.monotonic()
        if self._refused and now - self._refusal_logged >= 1.0:
            log.warning(
                "refused %d connection(s) with `busy`: %d open, the limit (RLIMIT_NOFILE)",
                self._refused, len(self.connections) - 1,
            )
            self._refused = 0
            self._refusal_logged = now

    async def _converse(self, stream: trio.SocketStream, conn: Connection) -> None:
        buf = bytearray()
        scanned = 0
        while True:
            data = await stream.receive_some(p.MAX_LINE + 1)
            if not data:
                return
            buf += data
            out: list[bytes] = []
            while True:
                nl = buf.find(b"\n", scanned)
                if nl < 0:
                    scanned = len(buf)
                    break
                if nl > p.MAX_LINE:
                    break
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                scanned = 0
                if line.strip():
                    out.append(p.encode(await self.dispatch(conn, line)))
            if len(buf) > p.MAX_LINE:
                out.append(p.encode(p.Error(
                    id=None, code=p.ErrorCode.LINE_TOO_LONG,
                    message=f"line longer than {p.MAX_LINE} bytes; closing the connection",
                )))
                await stream.send_all(b"".join(out))
                return
            if out:
                await stream.send_all(b"".join(out))

    async def dispatch(self, conn: Connection, line: bytes) -> p.Reply:
        """Carry out one request line and return its reply; never raises."""
        try:
            request = p.decode_request(line)
        except Exception as exc:
            return p.error_for_bad_line(line, exc)
        try:
            if self.portalloc is not None and isinstance(request, p.Lease) and conn.hello:
                return await self._lease_shared(conn, request)
            return self._carry_out(conn, request)
        except LeaseError as exc:
            return p.Error(id=request.id, code=exc.code, message=exc.message, largest=exc.largest)
        except Exception:
            log.exception("request %r failed", request)
            return p.Error(id=request.id, code=p.ErrorCode.INTERNAL, message="internal error")

    def _carry_out(self, conn: Connection, req: p.AnyRequest) -> p.Reply:
        if isinstance(req, p.Hello):
            if req.version != p.PROTOCOL_VERSION:
                return p.Error(
                    id=req.id, code=p.ErrorCode.VERSION,
                    message=f"protocol version {req.version} is not spoken here; "
                    f"this broker speaks version {p.PROTOCOL_VERSION}",
                )
            conn.hello = True
            return p.Welcome(id=req.id, version=p.PROTOCOL_VERSION, broker=BROKER_NAME, pid=os.getpid())
        if not conn.hello:
            return p.Error(
                id=req.id, code=p.ErrorCode.HELLO_REQUIRED,
                message=f'send {{"op":"hello","id":0,"version":{p.PROTOCOL_VERSION}}} first',
            )
        now = self.clock()
        table = self.table
        if isinstance(req, p.Lease):
            return self._granted(req, self._grant(conn, req))
        if isinstance(req, p.Release):
            record = table.release(req.token)
            self._ended(record)
            return p.Released(id=req.id, ports=record.ports)
        if isinstance(req, p.Renew):
            record = table.renew(req.token, now)
            if record.expires is not None:
                self._record(self.journal.expiry_changed, record)
            return p.Renewed(id=req.id, ports=record.ports, expires=record.expires)
        if isinstance(req, p.Detach):
            record = table.detach(req.token, now)
            self._record(self.journal.expiry_changed, record)
            assert record.expires is not None
            return p.Detached(id=req.id, ports=record.ports, expires=record.expires)
        if isinstance(req, p.Reclaim):
            record = table.reclaim(req.token, conn.id, self._identify(conn))
            self._record(self.journal.expiry_changed, record)
            return p.Reclaimed(id=req.id, ports=record.ports)
        if isinstance(req, p.Status):
            return self._status(req)
        assert isinstance(req, p.Ping)
        return p.Pong(id=req.id)

    @staticmethod
    def _identify(conn: Connection) -> Peer:
        """The peer with its command line and start time, read from /proc once per connection."""
        if not conn.cmdline_read:
            conn.cmdline_read = True
            conn.peer = Peer(
                pid=conn.peer.pid, uid=conn.peer.uid, gid=conn.peer.gid,
                cmdline=read_cmdline(conn.peer.pid), started=process_started(conn.peer.pid),
            )
        return conn.peer

    def _grant(self, conn: Connection, req: p.Lease) -> LeaseRecord:
        self._identify(conn)
        try:
            record = self.table.grant(
                token=secrets.token_hex(p.TOKEN_BYTES), count=req.count,
                ttl=req.ttl if req.ttl is not None else self.config.ttl, now=self.clock(),
                bind_ok=self.bind_ok, peer=conn.peer,
                connection=None if req.detach else conn.id, note=req.note,
            )
        except OSError as exc:
            # The bind check could not even open a probe socket (EMFILE, ENFILE,
            # ENOBUFS): nothing was granted, and the client may try again.
            log.error("cannot check ports: %s", exc)
            raise Busy(f"the broker cannot check ports right now ({exc.strerror})") from None
        # On disk before the reply leaves: a client never holds a lease we forgot.
        try:
            self.journal.granted(record)
        except OSError as exc:
            self.table.release(record.token)
            log.error("cannot write the state journal %s: %s", self.journal.path, exc)
            raise Busy(f"the broker cannot record leases right now ({exc.strerror})") from None
        return record

    def _record(self, write: Callable[[LeaseRecord], None], record: LeaseRecord) -> None:
        """Journal a change already made to the table; a failed write is logged, not raised.

        A missing end or expiry errs on the safe side: after a restart the lease
        comes back as an orphan and expires within its TTL. Raising would end the
        connection's handler in its ``finally``, and with it the whole server.
        """
        try:
            write(record)
        except OSError as exc:
            log.error("cannot write the state journal %s: %s", self.journal.path, exc)

    def _ended(self, record: LeaseRecord) -> None:
        """A lease ended (released, expired, its connection closed): journal it and
        let the fedimint-portalloc table drop its entry soon."""
        self._record(self.journal.ended, record)
        self._portalloc_dirty.set()

    @staticmethod
    def _granted(req: p.Lease, record: LeaseRecord) -> p.Granted:
        return p.Granted(
            id=req.id, ports=record.ports, token=record.token, ttl=record.ttl,
            expires=record.expires,
        )

    # -------------------------------------------------------- fedimint-portalloc

    async def _lease_shared(self, conn: Connection, req: p.Lease) -> p.Reply:
        """Grant under the crate's lock: skip its live entries, publish ours in one hold."""
        assert self.portalloc is not None

        def choose(foreign: list[tuple[int, int]]) -> LeaseRecord:
            self._hold_foreign(foreign)
            return self._grant(conn, req)

        result = await self.portalloc.sync(self._portalloc_snapshot, choose)
        self._log_portalloc(result)
        assert result.chosen is not None  # choose() returns a record or raises
        return self._granted(req, result.chosen)

    def _portalloc_snapshot(self) -> dict[int, tuple[int, float | None]]:
        return pa.snapshot(self.table, self.clock())

    def _hold_foreign(self, spans: list[tuple[int, int]]) -> None:
        """Make the crate's live entries the allocator's foreign holds (replacing the last set)."""
        allocator = self.table.allocator
        for start, count in spans:
            allocator.hold(start, count)
        for start, count in self._foreign:
            allocator.unhold(start, count)
        self._foreign = list(spans)

    async def _sync_portalloc(self) -> None:
        assert self.portalloc is not None
        result: pa.SyncResult[LeaseRecord] = await self.portalloc.sync(self._portalloc_snapshot)
        if result.status == "ok":
            self._hold_foreign(list(result.foreign))
        self._log_portalloc(result)

    def _log_portalloc(self, result: pa.SyncResult[LeaseRecord]) -> None:
        for problem in result.problems:
            log.warning("portalloc: %s", problem)
        if result.status == "skipped":
            log.warning(
                "portalloc: the lock on %s was busy for %.1f s; went on with bind checks alone",
                self.config.portalloc_dir, result.waited,
            )

    async def _portalloc_refresher(self) -> None:
        """Publish releases soon after they happen, and push our entries' expiry forward."""
        while True:
            with trio.move_on_after(PORTALLOC_REFRESH):
                await self._portalloc_dirty.wait()
            self._portalloc_dirty = trio.Event()
            await self._sync_portalloc()

    def _status(self, req: p.Status) -> p.StatusReply:
        a = self.table.allocator
        summary = p.Summary(
            range=(a.low, a.high), leases=len(self.table), ports_held=self.table.ports_held,
            ports_free=a.free_count, largest_free_run=a.largest_free_run,
            clients=len(self.connections), ttl=self.config.ttl,
        )
        leases = [
            p.LeaseInfo(
                ports=r.ports, state=r.state.value, pid=r.peer.pid, uid=r.peer.uid,
                gid=r.peer.gid, user=user_name(r.peer.uid) if r.peer.uid is not None else None,
                cmdline=r.peer.cmdline, note=r.note, granted=r.granted, expires=r.expires,
            )
            for r in sorted(self.table, key=lambda r: r.start)
        ]
        return p.StatusReply(id=req.id, summary=summary, leases=leases)


def _span(record: LeaseRecord) -> str:
    if record.count == 1:
        return str(record.start)
    return f"{record.start}-{record.start + record.count - 1}"


# ---------------------------------------------------------------- entry point


def open_listener(config: Config) -> Listening:
    """The socket to serve: inherited from systemd when activated, else bound here."""
    inherited = activation.inherited_listener()
    if inherited is not None:
        path = activation.socket_path(inherited)
        log.info("socket activation: serving the inherited socket %s", path)
        return Listening(sock=inherited, path=path, owned=False)
    if not config.socket:
        raise ConfigError("no socket path configured")
    return bind_unix_socket(config.socket, int(config.socket_mode, 8), config.group)


def tune_gc() -> None:
    """Fewer and cheaper garbage collections for a long-lived loop with many connections.

    With 10,000 connections a full collection walks every trio object and stalls
    all clients for 50-100 ms; at the default gen-0 threshold (700 allocations) a
    ``status`` of 10,000 leases set one off nearly every time (bench/load.py: another
    client's grant p99 93 ms while one client looped ``status``; 11 ms after this).
    Startup objects (imports, config) are frozen out of every later collection.
    """
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


def run(config: Config, *, reload: Callable[[], Config] | None = None) -> int:
    """Run a broker in the foreground until SIGTERM/SIGINT or idle exit; return the exit status."""
    soft = raise_fd_limit()
    notifier = Notifier()
    listening = open_listener(config)
    state_path = config.state or default_state_path(listening.path)
    broker = Broker(
        config=config, journal=Journal(state_path), notifier=notifier, config_loader=reload,
        max_connections=max(16, soft - FD_MARGIN),
    )
    try:
        with contextlib.suppress(OSError):
            if os.path.getsize(state_path) > LARGE_STATE:
                # Reading a big journal may outlast systemd's start timeout.
                notifier.extend_timeout(60)
        broker.restore()
        log.info("state %s, socket %s", state_path, listening.path)
        tune_gc()
        trio.run(functools.partial(broker.serve, listening.sock))
    finally:
        if listening.owned:
            with contextlib.suppress(OSError):
                os.unlink(listening.path)
            if listening.lock_fd >= 0:
                os.close(listening.lock_fd)
        listening.sock.close()
    return 0


__all__ = ["Broker", "bind_unix_socket", "run"]
