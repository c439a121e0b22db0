"""The fedimint-portalloc share: the broker grants inside blocks it published in the crate's table.

With ``portalloc_dir`` configured, the broker and Rust test suites calling
``fedimint_portalloc::port_alloc`` draw from one port range. The broker reserves
whole **blocks** of its range in the crate's table as entries of its own (see
:mod:`portlease.broker.portalloc`), and grants only inside blocks that are already
published: every port outside them is held on the allocator. So:

- a grant that fits in a published block costs what it costs without the share:
  no lock, no file, no thread (:meth:`PortallocShare.has_room` is O(1));
- a grant that does not fit waits for one exchange under the crate's lock that
  adds a block (:meth:`~PortallocShare.make_room`), and is refused with ``busy``
  when that cannot happen within ``grant_wait``: never granted from a stale copy;
- the crate's table holds tens of the broker's entries for thousands of leases,
  so the crate's own calls (which read and write the whole table unbuffered)
  stay near their cost on an empty table;
- the blocks' ``expires`` is pushed forward every 30 s (the crate's reservations
  last 120 s); a block is granted from only while its entry has at least
  ``GRANT_MARGIN`` seconds left, so a lock held for ever by someone else cannot
  make the broker grant in a block the crate may reuse;
- the table is watched (its directory entry, every ``WATCH_INTERVAL``): a corrupt
  table, a foreign entry reaching too far ahead, or a block of ours changed by
  someone else is dealt with at once, and a block that is no longer intact stops
  being granted from before the lock is even asked for.

Everything that touches the directory runs in worker threads that the broker
abandons on shutdown, and every step there is bounded in time
(:mod:`portlease.broker.portalloc_files`). The event loop never waits for the
share: hello, ping, status and grants that fit go on whatever the directory holds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

from . import portalloc as pa
from .portalloc_files import Exchanged, ShareDir

T = TypeVar("T")

RENEW_AFTER = 30.0
"""Seconds after which a block's expiry is pushed forward (it is written 120 s ahead)."""
GRANT_MARGIN = 30.0
"""A block whose entry has fewer seconds left than this is not granted from."""
WATCH_INTERVAL = 0.1
"""Seconds between looks at the table's directory entry."""
RETRY = 1.0
"""Seconds before an exchange that failed is tried again."""
RETURN_DELAY = 0.5
"""Seconds after a lease ends before empty blocks may go back (coalesces a teardown)."""
WARN_EVERY = 10.0
"""Seconds between two log lines of the same kind."""
MAX_MESSAGE = 400
"""Characters of a share log line at most."""


class Holds(Protocol):
    """What the share needs of the allocator."""

    low: int
    high: int

    def hold(self, start: int, count: int) -> None: ...

    def unhold(self, start: int, count: int) -> None: ...

    @property
    def largest_free_run(self) -> int: ...

    @property
    def free_count(self) -> int: ...


Snapshot = Callable[[], dict[int, tuple[int, float | None]]]
"""``{start: (count, seconds left, or None while attached)}`` for every live lease."""


class _Warnings:
    """The share's warnings, each kind at most once per WARN_EVERY seconds, with a count."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warn(self, kind: str, text: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < WARN_EVERY:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        if len(text) > MAX_MESSAGE:
            text = text[:MAX_MESSAGE] + "…"
        more = f" ({skipped} more like this since the last)" if skipped else ""
        self._log.warning("portalloc: %s%s", text, more)


class PortallocShare:
    """The crate's table as a second source of truth around the broker's grants.

    ``snapshot`` lists the broker's live leases (see :data:`Snapshot`);
    ``allocator`` returns the allocator grants use now (it changes on reload);
    ``memo`` is a file of the broker's own where it notes its blocks for its next
    start. Every method is called on the trio thread; :meth:`run` must run as a task.
    """

    def __init__(
        self,
        directory: str,
        *,
        snapshot: Snapshot,
        allocator: Callable[[], Holds],
        log: logging.Logger,
        memo: str | None = None,
        block: int | None = None,
        lock_timeout: float = 1.0,
        grant_wait: float = 3.0,
        spare: int = 1,
    ) -> None:
        self.directory = directory
        self.files = ShareDir(directory, lock_timeout=lock_timeout, memo=memo)
        self.grant_wait = grant_wait
        self.spare = spare
        self._snapshot = snapshot
        self._allocator = allocator
        self._warnings = _Warnings(log)
        self._log = log
        a = allocator()
        self.block = block or pa.block_size(a.low, a.high)
        self._ours: dict[int, pa.Entry] = self.files.load_memo()
        """Our blocks as last written (or, before the first exchange, as a previous run wrote them)."""
        self._foreign: list[pa.Span] = []
        self._open: list[tuple[int, int]] = []
        """Runs ``[s, e)`` of our blocks not held on the allocator now: grants land only here."""
        self._held_on: Holds | None = None
        self._freeze_at = math.inf
        self._cursor: int | None = None
        self._need = 0
        self._changed = False
        self._dirty = False
        self._ready = False
        self._last_ok = -math.inf
        self._next_try = 0.0
        self._prefetch_after = 0.0
        self._wake = trio.Event()
        self._round_done = trio.Event()
        self._last_round: tuple[bool, int, bool | None] = (False, 0, None)
        """(exchange succeeded, need it served, placed)."""
        self._problem = "the share has not read the table yet"
        self._written: pa.Parsed | None = None
        self.exchanges = 0
        self.busy_refusals = 0
        # The allocator is not narrowed to our blocks here but at the first
        # has_room() or exchange: the broker restores its journal in between, and
        # restore treats every held port as another lease's (a restart dropped
        # every lease while the share was on).

    # ------------------------------------------------------------ the broker's calls

    def has_room(self, count: int) -> bool:
        """Whether a grant of ``count`` ports fits in a published block now. O(1), no I/O."""
        if time.time() >= self._freeze_at:
            self._sync_holds()
        a = self._allocator()
        if a is not self._held_on:
            self._sync_holds()
        if (self._ready and a.free_count < self.block // 2 + count
                and trio.current_time() >= self._prefetch_after):
            self._want(self.block)  # take the next block before a grant has to wait for it
        return a.largest_free_run >= count

    async def make_room(self, count: int, *, fresh: bool = False) -> str | None:
        """Wait until a published block has room for ``count`` ports.

        Returns None when the grant should go ahead (there is room now, or no block
        can be placed at all and the grant will say ``exhausted``), or the text of a
        ``busy`` refusal when no block could be published within ``grant_wait``.
        ``fresh``: place a new block first, whatever the published ones seem to hold
        (a grant found their free ports unusable: bound, or claimed by another broker).
        """
        deadline = trio.current_time() + self.grant_wait
        rounds = 0
        while fresh or not self.has_room(count):
            fresh = False
            if rounds >= 3:
                return None  # blocks were added and still no room: bind checks failed in them
            self._want(count)
            done = self._round_done
            with trio.move_on_at(deadline):
                await done.wait()
            if not done.is_set():
                self.busy_refusals += 1
                return (f"no published fedimint-portalloc block has room for {count} ports and "
                        f"none could be added within {self.grant_wait:g} s ({self._problem}); "
                        "try again")
            ok, served, placed = self._last_round
            if ok and served >= count:
                rounds += 1
                if placed is False:
                    return None
        return None

    @property
    def placed_last(self) -> bool:
        """The last exchange placed a new block (so another may fit too)."""
        return self._last_round[2] is True

    async def around_grant(self, grant: Callable[[], T], count: int = 1) -> T:
        """Run ``grant()`` once a published block has room for ``count`` ports, or once
        waiting for one failed (the grant then finds no room and refuses): for callers
        that build their own refusal (the portpicker endpoint)."""
        if not self.has_room(count):
            await self.make_room(count)
        return grant()

    def lease_ended(self) -> None:
        """A lease ended: empty blocks go back to the crate soon (coalesced with others)."""
        self._dirty = True
        self._wake.set()

    def reapply(self, allocator: Holds) -> None:
        """Hold everything outside our blocks on ``allocator``, which is about to replace the
        one grants use (a reload that changed the range). Call before switching."""
        self._held_on = None
        self._sync_holds(allocator)

    @property
    def foreign(self) -> list[pa.Span]:
        """The live foreign entries seen at the last exchange, sorted."""
        return list(self._foreign)

    @property
    def blocks(self) -> dict[int, pa.Entry]:
        """Our blocks as published."""
        return dict(self._ours)

    @property
    def ready(self) -> bool:
        return self._ready

    async def run(self) -> None:
        """Publish, renew and return blocks, watch the table; never returns."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            self._wake.set()  # the first exchange at once: publish restored leases
            while True:
                with trio.move_on_at(self._due()):
                    await self._wake.wait()
                self._wake = trio.Event()
                if self._dirty and not (self._need or self._changed or self._renew_due()):
                    await trio.sleep(RETURN_DELAY)
                await self._round()

    # ------------------------------------------------------------ rounds

    def _want(self, count: int) -> None:
        if count > self._need:
            self._need = count
        self._wake.set()

    def _renew_due(self) -> bool:
        if not self._ready:
            return True
        soonest = min((e.expires for e in self._ours.values()), default=math.inf)
        return time.time() >= soonest - pa.CRATE_RESERVATION + RENEW_AFTER

    def _due(self) -> float:
        """The trio time of the next round nobody asked for: renewal, or a retry."""
        now_wall, now_trio = time.time(), trio.current_time()
        if not self._ready or self._need:
            return max(now_trio, self._next_try)
        soonest = min((e.expires for e in self._ours.values()), default=math.inf)
        at = soonest - pa.CRATE_RESERVATION + RENEW_AFTER
        if math.isinf(at):
            return now_trio + 3600
        return max(now_trio + (at - now_wall), self._next_try)

    async def _round(self) -> None:
        try:
            await self._round_inner()
        except Exception as exc:  # never let the share end the broker
            self._problem = f"internal error: {pa.quote(repr(exc))}"
            self._warnings.warn("internal", f"share round failed: {exc!r}")
            self._last_round = (False, 0, None)
            self._next_try = trio.current_time() + RETRY
        finally:
            done, self._round_done = self._round_done, trio.Event()
            try:
                self._sync_holds()
            except Exception as exc:
                self._warnings.warn("internal", f"cannot update the allocator's holds: {exc!r}")
            done.set()

    async def _round_inner(self) -> None:
        if trio.current_time() < self._next_try and not self._need:
            return
        mustlock = bool(self._need) or self._renew_due() or not self._ready
        if self._changed and not mustlock:
            self._changed = False
            reading = await trio.to_thread.run_sync(self.files.read, abandon_on_cancel=True)
            pa.cap_expiries(reading.parsed, time.time(), self._ours)
            why = pa.needs_exchange(reading.parsed, time.time(), self._ours)
            if not why:
                self._last_round = (True, 0, None)
                return
            self._freeze_lost(reading.parsed)
        if self._dirty and not mustlock and not self._changed:
            self._dirty = False
            if not self._has_idle_blocks():
                self._last_round = (True, 0, None)
                return
        self._changed = self._dirty = False
        need, self._need = self._need, 0
        leases = [(s, n) for s, (n, _left) in self._snapshot().items()]
        mine = dict(self._ours)
        a = self._allocator()
        low, high, block, spare, cursor = a.low, a.high, self.block, self.spare, self._cursor

        def decide(parsed: pa.Parsed, now: float) -> pa.Plan:
            pa.cap_expiries(parsed, now, mine)
            return pa.plan(parsed.table, now, mine=mine, leases=leases, low=low, high=high,
                           block=block, need=need, spare=spare, cursor=cursor)

        result: Exchanged = await trio.to_thread.run_sync(
            self.files.exchange, decide, abandon_on_cancel=True)
        self.exchanges += 1
        for problem in result.problems:
            self._warnings.warn(problem.split(":", 1)[0][:40], problem)
        if result.status != "ok" or result.plan is None:
            self._problem = pa.quote(result.problems[0] if result.problems else result.status, 200)
            self._warnings.warn(f"status-{result.status}", f"{self._problem}; "
                                "granting only inside blocks already published")
            self._need = max(self._need, need)
            self._next_try = self._prefetch_after = trio.current_time() + RETRY
            self._last_round = (False, need, None)
            return
        plan = result.plan
        self._ours = plan.ours
        self._foreign = plan.foreign
        self._cursor = plan.cursor
        self._ready = True
        self._last_ok = time.time()
        self._next_try = 0.0
        self._last_round = (True, need, plan.placed)
        if plan.placed is False:
            self._prefetch_after = trio.current_time() + 5.0

    def _has_idle_blocks(self) -> bool:
        leases = pa.union((s, s + n) for s, (n, _l) in self._snapshot().items())
        idle = sum(1 for b, e in self._ours.items() if not pa.overlaps([(b, b + e.size)], leases))
        return idle > self.spare

    def _freeze_lost(self, parsed: pa.Parsed) -> None:
        """Stop granting from blocks that are no longer ours in the table, before the lock."""
        still = pa.intact(parsed.table, self._ours)
        if len(still) != len(self._ours):
            self._ours = still
            self._sync_holds()

    async def _watch(self) -> None:
        last = await trio.to_thread.run_sync(self.files.identity, abandon_on_cancel=True)
        while True:
            await trio.sleep(WATCH_INTERVAL)
            try:
                now = await trio.to_thread.run_sync(self.files.identity, abandon_on_cancel=True)
            except OSError as exc:
                self._warnings.warn("watch", f"cannot look at {self.directory}: {exc}")
                continue
            if now != last:
                last = now
                self._changed = True
                self._wake.set()

    # ------------------------------------------------------------ allocator holds

    def _sync_holds(self, a: Holds | None = None) -> None:
        """Make the allocator's free ports exactly our grantable blocks (minus leases).

        Before the first exchange nothing is grantable: blocks a previous run noted
        are granted from only once the table shows them intact.
        """
        if a is None:
            a = self._allocator()
        now = time.time()
        ours = pa.grantable(self._ours, now, GRANT_MARGIN) if self._ready else []
        runs = pa.subtract(((s, s + n) for s, n in ours), ((s, s + n) for s, n in self._foreign))
        clipped = [(max(s, a.low), min(t, a.high + 1)) for s, t in runs if t > a.low and s <= a.high]
        self._freeze_at = min(
            (e.expires - GRANT_MARGIN for e in self._ours.values() if e.expires - now >= GRANT_MARGIN),
            default=math.inf)
        if a is not self._held_on:
            self._open = clipped
            self._hold_all_but_open(a)
            return
        # Port by port, as runs: adjacent blocks merge into one run, so compare ports.
        for s, t in pa.subtract(clipped, self._open):
            a.unhold(s, t - s)
        for s, t in pa.subtract(self._open, clipped):
            a.hold(s, t - s)
        self._open = clipped

    def _hold_all_but_open(self, a: Holds) -> None:
        """One hold on every port of ``a``'s range outside the open runs."""
        for s, t in pa.subtract([(a.low, a.high + 1)], self._open):
            a.hold(s, t - s)
        self._held_on = a

    def describe(self) -> str:
        """One line for the log or status: blocks, and what is wrong if anything."""
        ports = sum(e.size for e in self._ours.values())
        state = "ok" if self._ready and time.time() - self._last_ok < pa.CRATE_RESERVATION else self._problem
        return f"{len(self._ours)} blocks ({ports} ports) in {self.directory}: {state}"
