"""The fedimint-portalloc share: one optional wrapper around the broker's grant.

With ``portalloc_dir`` configured, the broker and Rust test suites calling
``fedimint_portalloc::port_alloc`` draw from one port range. The broker then
(see :mod:`portlease.broker.portalloc` for the table and its rules):

- grants under the crate's lock, after making every live entry the crate (or
  anyone else) wrote a *foreign hold* on the allocator, so the grant skips them;
- publishes its own live leases in the same lock hold, so a crate caller that
  runs next steers clear of a port a portlease client holds but has not bound;
- removes its entries soon after their leases end, and pushes their expiry
  forward while they live (the crate forgets an entry 120 s after it was written).

Nothing else in the broker knows about the crate: it calls :meth:`PortallocShare.around_grant`
instead of its grant, :meth:`~PortallocShare.lease_ended` when a lease ends, runs
:meth:`~PortallocShare.refresh_forever` as a task, and :meth:`~PortallocShare.reapply`
on a reload that builds a new allocator. Without ``portalloc_dir`` there is no
share object and the grant path does not change at all.

Where the time goes in one shared grant, and why it is split in three:

1. a worker thread takes the crate's ``flock`` and reads the table (a table
   it wrote itself and nobody has replaced since is not parsed again);
2. back on the trio thread, the foreign holds are updated and ``grant()`` runs
   as it would without the share, so it may use the lease table freely;
3. a worker thread merges our leases in (linear in the table), writes the
   file (temporary + fdatasync + rename, as the crate does) and unlocks.

The file work never blocks the event loop, and the lock is held for one read,
one merge and one write: what the crate's own call holds it for. When the lock
cannot be had within ``lock_timeout`` (a stuck holder), the grant goes ahead on
the bind checks and the last foreign entries seen, and the share says so in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

import trio

from . import portalloc as pa

T = TypeVar("T")

REFRESH_INTERVAL = 30.0
"""Seconds between syncs when nothing ended: pushes our entries' expiry forward
well inside the crate's 120 s (an entry moves only once it lags by ``slack``)."""
PUBLISH_DELAY = 0.5
"""A lease that ended is taken out of the table after at most this long, so that
a burst of releases (a test suite's teardown) costs one write, not one each."""


class Holds(Protocol):
    """What the share needs of the allocator: counted holds on port runs."""

    def hold(self, start: int, count: int) -> None: ...

    def unhold(self, start: int, count: int) -> None: ...


Snapshot = Callable[[], dict[int, tuple[int, float | None]]]
"""``{start: (count, seconds left, or None while attached)}`` for every live lease."""


class PortallocShare:
    """The crate's table as a second source of truth around the broker's grant.

    ``snapshot`` lists the broker's live leases (see :data:`Snapshot`);
    ``allocator`` returns the allocator grants use now (it changes on reload);
    ``log`` gets the table's problems and lock timeouts. All methods are called
    on the trio thread.
    """

    def __init__(
        self,
        directory: str,
        *,
        snapshot: Snapshot,
        allocator: Callable[[], Holds],
        log: logging.Logger,
        lock_timeout: float = 0.5,
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        self.directory = directory
        self.table = pa.PortallocTable(directory, lock_timeout=lock_timeout)
        self.refresh_interval = refresh_interval
        self._snapshot = snapshot
        self._allocator = allocator
        self._log = log
        self._lock = trio.Lock()
        self._dirty = trio.Event()
        self._foreign: set[pa.Span] = set()
        self._held_on: Holds | None = None

    # ------------------------------------------------------------ the broker's calls

    async def start(self) -> None:
        """First sync, before the first grant: publish restored leases, hold foreign entries."""
        await self.sync()

    async def refresh_forever(self) -> None:
        """Publish ended leases soon, and push live ones' expiry forward; never returns."""
        while True:
            with trio.move_on_after(self.refresh_interval):
                await self._dirty.wait()
                await trio.sleep(PUBLISH_DELAY)
            self._dirty = trio.Event()
            await self.sync()

    async def around_grant(self, grant: Callable[[], T]) -> T:
        """Run ``grant()`` on the trio thread while the crate's lock is held.

        The crate's live entries are foreign holds on the allocator before
        ``grant()`` runs, and every live lease, the new one included, is in the
        table when this returns. An exception from ``grant()`` propagates after
        the lock is released, with nothing written.
        """
        async with self._lock:
            held = await trio.to_thread.run_sync(self.table.begin, self._snapshot())
            if isinstance(held, pa.Unlocked):
                self._hold_foreign(held.foreign)
                self._report(held.status, held.problems, held.waited)
                return grant()
            try:
                self._hold_foreign(held.foreign)
                granted = grant()
                ours = self._snapshot()
            except BaseException:
                self.table.abandon(held)
                raise
            # finish() always releases the lock; it cannot be cancelled half-way
            # (a worker thread is never abandoned here), so the flock cannot leak.
            result: pa.SyncResult[pa.Run] = await trio.to_thread.run_sync(self.table.finish, held, ours)
            self._report(result.status, result.problems, result.waited)
            return granted

    def lease_ended(self) -> None:
        """A lease ended: take its entry out of the table soon (coalesced with others)."""
        self._dirty.set()

    def reapply(self, allocator: Holds) -> None:
        """Hold the current foreign entries on ``allocator``, which is about to replace the
        one grants use (a reload that changed the range). Call before switching."""
        for start, count in self._foreign:
            allocator.hold(start, count)
        self._held_on = allocator

    # ------------------------------------------------------------ internals

    async def sync(self) -> pa.SyncResult[pa.Run]:
        """One exchange without a grant: publish what is live, drop what ended."""
        async with self._lock:
            result: pa.SyncResult[pa.Run] = await trio.to_thread.run_sync(self.table.sync, self._snapshot())
            if result.status == "ok":
                self._hold_foreign(result.foreign)
            self._report(result.status, result.problems, result.waited)
            return result

    def _hold_foreign(self, spans: Iterable[pa.Span]) -> None:
        """Make ``spans`` the allocator's foreign holds, changing only what changed.

        A set difference, not release-all-then-hold-all: with 2,000 crate entries
        the latter rewrote the allocator's tree 4,000 times for every grant.
        """
        allocator = self._allocator()
        new = set(spans)
        if allocator is not self._held_on:
            # A new allocator nobody told us about: it holds none of ours yet.
            self._held_on, old = allocator, set()
        else:
            old = self._foreign
        for start, count in new - old:
            allocator.hold(start, count)
        for start, count in old - new:
            allocator.unhold(start, count)
        self._foreign = new

    def _report(self, status: str, problems: tuple[str, ...], waited: float) -> None:
        for problem in problems:
            self._log.warning("portalloc: %s", problem)
        if status == "skipped":
            self._log.warning(
                "portalloc: the lock on %s was busy for %.1f s; went on with bind checks alone",
                self.directory, waited,
            )

    @property
    def foreign(self) -> list[pa.Span]:
        """The foreign entries held on the allocator now, sorted."""
        return sorted(self._foreign)
