"""Share the port range with fedimint-portalloc users through the crate's own table.

Rust test suites that call ``fedimint_portalloc::port_alloc`` coordinate through a
directory (``$FM_PORTALLOC_DATA_DIR``) holding ``lock`` (an exclusive ``flock`` on it
guards every access) and ``fm-portalloc.json``::

    {"next": 10015, "keys": {"10000": {"size": 3, "expires": 1731688200}}}

The crate skips every run that overlaps a live entry (``now < expires``), starts its
search at ``next``, reserves a run for 120 s, and writes the table as
``fm-portalloc.tmp`` + fdatasync + rename. With ``portalloc_dir`` set, the broker
treats that table as a second source of truth:

- before granting, it avoids every live entry it did not write (:func:`foreign_ranges`);
- it publishes its own live leases as entries whose ``expires`` it keeps pushing
  forward, and removes them once the leases end (:func:`merge`), so the crate never
  hands out a port a portlease client holds but has not bound yet.

The module has a pure part (parse, classify, merge, render: no clock, no files) and a
small blocking I/O part, :class:`PortallocTable`, for a worker thread; the broker
drives it through :class:`portlease.broker.share.PortallocShare`. Nothing in here
raises on a bad table or a stuck lock holder: problems come back in
:class:`SyncResult` for the caller to log, and the broker keeps serving on its
bind checks alone.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

LOW: Final = 10000
"""Where the crate starts when ``next`` is absent, and where it wraps to."""
HIGH: Final = 32000
"""The crate wraps to LOW once its candidate base passes this."""
CRATE_RESERVATION: Final = 120
"""Seconds the crate reserves a run for; also our default publication horizon."""
U16_MAX: Final = 65535
U64_MAX: Final = 2**64 - 1

LOCK_NAME: Final = "lock"
DATA_NAME: Final = "fm-portalloc.json"
TMP_NAME: Final = "fm-portalloc.tmp"

_MAX_TABLE_BYTES: Final = 64 * 1024 * 1024
"""A table this large is not the crate's (2,000 entries are ~100 kB): treat as corrupt."""
_CANONICAL_KEY = re.compile(r"0|[1-9][0-9]*")
_DIGITS = re.compile(r"[0-9]+")


Span = tuple[int, int]
"""(start, size) of a live foreign entry: the same shape as the allocator's (start, count)."""


@dataclass(frozen=True, slots=True)
class Run:
    """``count`` consecutive ports from ``start``: the simplest thing ``choose`` can return."""

    start: int
    count: int


class Claim(Protocol):
    """What ``choose`` returns: anything with the run it took (a :class:`Run`, a LeaseRecord)."""

    @property
    def start(self) -> int: ...

    @property
    def count(self) -> int: ...


C = TypeVar("C", bound=Claim)


class LeaseLike(Claim, Protocol):
    """A live lease as the broker keeps it: its run, and its end (None while attached)."""

    @property
    def expires(self) -> float | None: ...


def snapshot(leases: Iterable[LeaseLike], now: float) -> dict[int, tuple[int, float | None]]:
    """``ours`` for :meth:`PortallocTable.sync`: base -> (count, seconds left or None).

    Seconds left rather than an absolute time, so the lease table's clock and the
    table's wall clock never have to agree.
    """
    return {
        lease.start: (lease.count, None if lease.expires is None else lease.expires - now)
        for lease in leases
    }

# ------------------------------------------------------------------ the pure part


@dataclass(frozen=True, slots=True)
class Entry:
    """One value of ``keys``: a run of ``size`` ports from its base, live while now < expires."""

    size: int
    expires: int
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Fields the crate does not know; serde ignores them on read, so we keep them."""

    def live(self, now: float) -> bool:
        # expires is an integer, so this equals the crate's `now_secs < expires`.
        return now < self.expires


@dataclass(slots=True)
class Table:
    """The whole file. ``next`` is None when the file has none (the crate then uses LOW)."""

    keys: dict[int, Entry] = field(default_factory=dict)
    next: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Parsed:
    table: Table
    problems: list[str]
    repair: bool
    """True when the bytes as they are would make the crate fail: rewrite them."""


class _Obj(dict[str, Any]):
    """A JSON object that remembers whether a name occurred twice.

    serde rejects a duplicate struct field ("duplicate field `keys`"), so a file
    with one is unreadable to the crate even though Python's json takes the last.
    """

    duplicate: bool = False


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj()
    for name, value in pairs:
        if name in obj:
            obj.duplicate = True
        obj[name] = value
    return obj


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON; serde_json refuses the whole file over them.
    raise ValueError(f"non-JSON constant {name}")


def _as_uint(value: Any, limit: int, *, round_up: bool = False) -> tuple[int | None, bool]:
    """Read an unsigned integer leniently: (value or None if unusable, needed repair)."""
    if isinstance(value, bool):  # bool is an int to Python, never to serde
        return None, True
    if isinstance(value, int):
        return (value, False) if 0 <= value <= limit else (None, True)
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        number = math.ceil(value) if round_up else int(value)
        return (number, True) if number <= limit and (round_up or number == value) else (None, True)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
        return (number, True) if number <= limit else (None, True)
    return None, True


def empty_table() -> Table:
    """What a missing or unreadable table is replaced with: crate-readable, ``next`` explicit.

    ``next`` is written out even though serde defaults it, so that a crate version
    whose missing-file default is not LOW still starts in its own range.
    """
    return Table(next=LOW)


def parse(data: bytes | None) -> Parsed:
    """Read the table leniently; never raises.

    ``None`` means the file does not exist (the crate treats that as empty: no
    repair needed). Unusable entries are dropped, fixable ones fixed (a float
    ``expires`` rounded up, a ``"12"`` string read as 12, a run past 65535 cut),
    and everything else, including fields the crate does not know, is kept.
    """
    if data is None:
        return Parsed(Table(), [], repair=False)
    try:
        root = json.loads(
            data.decode("utf-8"), object_pairs_hook=_object_pairs, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "empty file" if not data.strip() else f"not JSON ({exc})"
        return Parsed(empty_table(), [f"{DATA_NAME}: {reason}; replaced by an empty table"], True)
    if not isinstance(root, _Obj):
        return Parsed(
            empty_table(),
            [f"{DATA_NAME}: top level is {type(root).__name__}, not an object; replaced"],
            True,
        )
    problems: list[str] = []
    repair = root.duplicate
    if root.duplicate:
        problems.append(f"{DATA_NAME}: a top-level field occurs twice; rewritten once")
    table = Table(extra={k: v for k, v in root.items() if k not in ("next", "keys")})
    if "next" in root:
        nxt, fixed = _as_uint(root["next"], U16_MAX)
        if nxt is None:
            problems.append(f"{DATA_NAME}: bad next {root['next']!r}; reset to {LOW}")
            nxt, fixed = LOW, True
        table.next = nxt
        repair = repair or fixed
    keys = root.get("keys")
    if not isinstance(keys, _Obj):
        problems.append(
            f"{DATA_NAME}: "
            + ("no keys" if keys is None else f"keys is {type(keys).__name__}")
            + "; replaced by an empty map"
        )
        if table.next is None:
            table.next = LOW
        return Parsed(table, problems, True)
    dropped: list[str] = []
    for name, value in keys.items():
        base = int(name) if _DIGITS.fullmatch(name) else None
        if base is None or base > U16_MAX or not isinstance(value, _Obj):
            dropped.append(name)
            continue
        # "010000" reads as 10000 to us; whether serde agrees is not worth betting on.
        fixed = not _CANONICAL_KEY.fullmatch(name) or value.duplicate
        size, size_fixed = _as_uint(value.get("size"), U16_MAX)
        # Rounding a fractional expiry up keeps the reservation at least as long.
        expires, exp_fixed = _as_uint(value.get("expires"), U64_MAX, round_up=True)
        if size is None or expires is None:
            dropped.append(name)
            continue
        fixed = fixed or size_fixed or exp_fixed
        if base + size > U16_MAX:
            # The crate computes `base + size` in u16: this entry would overflow it.
            problems.append(f"{DATA_NAME}: entry {name} runs past port {U16_MAX}; cut to fit")
            size, fixed = U16_MAX - base, True
        extra = {k: v for k, v in value.items() if k not in ("size", "expires")}
        entry = Entry(size, expires, extra)
        if base in table.keys:  # "10000" and "010000": keep the longer reservation
            fixed = True
            old = table.keys[base]
            entry = Entry(max(size, old.size), max(expires, old.expires), extra or old.extra)
        table.keys[base] = entry
        repair = repair or fixed
    if dropped:
        shown = ", ".join(repr(d) for d in dropped[:5]) + (", …" if len(dropped) > 5 else "")
        problems.append(f"{DATA_NAME}: dropped {len(dropped)} unreadable entries ({shown})")
        repair = True
    elif repair and not problems:
        problems.append(f"{DATA_NAME}: entries in a form the crate cannot read; normalised")
    return Parsed(table, problems, repair)


def _entry_json(base: int, e: Entry) -> str:
    if e.extra:
        body = json.dumps({"size": e.size, "expires": e.expires, **e.extra}, allow_nan=False)
    else:
        body = f'{{"size": {e.size}, "expires": {e.expires}}}'
    return f'    "{base}": {body}'


def render(table: Table) -> bytes:
    """The JSON the crate reads: ``next`` (if any), ``keys`` by ascending base, then extras.

    One entry per line, formatted directly: ``json.dumps(indent=...)`` runs the
    pure-Python encoder, which at 2,000 entries cost more than the merge itself,
    and all of it happens while the crate's callers wait on the lock.
    """
    parts: list[str] = []
    if table.next is not None:
        parts.append(f'  "next": {int(table.next)}')
    if table.keys:
        body = ",\n".join(_entry_json(b, table.keys[b]) for b in sorted(table.keys))
        parts.append(f'  "keys": {{\n{body}\n  }}')
    else:
        parts.append('  "keys": {}')
    for name, value in table.extra.items():
        parts.append(f"  {json.dumps(name)}: {json.dumps(value, allow_nan=False)}")
    return ("{\n" + ",\n".join(parts) + "\n}\n").encode()


def owned_bases(
    table: Table, ours: Mapping[int, tuple[int, float | None]], published: Mapping[int, Entry]
) -> set[int]:
    """The entries of ``table`` that are ours.

    An entry is ours when it is exactly what we last wrote at that base (size and
    expires), or when it is exactly one of our leases' runs: the latter adopts our
    own entries after a broker restart. An entry the crate wrote is never exactly
    what we wrote (it would have needed our entry to lapse first and then pick
    the same base, size *and* second), so it is never taken for ours.
    """
    owned: set[int] = set()
    for base, entry in table.keys.items():
        mine = published.get(base)
        if mine is not None and (mine.size, mine.expires) == (entry.size, entry.expires):
            owned.add(base)  # what we wrote, untouched
        elif base in ours and ours[base][0] == entry.size:
            owned.add(base)  # one of our runs exactly: adopt it
    return owned


def foreign_ranges(table: Table, now: float, owned: Iterable[int] = ()) -> list[Span]:
    """Live entries we did not write, as (start, size) sorted by start: ports to avoid."""
    mine = set(owned)
    return sorted(
        (base, e.size)
        for base, e in table.keys.items()
        if base not in mine and e.size > 0 and e.live(now)
    )


def first_overlap(start: int, count: int, ranges: Iterable[tuple[int, int]]) -> int | None:
    """The end of the first range overlapping ``[start, start+count)`` (where to retry), or None."""
    end = start + count
    for s, n in ranges:
        if s < end and start < s + n:
            return s + n
    return None


def _union(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``[s, e)`` covering the same ports as ``spans`` (which may overlap)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


@dataclass(slots=True)
class Merged:
    table: Table
    published: dict[int, Entry]
    """Our entries as they are in ``table`` now: remember them for the next merge."""
    problems: list[str]


def merge(
    table: Table,
    now: float,
    ours: Mapping[int, tuple[int, float | None]],
    owned: Iterable[int],
    *,
    claim: Run | None = None,
    horizon: float = CRATE_RESERVATION,
    slack: float = 10.0,
) -> Merged:
    """Put our live leases into ``table``, take out the ones that ended; pure.

    ``ours`` maps base port to (count, seconds the lease has left, or None while
    it is bound to a connection); ``claim`` is a run granted under this lock
    hold. Each is published with ``expires = ceil(now + min(left, horizon))``,
    rewritten only when it would move by more than ``slack`` seconds (so that a
    burst of grants does not rewrite every entry). Our entries that are neither
    in ``ours`` nor ``claim`` are removed; entries we do not own are kept, except
    expired ones lying under a run we publish (the crate drops those anyway).

    A lease overlapping a live foreign entry is a double grant that already
    happened (e.g. while the lock was stuck): we publish only the ports outside
    the foreign entry, keeping the table free of overlaps, and report it.

    Cost: one sort of the table and one of our leases, then a single sweep over
    both. This runs while the crate's callers wait on its lock, for every grant,
    so nothing in it may cost leases times entries.
    """
    owned_set = set(owned)
    problems: list[str] = []
    keys = {b: e for b, e in table.keys.items() if b not in owned_set}
    # Live foreign entries as one disjoint, sorted cover: each run below is cut
    # against it with a pointer that only moves forward.
    foreign = _union((b, b + e.size) for b, e in keys.items() if e.size > 0 and e.live(now))
    # Sorted by base (the keys are distinct, so the tuples never compare further);
    # the claim goes after a lease at the same base, as if it came later.
    runs: list[tuple[int, tuple[int, float | None]]] = sorted(ours.items())
    if claim is not None:
        bisect.insort(runs, (claim.start, (claim.count, None)), key=lambda r: r[0])
    wanted: list[tuple[int, int, int]] = []  # (start, end, expires), ascending and disjoint
    covered = 0  # every port below this is published already or foreign
    attached = math.ceil(now + horizon)
    j = 0
    nforeign = len(foreign)
    for base, (count, left) in runs:
        if count <= 0 or (left is not None and left <= 0):
            continue  # nothing to reserve, or the lease has already lapsed
        end = base + count
        if end > U16_MAX:
            end = U16_MAX  # the crate's u16 `base + size` must not overflow
        if base < 1 or base >= end:
            problems.append(f"lease {base}+{count} cannot be written in the table; skipped")
            continue
        if end < base + count:
            problems.append(f"lease {base}+{count}: ports from {U16_MAX} on are not published")
        expires = attached if left is None else math.ceil(now + min(left, horizon))
        cur = base if base > covered else covered
        while j < nforeign and foreign[j][1] <= cur:
            j += 1  # ends before this run, so before every later one too
        k = j
        while cur < end:
            if k < nforeign and foreign[k][0] < end:
                s, e = foreign[k]
                problems.append(
                    f"lease {base}+{count} overlaps live fedimint-portalloc entries on "
                    f"{s}-{e - 1}: ports {max(s, base)}-{min(e, end) - 1} may be in use twice"
                )
                if s > cur:
                    wanted.append((cur, s, expires))
                cur = e
                k += 1
            else:
                wanted.append((cur, end, expires))
                cur = end
        if end > covered:
            covered = end
    # Entries we do not own lying under a piece we publish (or starting where one
    # does) go: live ones cannot (they were cut out above), so these are expired
    # or empty, and the crate drops those on load anyway. One sweep, both sorted.
    i = 0
    for b in sorted(keys):
        while i < len(wanted) and wanted[i][1] <= b:
            i += 1
        if i == len(wanted):
            break
        if wanted[i][0] < b + (keys[b].size or 1):
            del keys[b]
    published: dict[int, Entry] = {}
    before = table.keys
    for start, end, expires in wanted:
        old = before.get(start) if start in owned_set else None
        if (old is not None and old.size == end - start
                and expires - slack <= old.expires <= expires):
            entry = old  # fresh enough: leave the file alone (and build nothing)
        else:
            entry = Entry(end - start, expires)
        keys[start] = entry
        published[start] = entry
    return Merged(Table(keys=keys, next=table.next, extra=dict(table.extra)), published, problems)


# ------------------------------------------------------------------ the I/O part


@dataclass(frozen=True, slots=True)
class SyncResult(Generic[C]):
    """What one :meth:`PortallocTable.sync` did.

    ``status``: "ok" (read, merged, written if anything changed, all under the
    lock), "skipped" (the lock was not obtained within the timeout: nothing read
    or written) or "error" (an OS error; ``problems`` says which). ``foreign`` are
    the live foreign runs ``choose`` was given: fresh under the lock, else the
    last ones seen that are still live. ``problems`` are for the log.
    """

    status: Literal["ok", "skipped", "error"]
    foreign: tuple[Span, ...]
    chosen: C | None
    published: bool
    """True when ``chosen`` (if any) and all of ``ours`` are in the table now."""
    wrote: bool
    waited: float
    """Seconds spent waiting for the lock."""
    problems: tuple[str, ...] = ()

    @property
    def locked(self) -> bool:
        return self.status == "ok"


def _file_mode(dir_mode: int) -> int:
    # Files we create get the directory's read/write bits (a group-shared 2775
    # directory gives 0664), so the crate running as another runner user can still
    # open `lock` read-write and replace the table.
    return (dir_mode & 0o666) | 0o600


def _open_or_create(path: str, flags: int, mode: int) -> int:
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        return os.open(path, flags | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        os.fchmod(fd, mode)  # the umask must not take away the bits others need
    return fd


@dataclass(slots=True)
class Locked:
    """The crate's lock, held, and the table as read under it (from :meth:`PortallocTable.begin`).

    Give it back with :meth:`PortallocTable.finish` (publish) or
    :meth:`PortallocTable.abandon` (write nothing); until then every crate caller waits.
    """

    fd: int
    mode: int
    wall: float
    waited: float
    parsed: Parsed
    missing: bool
    """No table file existed: the crate reads that as empty; one is created only to publish."""
    owned: set[int]
    foreign: list[Span]


@dataclass(frozen=True, slots=True)
class Unlocked:
    """:meth:`PortallocTable.begin` could not hold the lock: go on with ``foreign`` (stale)."""

    status: Literal["skipped", "error"]
    foreign: list[Span]
    waited: float
    problems: tuple[str, ...]


_FileId = tuple[int, int, int, int]
"""(device, inode, size, mtime in ns): the table file as we last saw it."""


def _file_id(st: os.stat_result) -> _FileId:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class PortallocTable:
    """The crate's directory, used from one process under the crate's own lock.

    Blocking: call it from a worker thread (see :class:`portlease.broker.share.PortallocShare`).
    One exchange at a time (an internal mutex); each one opens ``lock`` afresh, so a
    lock file deleted and recreated by hand is followed.

    An exchange is :meth:`begin` (lock, read, find the foreign entries), then the
    caller's grant, then :meth:`finish` (merge, write, unlock); :meth:`sync` does
    all three for callers that can run the grant in the same thread. The table
    we last wrote or read is kept with its file's identity (inode, size, mtime):
    while the file is still that one, nobody else has written it (the crate
    replaces it by rename, which makes a new inode), and it is not parsed again.
    """

    def __init__(
        self,
        directory: str,
        *,
        lock_timeout: float = 0.5,
        horizon: float = CRATE_RESERVATION,
        slack: float = 10.0,
    ) -> None:
        self.directory = directory
        self.lock_timeout = lock_timeout
        self.horizon = horizon
        self.slack = slack
        self._mutex = threading.Lock()
        self._published: dict[int, Entry] = {}
        self._last_foreign: list[tuple[Span, int]] = []  # with each entry's expires
        self._seen: tuple[_FileId, Table] | None = None

    @property
    def published(self) -> dict[int, Entry]:
        """Our entries as of the last successful sync."""
        return dict(self._published)

    # -------------------------------------------------------------- one exchange

    def begin(
        self, ours: Mapping[int, tuple[int, float | None]], *, now: float | None = None
    ) -> Locked | Unlocked:
        """Take the crate's lock (waiting at most ``lock_timeout``) and read the table.

        ``ours`` (base -> (count, seconds left or None)) tells our own entries from
        foreign ones, including ours from before a restart. On :class:`Locked` the
        caller must call :meth:`finish` or :meth:`abandon`, from any thread.
        ``now`` is Unix time (default ``time.time()``): the table is in wall-clock seconds.
        """
        t0 = time.monotonic()
        deadline = t0 + self.lock_timeout
        if not self._mutex.acquire(timeout=self.lock_timeout):
            return self._unlocked("skipped", now, time.monotonic() - t0,
                                  ["another sync of this table is still running"])
        try:
            got = self._begin_locked(ours, now, deadline, t0)
        except BaseException:
            self._mutex.release()
            raise
        if isinstance(got, Unlocked):
            self._mutex.release()
        return got

    def finish(
        self,
        held: Locked,
        ours: Mapping[int, tuple[int, float | None]],
        *,
        chosen: C | None = None,
    ) -> SyncResult[C]:
        """Publish ``ours`` (taken after the grant, so it includes it) and release the lock.

        ``chosen``, a run granted under this lock hold that is not in ``ours``, is
        published too and comes back in the result.
        """
        try:
            return self._finish_locked(held, ours, chosen)
        finally:
            os.close(held.fd)  # closing our only fd on that open file releases the flock
            self._mutex.release()

    def abandon(self, held: Locked) -> None:
        """Release the lock without writing (the grant failed)."""
        os.close(held.fd)
        self._mutex.release()

    def sync(
        self,
        ours: Mapping[int, tuple[int, float | None]],
        choose: Callable[[list[Span]], C | None] | None = None,
        *,
        now: float | None = None,
    ) -> SyncResult[C]:
        """Read the table, let ``choose`` pick a run, publish ours, all in one lock hold.

        ``choose(foreign)`` is called exactly once (if given): under the lock when it
        was obtained, otherwise after the timeout with the last known live foreign
        runs; its result (anything with ``start`` and ``count``, or None) is
        published in the same write. An exception from ``choose`` propagates after
        the lock is released, with nothing written.
        """
        held = self.begin(ours, now=now)
        if isinstance(held, Unlocked):
            chosen = choose(list(held.foreign)) if choose is not None else None
            return SyncResult(held.status, tuple(held.foreign), chosen, False, False,
                              held.waited, held.problems)
        try:
            chosen = choose(list(held.foreign)) if choose is not None else None
        except BaseException:
            self.abandon(held)
            raise
        return self.finish(held, ours, chosen=chosen)

    # -------------------------------------------------------------- internals

    def _unlocked(
        self, status: Literal["skipped", "error"], now: float | None, waited: float,
        problems: list[str],
    ) -> Unlocked:
        wall = time.time() if now is None else now
        stale = [run for run, expires in self._last_foreign if wall < expires]
        return Unlocked(status, stale, waited, tuple(problems))

    def _lock(self, fd: int, deadline: float) -> bool:
        # Non-blocking attempts with growing sleeps: a blocking flock in a thread
        # could not be given up on, and the crate holds the lock ~1 ms per call.
        delay = 0.001
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
            delay = min(delay * 2, 0.02)

    def _open_lock(self) -> tuple[int, int]:
        os.makedirs(self.directory, exist_ok=True)  # as the crate does (create_dir_all)
        mode = _file_mode(os.stat(self.directory).st_mode)
        path = os.path.join(self.directory, LOCK_NAME)
        try:
            return _open_or_create(path, os.O_RDWR, mode), mode
        except PermissionError:
            # flock needs no write access; the crate's own file may be 0644 and not ours.
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC), mode

    def _read(self) -> tuple[bytes | None, _FileId | None, Table | None]:
        """(bytes, file id, None), or (None, id, table) when the file is the one we last saw."""
        path = os.path.join(self.directory, DATA_NAME)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None, None
        with os.fdopen(fd, "rb") as f:
            fid = _file_id(os.fstat(fd))
            if self._seen is not None and self._seen[0] == fid:
                return None, fid, self._seen[1]
            return f.read(_MAX_TABLE_BYTES + 1), fid, None

    def _write(self, data: bytes, mode: int) -> _FileId:
        path = os.path.join(self.directory, DATA_NAME)
        tmp = os.path.join(self.directory, TMP_NAME)
        with contextlib.suppress(FileNotFoundError):
            mode = _file_mode(os.stat(path).st_mode)  # keep the table's own mode
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # left over by a crashed writer; we hold the lock
        fd = _open_or_create(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fdatasync(fd)
                fid = _file_id(os.fstat(fd))
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fid

    def _begin_locked(
        self, ours: Mapping[int, tuple[int, float | None]], now: float | None, deadline: float,
        t0: float,
    ) -> Locked | Unlocked:
        try:
            fd, mode = self._open_lock()
        except OSError as exc:
            return self._unlocked("error", now, time.monotonic() - t0,
                                  [f"cannot open {self.directory}/{LOCK_NAME}: {exc}"])
        try:
            got = self._lock(fd, deadline)
        except OSError as exc:
            os.close(fd)
            return self._unlocked("error", now, time.monotonic() - t0,
                                  [f"flock on {self.directory}/{LOCK_NAME}: {exc}"])
        waited = time.monotonic() - t0
        if not got:
            os.close(fd)
            return self._unlocked("skipped", now, waited, [
                f"{self.directory}/{LOCK_NAME} held by another process for over "
                f"{self.lock_timeout:g} s; table not read or written"])
        try:
            wall = time.time() if now is None else now
            try:
                raw, fid, known = self._read()
            except OSError as exc:
                # Unreadable is not corrupt: writing now could destroy others' entries.
                os.close(fd)
                return self._unlocked("error", now, waited,
                                      [f"cannot read {self.directory}/{DATA_NAME}: {exc}"])
            if known is not None:
                parsed = Parsed(known, [], repair=False)
            else:
                if raw is not None and len(raw) > _MAX_TABLE_BYTES:
                    raw = b"too large"
                parsed = parse(raw)
                self._seen = (fid, parsed.table) if fid is not None and not parsed.repair else None
            owned = owned_bases(parsed.table, ours, self._published)
            foreign = foreign_ranges(parsed.table, wall, owned)
            self._last_foreign = [(r, parsed.table.keys[r[0]].expires) for r in foreign]
            missing = fid is None
            return Locked(fd, mode, wall, waited, parsed, missing, owned, foreign)
        except BaseException:
            os.close(fd)
            raise

    def _finish_locked(
        self, held: Locked, ours: Mapping[int, tuple[int, float | None]], chosen: C | None,
    ) -> SyncResult[C]:
        parsed = held.parsed
        claim = Run(chosen.start, chosen.count) if chosen is not None else None
        merged = merge(parsed.table, held.wall, ours, held.owned, claim=claim,
                       horizon=self.horizon, slack=self.slack)
        problems = parsed.problems + merged.problems
        if held.missing:
            # No file: the crate reads that as empty. Create one only to publish,
            # with `next` explicit (see empty_table).
            changed = bool(merged.table.keys)
            if merged.table.next is None:
                merged.table.next = LOW
        else:
            changed = parsed.repair or merged.table != parsed.table
        wrote = False
        foreign = tuple(held.foreign)
        if changed:
            try:
                fid = self._write(render(merged.table), held.mode)
            except OSError as exc:
                self._seen = None
                problems.append(f"cannot write {self.directory}/{DATA_NAME}: {exc}; "
                                "leases not published")
                return SyncResult("error", foreign, chosen, False, False, held.waited,
                                  tuple(problems))
            wrote = True
            self._seen = (fid, merged.table)
        self._published = merged.published
        return SyncResult("ok", foreign, chosen, True, wrote, held.waited, tuple(problems))
