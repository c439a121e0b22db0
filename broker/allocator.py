"""Which ports are free, and where the next run of ``count`` free ports starts.

Pure: no sockets, no clock. The caller passes in the bind check and ``now``
(monotonic seconds).

Every port 0..65535 has a hold count; a port is free when nobody holds it.
Holds come from leases, from the parts of 0..65535 outside the configured
range (and the kernel's ephemeral/reserved ports), from other allocators'
tables, and from short quarantines of ports that failed the bind check.
Counting holds instead of a free/busy bit lets those sources overlap without
knowing about each other.

A segment tree over the 65536 ports keeps, per node, the longest free run and
the free runs touching each edge. Finding the first run of ``count`` free ports
at or after the cursor, and marking a run held or free, cost O(log 65536 +
count) whatever the number of leases, which keeps a grant's cost flat from 10
to 10,000 leases held.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

PORTS = 65536
_N = PORTS  # leaves live at _N .. 2*_N-1 of the tree arrays

BindCheck = Callable[[int], bool]
"""``bind_ok(port)`` says whether the kernel lets the port be bound right now."""


class Allocator:
    """Next-fit allocator of consecutive port runs inside ``[low, high]``.

    ``excluded`` are ``(start, count)`` runs inside the range that are never
    granted (the kernel's ephemeral and reserved ports). ``quarantine`` is how
    long a port that failed the bind check is passed over before it is tried
    again.
    """

    __slots__ = (
        "_best", "_cursor", "_free", "_holds", "_pending", "_pre", "_quarantine", "_quarantined",
        "_suf", "excluded_count", "high", "low", "quarantine",
    )

    def __init__(
        self,
        low: int,
        high: int,
        excluded: Iterable[tuple[int, int]] = (),
        *,
        quarantine: float = 5.0,
    ) -> None:
        if not (1 <= low <= high < PORTS):
            raise ValueError(f"bad port range {low}-{high}")
        self.low = low
        self.high = high
        self.quarantine = quarantine
        self._holds = [0] * PORTS
        self._best = [0] * (2 * _N)
        self._pre = [0] * (2 * _N)
        self._suf = [0] * (2 * _N)
        self._free = 0
        self._cursor = low
        self._pending: list[tuple[int, int]] = []
        """Runs whose leaves changed and whose ancestors in the tree are not yet recomputed."""
        self._quarantine: list[tuple[float, int]] = []
        self._quarantined: set[int] = set()
        holds = self._holds
        for port in range(PORTS):
            if port < low or port > high:
                holds[port] = 1
        excluded_ports: set[int] = set()
        for start, count in excluded:
            for port in range(max(start, low), min(start + count, high + 1)):
                holds[port] += 1
                excluded_ports.add(port)
        self.excluded_count = len(excluded_ports)
        """Ports of the range that are never granted (ephemeral, reserved, bad, excluded)."""
        self._build()

    # ------------------------------------------------------------ queries

    @property
    def free_count(self) -> int:
        """Ports in the range that nobody holds (quarantined ones count as held)."""
        return self._free

    @property
    def largest_free_run(self) -> int:
        """The largest ``count`` that :meth:`allocate` could grant now, bind checks aside."""
        self._settle()
        return self._best[1]

    @property
    def quarantined_count(self) -> int:
        """Ports passed over for now because they failed the bind check."""
        return len(self._quarantined)

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def is_free(self, port: int) -> bool:
        return self._holds[port] == 0

    def held_by_anyone(self, start: int, count: int) -> bool:
        """True when any port of the run is held (by a lease or anything else)."""
        holds = self._holds
        return any(holds[p] for p in range(start, start + count))

    # ------------------------------------------------------------ changes

    def hold(self, start: int, count: int) -> None:
        """Add one hold on every port of ``[start, start+count)``."""
        holds = self._holds
        best = self._best
        changed = False
        for port in range(start, start + count):
            h = holds[port]
            holds[port] = h + 1
            if h == 0:
                leaf = port + _N
                best[leaf] = self._pre[leaf] = self._suf[leaf] = 0
                self._free -= 1
                changed = True
        if changed:
            self._touched(start, start + count)

    def unhold(self, start: int, count: int) -> None:
        """Remove one hold from every port of ``[start, start+count)``."""
        holds = self._holds
        best = self._best
        changed = False
        for port in range(start, start + count):
            h = holds[port]
            if h <= 0:
                raise ValueError(f"port {port} released more often than held")
            holds[port] = h - 1
            if h == 1:
                leaf = port + _N
                best[leaf] = self._pre[leaf] = self._suf[leaf] = 1
                self._free += 1
                changed = True
        if changed:
            self._touched(start, start + count)

    def expire(self, now: float) -> None:
        """End the quarantines that are over at ``now``."""
        q = self._quarantine
        while q and q[0][0] <= now:
            _, port = heapq.heappop(q)
            self._quarantined.discard(port)
            self.unhold(port, 1)

    def allocate(self, count: int, bind_ok: BindCheck, now: float) -> int | None:
        """Hold and return the start of a run of ``count`` free, bindable ports.

        Next-fit: the search starts at the port after the previous grant and
        wraps to the bottom of the range once, so a port just released is
        handed out after all the others. A port that fails ``bind_ok`` is
        quarantined and the search goes on past it; the loop ends because each
        round either grants or quarantines a port. Returns None when no run
        fits (``largest_free_run`` then says what would).
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        self.expire(now)
        while True:
            cursor = self._cursor
            if cursor + count - 1 <= self.high and not any(self._holds[cursor : cursor + count]):
                # The common case of next-fit: the run at the cursor is free, so
                # it is what the tree search would find; skip the search (and
                # the tree is not even brought up to date for it).
                start: int | None = cursor
            else:
                self._settle()
                if count > self._best[1]:
                    return None
                start = self._find_from(cursor, count)
            if start is None:
                start = self._find_from(self.low, count)
                if start is None:  # pragma: no cover - best[1] >= count guarantees a run
                    return None
            bad = -1
            for port in range(start, start + count):
                if not bind_ok(port):
                    bad = port
                    break
            if bad < 0:
                self.hold(start, count)
                end = start + count
                self._cursor = end if end <= self.high else self.low
                return start
            self._quarantine_port(bad, now)

    # ------------------------------------------------------------ internals

    def _quarantine_port(self, port: int, now: float) -> None:
        if port in self._quarantined:  # pragma: no cover - a held port is never searched
            return
        self._quarantined.add(port)
        heapq.heappush(self._quarantine, (now + self.quarantine, port))
        self.hold(port, 1)

    def _build(self) -> None:
        best, pre, suf, holds = self._best, self._pre, self._suf, self._holds
        free = 0
        for port in range(PORTS):
            v = 1 if holds[port] == 0 else 0
            free += v
            best[_N + port] = pre[_N + port] = suf[_N + port] = v
        self._free = free
        for i in range(_N - 1, 0, -1):
            self._combine(i)

    def _combine(self, i: int) -> None:
        best, pre, suf = self._best, self._pre, self._suf
        left = 2 * i
        right = left + 1
        half = _N >> i.bit_length()  # length of each child
        pl = pre[left]
        sr = suf[right]
        pre[i] = pl if pl < half else half + pre[right]
        suf[i] = sr if sr < half else half + suf[left]
        b = suf[left] + pre[right]
        bl = best[left]
        br = best[right]
        if bl > b:
            b = bl
        if br > b:
            b = br
        best[i] = b

    def _touched(self, start: int, end: int) -> None:
        """Leaves ``[start, end)`` changed: recompute their ancestors before the tree is next read.

        Deferred because a grant at the cursor and a release read nothing from
        the tree: a one-shot lease then costs two leaf updates, and the tree
        catches up once for many of them (at the next search, or ``status``).
        """
        pending = self._pending
        pending.append((start, end))
        if len(pending) >= 256:
            self._settle()

    def _settle(self) -> None:
        """Bring the tree up to date with every leaf change so far.

        Pulling the runs one after another is correct even though each pull
        stops early: a node left unchanged by a pull was already consistent
        with its children, and a stale node on another run's path is repaired
        by that run's own pull.
        """
        pending = self._pending
        if pending:
            for start, end in pending:
                self._pull(start, end)
            pending.clear()

    def _pull(self, start: int, end: int) -> None:
        """Recompute the ancestors of leaves ``[start, end)``.

        The same arithmetic as :meth:`_combine`, inlined (this is the hot path
        of every grant and release), and stopping at the first level where no
        node changed: the ancestors above it then see the same children as
        before, so they are already right.
        """
        best, pre, suf = self._best, self._pre, self._suf
        lo = (start + _N) >> 1
        hi = (end - 1 + _N) >> 1
        half = 1  # length of each child of a node on the current level
        while lo >= 1:
            changed = False
            for i in range(lo, hi + 1):
                left = 2 * i
                right = left + 1
                pl = pre[left]
                sl = suf[left]
                pr = pre[right]
                sr = suf[right]
                p = pl if pl < half else half + pr
                s = sr if sr < half else half + sl
                b = sl + pr
                bl = best[left]
                br = best[right]
                if bl > b:
                    b = bl
                if br > b:
                    b = br
                if p != pre[i] or s != suf[i] or b != best[i]:
                    pre[i] = p
                    suf[i] = s
                    best[i] = b
                    changed = True
            if not changed:
                return
            lo >>= 1
            hi >>= 1
            half <<= 1

    def _find_from(self, pos: int, count: int) -> int | None:
        """Leftmost start ``s >= pos`` of ``count`` free ports, or None."""
        self._settle()
        best, pre, suf = self._best, self._pre, self._suf
        left_nodes: list[int] = []
        right_nodes: list[int] = []
        lo = pos + _N
        hi = 2 * _N
        while lo < hi:
            if lo & 1:
                left_nodes.append(lo)
                lo += 1
            if hi & 1:
                hi -= 1
                right_nodes.append(hi)
            lo >>= 1
            hi >>= 1
        right_nodes.reverse()
        run = 0  # free ports just before the next node, all at or after pos
        for node in left_nodes + right_nodes:
            length = _N >> (node.bit_length() - 1)
            node_start = node * length - _N
            if run + pre[node] >= count:
                return node_start - run
            if best[node] >= count:
                return self._descend(node, count)
            run = run + length if pre[node] == length else suf[node]
        return None

    def _descend(self, node: int, count: int) -> int:
        """Leftmost start of ``count`` free ports inside ``node`` (which has such a run)."""
        best, pre, suf = self._best, self._pre, self._suf
        while node < _N:
            left = 2 * node
            right = left + 1
            if best[left] >= count:
                node = left
            elif suf[left] + pre[right] >= count:
                length = _N >> (right.bit_length() - 1)
                return right * length - _N - suf[left]
            else:
                node = right
        return node - _N
