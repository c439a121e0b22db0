"""The fedimint-portalloc directory's files: lock, read, write. Blocking, bounded, hostile-safe.

The directory is group-writable by design (every runner user's crate calls write
there), so every member can put anything at any name in it: a FIFO, a symlink to a
file only the broker may read, a hard link, a 1 GB sparse file. Every file there is
therefore opened relative to a directory fd with ``O_NOFOLLOW | O_NONBLOCK |
O_CLOEXEC`` (a symlink fails, a FIFO opens at once instead of waiting for a
writer), checked with ``fstat`` after opening (a regular file with one link, not
larger than :data:`~portlease.broker.portalloc.MAX_TABLE_BYTES`, or it is not
read), and files the broker creates take their mode from the directory alone,
never from what a path points to. The temporary name is unlinked, then created
``O_EXCL``, and must be a regular file of the broker's own after opening. The
lock is taken with non-blocking ``flock`` attempts until a deadline, so nothing
here waits for another process for longer than ``lock_timeout``.

Called from worker threads by :class:`portlease.broker.share.PortallocShare`;
one exchange at a time (a mutex, itself taken with a timeout).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from . import portalloc as pa

FileId = tuple[int, int, int, int, int]
"""(device, inode, size, mtime in ns, mode) of the table's directory entry."""

_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Unusable(Exception):
    """A file in the directory is not what it must be (the message says what)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """The table as read (with or without the lock)."""

    parsed: pa.Parsed
    missing: bool
    """No file at the table's name: the crate reads that as empty."""
    fid: FileId | None


@dataclass(frozen=True, slots=True)
class Exchanged:
    """What one :meth:`ShareDir.exchange` did."""

    status: Literal["ok", "busy", "error"]
    """ok: read, decided, written if needed, all under the lock; busy: the lock (or
    another exchange) was not had within the timeout, nothing read or written; error:
    an OS error or an unusable file, ``problems`` says which."""
    plan: pa.Plan | None
    wrote: bool
    waited: float
    problems: tuple[str, ...] = ()


def file_mode(dir_mode: int) -> int:
    """The mode of files the broker creates: the directory's read/write bits, at least 0600.

    A group-shared 2770 directory gives 0660, so a crate caller running as another
    member can still open ``lock`` read-write and replace the table.
    """
    return (dir_mode & 0o666) | 0o600


def _identity(st: os.stat_result) -> FileId:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


class ShareDir:
    """The crate's directory, from one process, one exchange at a time."""

    def __init__(self, directory: str, *, lock_timeout: float = 1.0, memo: str | None = None) -> None:
        self.directory = directory
        self.lock_timeout = lock_timeout
        self.memo = memo
        """A file of the broker's own (beside its journal) naming the blocks it wrote, so a
        restarted broker knows its entries from everyone else's."""
        self._mutex = threading.Lock()
        self._seen: tuple[FileId, pa.Parsed] | None = None
        self.euid = os.geteuid()

    # ---------------------------------------------------------------- entry points

    def identity(self) -> FileId | None:
        """The table's directory entry as it stands (never followed), or None if absent."""
        try:
            return _identity(os.stat(os.path.join(self.directory, pa.DATA_NAME),
                                     follow_symlinks=False))
        except FileNotFoundError:
            return None

    def read(self) -> Reading:
        """Read the table without the lock (for a check; a torn read only looks corrupt)."""
        dfd = self._open_dir()
        try:
            return self._read(dfd)
        finally:
            os.close(dfd)

    def exchange(self, decide: Callable[[pa.Parsed, float], pa.Plan]) -> Exchanged:
        """Lock, read, ``decide(parsed, now)``, write the plan's table if it changed, unlock.

        ``decide`` runs in this thread with the lock held and must be quick and pure.
        """
        t0 = time.monotonic()
        deadline = t0 + self.lock_timeout
        if not self._mutex.acquire(timeout=self.lock_timeout):
            return Exchanged("busy", None, False, time.monotonic() - t0,
                             ("an earlier exchange with the table has not finished",))
        try:
            return self._exchange(decide, deadline, t0)
        finally:
            self._mutex.release()

    def load_memo(self) -> dict[int, pa.Entry]:
        """The blocks a previous run of this broker wrote, from :attr:`memo` (empty if none)."""
        if not self.memo:
            return {}
        try:
            with open(self.memo, "rb") as f:
                doc = json.loads(f.read(1 << 20))
            if doc.get("directory") != os.path.abspath(self.directory):
                return {}
            return {int(b): pa.Entry(int(s), int(e)) for b, (s, e) in doc["blocks"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    # ---------------------------------------------------------------- internals

    def _open_dir(self) -> int:
        # The configured path itself is the administrator's; only names inside it are not.
        return os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _exchange(
        self, decide: Callable[[pa.Parsed, float], pa.Plan], deadline: float, t0: float,
    ) -> Exchanged:
        try:
            os.makedirs(self.directory, exist_ok=True)  # as the crate does (create_dir_all)
            dfd = self._open_dir()
        except OSError as exc:
            return Exchanged("error", None, False, time.monotonic() - t0,
                             (f"cannot open {self.directory}: {exc.strerror or exc}",))
        try:
            mode = file_mode(os.fstat(dfd).st_mode)
            try:
                lfd = self._open_lock(dfd, mode)
            except (OSError, Unusable) as exc:
                return Exchanged("error", None, False, time.monotonic() - t0,
                                 (f"{self.directory}/{pa.LOCK_NAME}: {_why(exc)}",))
            try:
                got = _lock(lfd, deadline)
                waited = time.monotonic() - t0
                if not got:
                    return Exchanged("busy", None, False, waited, (
                        f"{self.directory}/{pa.LOCK_NAME} held by another process for over "
                        f"{self.lock_timeout:g} s",))
                try:
                    reading = self._read(dfd)
                except OSError as exc:
                    # Unreadable is not corrupt: writing now could destroy others' entries.
                    return Exchanged("error", None, False, waited, (
                        f"cannot read {self.directory}/{pa.DATA_NAME}: {exc.strerror or exc}",))
                now = time.time()
                decided = decide(reading.parsed, now)
                problems = [*reading.parsed.problems, *decided.problems]
                if reading.missing:
                    # No file: the crate reads that as empty; create one only to publish.
                    changed = bool(decided.table.keys)
                    if decided.table.next is None:
                        decided.table.next = pa.LOW
                else:
                    changed = decided.changed or reading.parsed.repair
                if not changed:
                    return Exchanged("ok", decided, False, waited, tuple(problems))
                try:
                    self._save_memo(decided.ours)
                    self._write(dfd, pa.render(decided.table), mode)
                except (OSError, Unusable) as exc:
                    self._seen = None
                    problems.append(f"cannot write {self.directory}/{pa.DATA_NAME}: {_why(exc)}")
                    return Exchanged("error", None, False, waited, tuple(problems))
                return Exchanged("ok", decided, True, waited, tuple(problems))
            finally:
                os.close(lfd)  # our only fd on that open file: this releases the flock
        finally:
            os.close(dfd)

    def _open_lock(self, dfd: int, mode: int) -> int:
        try:
            fd = os.open(pa.LOCK_NAME, os.O_RDWR | os.O_CREAT | _OPEN, mode, dir_fd=dfd)
        except PermissionError:
            # flock needs no write access; the crate's own file may be 0644 and not ours.
            fd = os.open(pa.LOCK_NAME, os.O_RDONLY | _OPEN, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Unusable("not a regular file; the crate's callers cannot use it either "
                               "(remove it once nobody runs)")
            if st.st_uid == self.euid and st.st_nlink == 1:
                with contextlib.suppress(OSError):
                    os.fchmod(fd, mode)  # ours: the umask must not take away bits others need
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _read(self, dfd: int) -> Reading:
        try:
            fd = os.open(pa.DATA_NAME, os.O_RDONLY | _OPEN, dir_fd=dfd)
        except FileNotFoundError:
            return Reading(pa.parse(None), True, None)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return Reading(pa.corrupt("a symbolic link (never followed)"), False, None)
            raise
        try:
            st = os.fstat(fd)
            fid = _identity(st)
            if not stat.S_ISREG(st.st_mode):
                return Reading(pa.corrupt("not a regular file"), False, None)
            if st.st_nlink != 1:
                return Reading(pa.corrupt(f"{st.st_nlink} hard links to one file"), False, None)
            if st.st_size > pa.MAX_TABLE_BYTES:
                return Reading(pa.corrupt(f"{st.st_size:,} bytes, more than "
                                          f"{pa.MAX_TABLE_BYTES:,}"), False, None)
            if self._seen is not None and self._seen[0] == fid:
                seen = self._seen[1]
                return Reading(pa.Parsed(_copy(seen.table), list(seen.problems), seen.repair),
                               False, fid)
            chunks: list[bytes] = []
            left = pa.MAX_TABLE_BYTES + 1
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 16))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        parsed = pa.parse(b"".join(chunks))
        self._seen = (fid, pa.Parsed(_copy(parsed.table), list(parsed.problems), parsed.repair))
        return Reading(parsed, False, fid)

    def _write(self, dfd: int, data: bytes, mode: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pa.TMP_NAME, dir_fd=dfd)  # left by a crashed writer, or planted; we hold the lock
        fd = os.open(pa.TMP_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN, mode, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self.euid or st.st_nlink != 1:
                raise Unusable(f"{pa.TMP_NAME} is not the file just created")
            os.fchmod(fd, mode)  # the umask must not take away the bits others need
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)
            os.rename(pa.TMP_NAME, pa.DATA_NAME, src_dir_fd=dfd, dst_dir_fd=dfd)
            self._seen = None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(pa.TMP_NAME, dir_fd=dfd)
            raise
        finally:
            os.close(fd)

    def _save_memo(self, ours: dict[int, pa.Entry]) -> None:
        if not self.memo:
            return
        doc = {"directory": os.path.abspath(self.directory),
               "blocks": {str(b): [e.size, e.expires] for b, e in sorted(ours.items())}}
        tmp = self.memo + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.rename(tmp, self.memo)
        except OSError:
            # Only a convenience for the next start (our entries are recognised at once):
            # without it they are foreign to a restarted broker and lapse within 120 s.
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _copy(table: pa.Table) -> pa.Table:
    return pa.Table(dict(table.keys), table.next, dict(table.extra))


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno == errno.ELOOP:
            return "a symbolic link (never followed)"
        return str(exc.strerror or exc)
    return str(exc)


def _lock(fd: int, deadline: float) -> bool:
    """Take an exclusive flock, trying without blocking until ``deadline``.

    A blocking flock in a thread could not be given up on; the crate holds the lock
    for milliseconds per call (3-5 ms on an empty table, 121 ms at 2,000 entries).
    """
    delay = 0.0005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EINTR):
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.01)
