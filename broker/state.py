"""The lease journal: what the broker must remember across a crash or restart.

An append-only file of JSON lines, one per change (grant, end, new expiry),
written with one ``write(2)`` before the reply leaves, so the cost per
operation is O(1). When the file holds many more records than live leases, it
is compacted: a snapshot of the live leases is written to a temporary file and
renamed over the journal.

Why no fsync: the journal guards against the *broker* dying (crash, SIGKILL,
restart, upgrade). Data handed to ``write(2)`` is in the kernel's page cache and
survives the death of the process that wrote it. Only a kernel crash or power
loss loses it, and that also kills every client that held a lease, so the
leases it would have restored have no owner left to reclaim them. Skipping
fsync keeps a grant at microseconds instead of milliseconds. Compaction does
fsync the snapshot before the rename, since a torn snapshot would lose *all*
leases rather than the last few lines.

Reading is forgiving: a torn last line or any line that does not decode is
counted and skipped; what can be read is kept.

Times: a lease's expiry is kept on the monotonic clock (``mexp``) together with
the boot id, so that a broker restarted on the same boot restores exactly the
lifetime that was left, whatever the wall clock did meanwhile. The wall-clock
``expires`` is written too, for people reading the file and for a journal read
after a reboot (the monotonic clock restarts with the kernel), when the
lifetime left is taken from it, never more than one TTL. ``attached`` says
whether the lease was bound to a connection at its last change: only those
come back as orphans kept while their owner lives.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from portlease.client.protocol.errors import StartupError

from .allocator import PORTS
from .leases import Instant, LeaseRecord, Peer
from .safedir import check_directory, open_failure, open_file


class _Grant(msgspec.Struct, tag="grant", omit_defaults=True):
    token: str
    start: int
    count: int
    ttl: float
    granted: float
    expires: float | None = None
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    cmdline: str | None = None
    started: str | None = None
    note: str | None = None
    boot: str | None = None
    mexp: float | None = None
    since: float | None = None
    attached: bool = True


class _End(msgspec.Struct, tag="end"):
    token: str


class _Expiry(msgspec.Struct, tag="expiry", omit_defaults=True):
    """The lease's expiry changed; null while it is bound to a connection."""

    token: str
    expires: float | None
    mexp: float | None = None
    attached: bool = True


class _Identity(msgspec.Struct, tag="identity", omit_defaults=True):
    """Who holds the lease, read from /proc after the grant's reply left."""

    token: str
    cmdline: str | None = None
    started: str | None = None


_Entry = _Grant | _End | _Expiry | _Identity
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Entry)


def _attached(record: LeaseRecord) -> bool:
    """Whether the lease comes back as an orphan after a restart (see ``attached``)."""
    return record.connection is not None or record.orphaned


def _grant_entry(record: LeaseRecord, at: Instant, boot: str) -> _Grant:
    peer = record.peer
    return _Grant(
        token=record.token, start=record.start, count=record.count, ttl=record.ttl,
        granted=record.granted,
        expires=None if record.expires is None else at.to_wall(record.expires),
        pid=peer.pid, uid=peer.uid, gid=peer.gid, cmdline=peer.cmdline, started=peer.started,
        note=record.note, boot=boot, mexp=record.expires, since=record.since,
        attached=_attached(record),
    )


@dataclass(slots=True)
class Loaded:
    """What :meth:`Journal.open` read back."""

    records: list[LeaseRecord]
    bad_lines: int
    """Lines that did not decode (a torn write, corruption); skipped."""
    detached: set[str]
    """Tokens of the leases that were detached (not bound to a connection) at their last change."""


class Journal:
    """Append-only lease journal at ``path``, exclusively locked for one broker.

    The lock (``path + ".lock"``, flock) makes a second broker on the same
    state fail fast with :class:`StartupError` instead of corrupting it.
    """

    def __init__(self, path: str, *, boot: str = "", compact_slack: int = 1000) -> None:
        self.path = path
        self.boot = boot
        """This boot's id: monotonic times journaled under another boot mean nothing now."""
        self._compact_slack = compact_slack
        self._fd = -1
        self._lock_fd = -1
        self._records_written = 0
        self._torn = False
        """A write failed part-way: the file may end in half a line."""

    def open(self, at: Instant) -> Loaded:
        """Lock the state, read what is there (times brought onto ``at``'s clocks)
        and get ready to append."""
        directory = os.path.dirname(os.path.abspath(self.path))
        check_directory(directory, create_mode=0o700)
        try:
            self._lock_fd = open_file(self.path + ".lock", os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise StartupError(f"cannot open state lock {self.path}.lock: {open_failure(exc)}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise StartupError(
                f"state file {self.path} is in use by another portlease broker; "
                "stop it first or give this one another --state"
            ) from None
        loaded = self._read(at)
        try:
            self._fd = open_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            raise StartupError(f"cannot open state {self.path}: {open_failure(exc)}") from None
        self._records_written = len(loaded.records) + loaded.bad_lines
        return loaded

    def _read(self, at: Instant) -> Loaded:
        try:
            with os.fdopen(open_file(self.path, os.O_RDONLY), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return Loaded([], 0, set())
        except OSError as exc:
            raise StartupError(f"cannot read state {self.path}: {open_failure(exc)}") from None
        live: dict[str, _Grant] = {}
        bad = 0
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                entry = _decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                bad += 1
                continue
            if isinstance(entry, _Grant):
                live[entry.token] = entry
            elif isinstance(entry, _End):
                live.pop(entry.token, None)
            elif isinstance(entry, _Expiry):
                grant = live.get(entry.token)
                if grant is not None:
                    grant.expires, grant.mexp, grant.attached = entry.expires, entry.mexp, entry.attached
            else:
                grant = live.get(entry.token)
                if grant is not None:
                    grant.cmdline, grant.started = entry.cmdline, entry.started
        records = [
            LeaseRecord(
                token=g.token, start=g.start, count=g.count, ttl=g.ttl, granted=g.granted,
                expires=self._expiry_now(g, at), note=g.note,
                since=g.since if g.since is not None and g.boot == self.boot else at.mono,
                peer=Peer(pid=g.pid, uid=g.uid, gid=g.gid, cmdline=g.cmdline, started=g.started),
            )
            for g in live.values()
            if g.count >= 1 and g.start > 0 and g.start + g.count <= PORTS and g.ttl > 0
        ]
        bad += len(live) - len(records)
        detached = {g.token for g in live.values() if not g.attached}
        return Loaded(records, bad, detached)

    def _expiry_now(self, grant: _Grant, at: Instant) -> float | None:
        """The grant's expiry on this run's monotonic clock."""
        if grant.mexp is not None and grant.boot == self.boot:
            return grant.mexp
        if grant.expires is None:
            return None
        # Another boot (or an older journal): all we have is the wall clock, so
        # take what is left by it, but never more than one TTL.
        left = min(max(grant.expires - at.wall, 0.0), grant.ttl)
        return at.mono + left

    # ------------------------------------------------------------ appends

    def _append(self, entry: _Entry) -> None:
        """Append one line; raise OSError unless all of it was written."""
        data = _encoder.encode(entry) + b"\n"
        if self._torn:
            # End the half line a failed write left, so this one reads back.
            data = b"\n" + data
        self._torn = True
        written = os.write(self._fd, data)
        self._records_written += 1
        if written < len(data):  # a full disk: the kernel wrote what fitted
            raise OSError(errno.ENOSPC, f"short write to {self.path}")
        self._torn = False

    def granted(self, record: LeaseRecord, at: Instant) -> None:
        """Journal a new lease."""
        self._append(_grant_entry(record, at, self.boot))

    def ended(self, record: LeaseRecord) -> None:
        """Journal that a lease ended: released, expired or its connection closed."""
        self._append(_End(record.token))

    def expiry_changed(self, record: LeaseRecord, at: Instant) -> None:
        """Journal a lease's new expiry, and whether it is bound now."""
        expires = record.expires
        self._append(_Expiry(
            record.token, None if expires is None else at.to_wall(expires), expires,
            attached=_attached(record),
        ))

    def identified(self, record: LeaseRecord) -> None:
        """Journal the holder's command line and start time, read after the grant."""
        self._append(_Identity(record.token, record.peer.cmdline, record.peer.started))

    def needs_compaction(self, live: int) -> bool:
        """Whether the file holds enough dead records, against ``live`` leases, to rewrite it."""
        return self._records_written > 2 * live + self._compact_slack

    def compact(self, records: Iterable[LeaseRecord], at: Instant) -> None:
        """Replace the journal with a snapshot of ``records`` (fsynced, then renamed)."""
        tmp = self.path + ".tmp"
        body = b"".join(_encoder.encode(_grant_entry(r, at, self.boot)) + b"\n" for r in records)
        # Appends go on through this same fd after the rename, so there is no
        # moment (or failed open) that leaves them going to the replaced file.
        # A file left at the temporary name (a crash mid-compaction) is removed
        # first; O_EXCL | O_NOFOLLOW then refuse anything planted there since.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._torn = False
        self._records_written = body.count(b"\n")

    def close(self) -> None:
        """Close the journal and drop its lock."""
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = -1
