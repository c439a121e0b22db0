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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from .errors import StartupError
from .leases import LeaseRecord, Peer


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


class _End(msgspec.Struct, tag="end"):
    token: str


class _Expiry(msgspec.Struct, tag="expiry"):
    """The lease's expiry changed; null while it is bound to a connection."""

    token: str
    expires: float | None


_Entry = _Grant | _End | _Expiry
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Entry)


def _grant_entry(record: LeaseRecord) -> _Grant:
    peer = record.peer
    return _Grant(
        token=record.token, start=record.start, count=record.count, ttl=record.ttl,
        granted=record.granted, expires=record.expires, pid=peer.pid, uid=peer.uid,
        gid=peer.gid, cmdline=peer.cmdline, started=peer.started, note=record.note,
    )


@dataclass(slots=True)
class Loaded:
    """What :meth:`Journal.open` read back."""

    records: list[LeaseRecord]
    bad_lines: int
    """Lines that did not decode (a torn write, corruption); skipped."""


class Journal:
    """Append-only lease journal at ``path``, exclusively locked for one broker.

    The lock (``path + ".lock"``, flock) makes a second broker on the same
    state fail fast with :class:`StartupError` instead of corrupting it.
    """

    def __init__(self, path: str, *, compact_slack: int = 1000) -> None:
        self.path = path
        self._compact_slack = compact_slack
        self._fd = -1
        self._lock_fd = -1
        self._records_written = 0
        self._torn = False
        """A write failed part-way: the file may end in half a line."""

    def open(self) -> Loaded:
        """Lock the state, read what is there and get ready to append."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartupError(f"cannot open state {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise StartupError(
                f"state file {self.path} is in use by another portlease broker; "
                "stop it first or give this one another --state"
            ) from None
        loaded = self._read()
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        self._records_written = len(loaded.records) + loaded.bad_lines
        return loaded

    def _read(self) -> Loaded:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return Loaded([], 0)
        except OSError as exc:
            raise StartupError(f"cannot read state {self.path}: {exc.strerror}") from None
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
            else:
                grant = live.get(entry.token)
                if grant is not None:
                    grant.expires = entry.expires
        records = [
            LeaseRecord(
                token=g.token, start=g.start, count=g.count, ttl=g.ttl, granted=g.granted,
                expires=g.expires, note=g.note,
                peer=Peer(pid=g.pid, uid=g.uid, gid=g.gid, cmdline=g.cmdline, started=g.started),
            )
            for g in live.values()
            if g.count >= 1 and g.start > 0 and g.start + g.count <= 65536 and g.ttl > 0
        ]
        bad += len(live) - len(records)
        return Loaded(records, bad)

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

    def granted(self, record: LeaseRecord) -> None:
        self._append(_grant_entry(record))

    def ended(self, record: LeaseRecord) -> None:
        self._append(_End(record.token))

    def expiry_changed(self, record: LeaseRecord) -> None:
        self._append(_Expiry(record.token, record.expires))

    def needs_compaction(self, live: int) -> bool:
        return self._records_written > 2 * live + self._compact_slack

    def compact(self, records: Iterable[LeaseRecord]) -> None:
        """Replace the journal with a snapshot of ``records`` (fsynced, then renamed)."""
        tmp = self.path + ".tmp"
        body = b"".join(_encoder.encode(_grant_entry(r)) + b"\n" for r in records)
        # Appends go on through this same fd after the rename, so there is no
        # moment (or failed open) that leaves them going to the replaced file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
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
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = -1
