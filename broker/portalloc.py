"""fedimint-portalloc's table, and the broker's blocks in it: parse, check, render, plan. Pure.

Rust test suites that call ``fedimint_portalloc::port_alloc`` coordinate through a
directory (``$FM_PORTALLOC_DATA_DIR``) holding ``lock`` (an exclusive ``flock`` on it
guards every access) and ``fm-portalloc.json``::

    {"next": 10015, "keys": {"10000": {"size": 3, "expires": 1731688200}}}

The crate skips every run that overlaps a live entry (``now < expires``), starts its
search at ``next``, reserves a run for 120 s, and writes the table as
``fm-portalloc.tmp`` + fdatasync + rename. It reads and writes the whole table
unbuffered on every call, so every entry in the table makes every crate call on the
host slower, whoever wrote it.

With ``portalloc_dir`` set the broker therefore publishes **blocks**, not leases:
it reserves whole runs of its range as entries of its own (:func:`plan`), keeps
their ``expires`` ahead, grants inside them without touching the crate's lock,
and takes the lock only to take, renew or return a block. A few tens of entries
cover thousands of leases.

Nothing here touches a file, a clock or a thread: the caller passes the bytes and
the time in (:mod:`portlease.broker.portalloc_files` does the I/O, with the
directory treated as hostile). Nothing here raises on a bad table: problems come
back as short sentences for the log, every value quoted in them cut to
:data:`QUOTE_CHARS`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

LOW: Final = 10000
"""Where the crate starts when ``next`` is absent, and where it wraps to."""
HIGH: Final = 32000
"""The crate wraps to LOW once its candidate base passes this."""
CRATE_RESERVATION: Final = 120
"""Seconds the crate reserves a run for; also how far ahead the broker's blocks reach."""
EXPIRY_SLACK: Final = 10
"""Seconds a foreign entry may reach beyond CRATE_RESERVATION before it is cut back."""
U16_MAX: Final = 65535
U64_MAX: Final = 2**64 - 1

LOCK_NAME: Final = "lock"
DATA_NAME: Final = "fm-portalloc.json"
TMP_NAME: Final = "fm-portalloc.tmp"

MAX_TABLE_BYTES: Final = 2 * 1024 * 1024
"""A larger table is not read (it is repaired as corrupt). The crate cannot keep more
than about 2,000 live entries (~140 kB) at all: each call costs ~57 µs per entry under
the lock, so n entries made within 120 s need n²·57 µs/2 of lock time."""
MAX_ENTRIES: Final = 8192
"""Entries read from a table at most; a table with more is repaired as corrupt."""
MAX_DEPTH: Final = 32
"""Unknown fields nested deeper are dropped (serde_json itself refuses depth 128)."""
QUOTE_CHARS: Final = 80
"""A value quoted in a message is cut to this many characters."""
DEFAULT_BLOCK: Final = 64
"""Ports per block in a large range (a range of n ports uses min(64, n // 16))."""

_CANONICAL_KEY = re.compile(r"0|[1-9][0-9]*")
_DIGITS = re.compile(r"[0-9]+")


Span = tuple[int, int]
"""(start, size): a run of ports."""


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` for a log message, never longer than about ``limit`` characters."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"… ({len(value):,} characters)"
    if isinstance(value, (dict, list)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value):,} items>"
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "…"


class LeaseLike(Protocol):
    """A live lease as the broker keeps it: its run, and its end (None while attached)."""

    @property
    def start(self) -> int: ...

    @property
    def count(self) -> int: ...

    @property
    def expires(self) -> float | None: ...


def snapshot(leases: Iterable[LeaseLike], now: float) -> dict[int, tuple[int, float | None]]:
    """The broker's live leases: base -> (count, seconds left or None while attached)."""
    return {
        lease.start: (lease.count, None if lease.expires is None else lease.expires - now)
        for lease in leases
    }


def block_size(low: int, high: int) -> int:
    """Ports per block for the range ``low``-``high``: 64, or less in a small range."""
    return max(1, min(DEFAULT_BLOCK, (high - low + 1) // 16))


# ------------------------------------------------------------------ the table


@dataclass(frozen=True, slots=True)
class Entry:
    """One value of ``keys``: a run of ``size`` ports from its base, live while now < expires."""

    size: int
    expires: int
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Fields the crate does not know; serde ignores them on read, so they are kept."""

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


def _depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests (0 for a scalar), counting no further than ``limit + 1``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children: Iterable[Any] = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        d += 1
        if d > deepest:
            deepest = d
            if d > limit:
                return d
        stack.extend((c, d) for c in children)
    return deepest


def _as_uint(value: Any, limit: int, *, round_up: bool = False) -> tuple[int | None, bool]:
    """Read an unsigned integer leniently: (value or None if unusable, needed repair)."""
    if isinstance(value, bool):  # bool is an int to Python, never to serde
        return None, True
    if isinstance(value, int):
        return (value, False) if 0 <= value <= limit else (None, True)
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        number = math.ceil(value) if round_up else int(value)
        return (number, True) if number <= limit and (round_up or number == value) else (None, True)
    if isinstance(value, str) and len(value) <= 20 and _DIGITS.fullmatch(value):
        number = int(value)
        return (number, True) if number <= limit else (None, True)
    return None, True


def empty_table() -> Table:
    """What a missing or unreadable table is replaced with: crate-readable, ``next`` explicit.

    ``next`` is written out even though serde defaults it, so that a crate version
    whose missing-file default is not LOW still starts in its own range.
    """
    return Table(next=LOW)


def corrupt(why: str) -> Parsed:
    """A table that is not used as it is (``why`` says so) and is replaced by an empty one."""
    return Parsed(empty_table(), [f"{DATA_NAME}: {why}; replaced by an empty table"], True)


def _kept_extra(obj: Mapping[str, Any], known: tuple[str, ...], where: str,
                problems: list[str]) -> tuple[dict[str, Any], bool]:
    """The unknown fields of ``obj`` worth keeping, and whether some were dropped."""
    extra: dict[str, Any] = {}
    dropped = False
    for name, value in obj.items():
        if name in known:
            continue
        if _depth(value, MAX_DEPTH) > MAX_DEPTH:
            problems.append(f"{DATA_NAME}: {where} field {quote(name)} nests deeper than "
                            f"{MAX_DEPTH}; dropped")
            dropped = True
            continue
        extra[name] = value
    return extra, dropped


def parse(data: bytes | None) -> Parsed:
    """Read the table leniently; never raises.

    ``None`` means the file does not exist (the crate treats that as empty: no
    repair needed). Unusable entries are dropped, fixable ones fixed (a float
    ``expires`` rounded up, a ``"12"`` string read as 12, a run past 65535 cut),
    and everything else, including fields the crate does not know, is kept
    (unless it nests deeper than :data:`MAX_DEPTH`). More than :data:`MAX_TABLE_BYTES`
    or :data:`MAX_ENTRIES` is corrupt.
    """
    if data is None:
        return Parsed(Table(), [], repair=False)
    if len(data) > MAX_TABLE_BYTES:
        return corrupt(f"larger than {MAX_TABLE_BYTES:,} bytes")
    try:
        root = json.loads(
            data.decode("utf-8"), object_pairs_hook=_object_pairs, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return corrupt("empty file" if not data.strip() else f"not JSON ({quote(str(exc))})")
    if not isinstance(root, _Obj):
        return corrupt(f"top level is {type(root).__name__}, not an object")
    problems: list[str] = []
    repair = root.duplicate
    if root.duplicate:
        problems.append(f"{DATA_NAME}: a top-level field occurs twice; rewritten once")
    extra, dropped = _kept_extra(root, ("next", "keys"), "top-level", problems)
    table = Table(extra=extra)
    repair = repair or dropped
    if "next" in root:
        nxt, fixed = _as_uint(root["next"], U16_MAX)
        if nxt is None:
            problems.append(f"{DATA_NAME}: bad next {quote(root['next'])}; reset to {LOW}")
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
    if len(keys) > MAX_ENTRIES:
        return corrupt(f"{len(keys):,} entries, more than {MAX_ENTRIES:,}")
    dropped_keys: list[str] = []
    for name, value in keys.items():
        base = int(name) if len(name) <= 6 and _DIGITS.fullmatch(name) else None
        if base is None or base > U16_MAX or not isinstance(value, _Obj):
            dropped_keys.append(name)
            continue
        # "010000" reads as 10000 to us; whether serde agrees is not worth betting on.
        fixed = not _CANONICAL_KEY.fullmatch(name) or value.duplicate
        size, size_fixed = _as_uint(value.get("size"), U16_MAX)
        # Rounding a fractional expiry up keeps the reservation at least as long.
        expires, exp_fixed = _as_uint(value.get("expires"), U64_MAX, round_up=True)
        if size is None or expires is None:
            dropped_keys.append(name)
            continue
        fixed = fixed or size_fixed or exp_fixed
        if base + size > U16_MAX:
            # The crate computes `base + size` in u16: this entry would overflow it.
            problems.append(f"{DATA_NAME}: entry {base} runs past port {U16_MAX}; cut to fit")
            size, fixed = U16_MAX - base, True
        entry_extra, deep = _kept_extra(value, ("size", "expires"), f"entry {base}", problems)
        entry = Entry(size, expires, entry_extra)
        if base in table.keys:  # "10000" and "010000": keep the longer reservation
            fixed = True
            old = table.keys[base]
            entry = Entry(max(size, old.size), max(expires, old.expires),
                          entry_extra or old.extra)
        table.keys[base] = entry
        repair = repair or fixed or deep
    if dropped_keys:
        shown = ", ".join(quote(d, 12) for d in dropped_keys[:5])
        more = ", …" if len(dropped_keys) > 5 else ""
        problems.append(f"{DATA_NAME}: dropped {len(dropped_keys)} unreadable entries ({shown}{more})")
        repair = True
    elif repair and not problems:
        problems.append(f"{DATA_NAME}: entries in a form the crate cannot read; normalised")
    return Parsed(table, problems, repair)


def cap_expiries(parsed: Parsed, now: float, keep: Iterable[int] = (),
                 *, limit: float = CRATE_RESERVATION + EXPIRY_SLACK) -> None:
    """Cut every entry expiring more than ``limit`` seconds after ``now`` back to then.

    The crate only ever reserves 120 s ahead; an entry reaching further (a hand
    edit, a hostile member: ``"expires": 18446744073709551615``) would otherwise
    hold its ports for ever. Entries at the bases in ``keep`` (the broker's own)
    are left alone. Changes ``parsed`` in place: the cut is a repair.
    """
    horizon = math.ceil(now + limit)
    mine = set(keep)
    cut: list[int] = []
    for base, e in parsed.table.keys.items():
        if e.expires > horizon and base not in mine:
            parsed.table.keys[base] = Entry(e.size, horizon, e.extra)
            cut.append(base)
    if cut:
        shown = ", ".join(str(b) for b in sorted(cut)[:5]) + (", …" if len(cut) > 5 else "")
        parsed.problems.append(
            f"{DATA_NAME}: {len(cut)} entries ({shown}) expired more than {limit:g} s ahead, "
            f"further than the crate ever reserves; cut back to {horizon}")
        parsed.repair = True


def _entry_json(base: int, e: Entry) -> str:
    if e.extra:
        body = json.dumps({"size": e.size, "expires": e.expires, **e.extra}, allow_nan=False)
    else:
        body = f'{{"size": {e.size}, "expires": {e.expires}}}'
    return f'    "{base}": {body}'


def _render(table: Table) -> bytes:
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


def render(table: Table) -> bytes:
    """The JSON the crate reads: ``next`` (if any), ``keys`` by ascending base, then extras.

    Never raises: a field that cannot be written out (too deep, not JSON) is left
    out, and the unknown fields go with it.
    """
    try:
        return _render(table)
    except (ValueError, TypeError, RecursionError):
        bare = Table({b: Entry(e.size, e.expires) for b, e in table.keys.items()}, table.next)
        return _render(bare)


# ------------------------------------------------------------------ runs of ports


def first_overlap(start: int, count: int, ranges: Iterable[tuple[int, int]]) -> int | None:
    """The end of the first range overlapping ``[start, start+count)`` (where to retry), or None."""
    end = start + count
    for s, n in ranges:
        if s < end and start < s + n:
            return s + n
    return None


def union(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``[s, e)`` covering the same ports as the ``[s, e)`` in ``spans``."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if s >= e:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def subtract(runs: Iterable[tuple[int, int]], holes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ports of ``runs`` (``[s, e)``) not in ``holes`` (``[s, e)``), as sorted ``[s, e)``."""
    cover = union(holes)
    out: list[tuple[int, int]] = []
    j = 0
    for s, e in union(runs):
        while j < len(cover) and cover[j][1] <= s:
            j += 1
        k = j
        cur = s
        while cur < e and k < len(cover) and cover[k][0] < e:
            hs, he = cover[k]
            if hs > cur:
                out.append((cur, hs))
            cur = max(cur, he)
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def overlaps(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]]) -> bool:
    """True when some ``[s, e)`` of ``a`` shares a port with some ``[s, e)`` of ``b``."""
    ua, ub = union(a), union(b)
    i = j = 0
    while i < len(ua) and j < len(ub):
        if ua[i][0] < ub[j][1] and ub[j][0] < ua[i][1]:
            return True
        if ua[i][1] <= ub[j][1]:
            i += 1
        else:
            j += 1
    return False


def _free_run(low: int, high: int, size: int, taken: list[tuple[int, int]], cursor: int) -> int | None:
    """The first start ``s`` at or after ``cursor`` (then from ``low``) with ``[s, s+size)``
    inside ``[low, high]`` and clear of ``taken`` (sorted, disjoint ``[s, e)``)."""
    for origin in (max(cursor, low), low):
        s = origin
        for ts, te in taken:
            if te <= s:
                continue
            if s + size <= ts:
                break
            s = max(s, te)
        if s + size - 1 <= high:
            return s
    return None


# ------------------------------------------------------------------ the broker's blocks


def intact(table: Table, mine: Mapping[int, Entry]) -> dict[int, Entry]:
    """Our entries still in ``table`` exactly as we wrote them (base, size and expires).

    An entry the crate wrote is never exactly one of ours: it would have needed ours
    to lapse first and then pick the same base, size *and* second. A member who edits
    our entry makes it foreign to us, which is the safe reading.
    """
    out: dict[int, Entry] = {}
    for base, ours in mine.items():
        e = table.keys.get(base)
        if e is not None and e.size == ours.size and e.expires == ours.expires:
            out[base] = e
    return out


def foreign_spans(table: Table, now: float, mine: Mapping[int, Entry]) -> list[Span]:
    """Live entries that are not ours (as :func:`intact` tells), as sorted (start, size)."""
    ours = intact(table, mine)
    return sorted(
        (base, e.size) for base, e in table.keys.items()
        if base not in ours and e.size > 0 and e.live(now)
    )


@dataclass(slots=True)
class Plan:
    """What one exchange under the crate's lock does (from :func:`plan`)."""

    table: Table
    """The table to write when ``changed``."""
    ours: dict[int, Entry]
    """Our blocks as they are in ``table``: grant only inside these."""
    foreign: list[Span]
    """Live entries that are not ours: never granted, never published over."""
    changed: bool
    placed: bool | None
    """Whether a block with room for ``need`` was added (None: nothing was needed)."""
    cursor: int
    """Where the next block search starts."""
    problems: list[str]


def plan(
    table: Table,
    now: float,
    *,
    mine: Mapping[int, Entry],
    leases: Iterable[Span],
    low: int,
    high: int,
    block: int,
    need: int = 0,
    spare: int = 1,
    cursor: int | None = None,
    horizon: float = CRATE_RESERVATION,
    renew_after: float = 30.0,
) -> Plan:
    """Our blocks for the table as read under the lock, and the table to write.

    ``mine`` is what we last wrote (base -> Entry); ``leases`` are the broker's live
    leases as (start, count). The result:

    - keeps each of our blocks still intact in the table (or, lost to an edit, not
      overlapped by a live foreign entry) that holds a lease, plus ``spare`` empty
      ones; the others go back to the crate;
    - cuts our blocks and covers our leases around live foreign entries, so entries
      never overlap (a lease that overlaps one is reported: a port may be used twice);
    - covers every lease port no block covers (restored leases after a restart);
    - with ``need``, adds one block of ``max(block, need)`` ports clear of every live
      entry (``placed`` says whether one fitted), searched from ``cursor``;
    - gives each block ``expires = ceil(now + horizon)`` when it was written more than
      ``renew_after`` seconds ago (by its expiry) or is new.

    Entries we do not own are kept, except expired ones lying under a block.
    Cost: sorts and sweeps over the table and the leases, no product of the two.
    """
    problems: list[str] = []
    keys = dict(table.keys)
    still = intact(table, mine)
    for base in still:
        del keys[base]
    foreign_live = sorted((b, b + e.size) for b, e in keys.items() if e.size > 0 and e.live(now))
    foreign_cover = union(foreign_live)
    lease_runs = union((s, s + n) for s, n in leases if n > 0)
    lost = [b for b in mine if b not in still]
    if lost:
        problems.append(
            f"{len(lost)} of our blocks ({', '.join(str(b) for b in sorted(lost)[:5])}"
            f"{', …' if len(lost) > 5 else ''}) were changed or removed by someone else; "
            "taken back where no live entry overlaps them")
    # Our blocks, cut around live foreign entries (a lost block, or one a member wrote
    # an entry over) and around each other (as we wrote them, they never overlap).
    pieces: list[tuple[int, int, bool]] = []  # (start, end, intact as it stands)
    taken = list(foreign_cover)
    for base, e in sorted(mine.items(), key=lambda be: (be[0] not in still, be[0])):
        cut = subtract([(base, base + e.size)], taken)
        whole = cut == [(base, base + e.size)]
        if not whole and base in still:
            problems.append(f"our block {base}+{e.size} overlaps live entries; cut around them")
        pieces.extend((s, t, whole and base in still) for s, t in cut)
        taken = union([*taken, *cut])
    pieces.sort()
    # Which pieces hold a lease: one sweep, both sorted.
    busy: list[bool] = []
    j = 0
    for s, t, _ in pieces:
        while j < len(lease_runs) and lease_runs[j][1] <= s:
            j += 1
        busy.append(j < len(lease_runs) and lease_runs[j][0] < t)
    kept: list[tuple[int, int, bool]] = []
    spares = 0
    for piece, used in zip(pieces, busy, strict=True):
        if used:
            kept.append(piece)
        elif spares < spare:
            kept.append(piece)
            spares += 1
    kept_runs = [(s, t) for s, t, _ in kept]
    # Leases no block covers: cover them, around live foreign entries, gaps of up to a
    # block joined so that many small leases make few entries.
    uncovered = subtract(lease_runs, kept_runs)
    clash = [r for r in uncovered if overlaps([r], foreign_cover)]
    if clash:
        shown = ", ".join(f"{s}-{t - 1}" for s, t in clash[:5])
        problems.append(f"leases on ports {shown} overlap live fedimint-portalloc entries: "
                        "those ports may be in use twice")
    patches: list[tuple[int, int]] = []
    blocked = union([*foreign_cover, *kept_runs])
    for s, t in subtract(uncovered, foreign_cover):
        if patches and s - patches[-1][1] <= block and not overlaps(
                [(patches[-1][1], s)], blocked):
            patches[-1] = (patches[-1][0], t)
        else:
            patches.append((s, t))
    new_runs = [(s, min(t, U16_MAX), False) for s, t in patches if s < U16_MAX]
    all_ours = sorted([*kept, *new_runs])
    placed: bool | None = None
    next_cursor = low if cursor is None else cursor
    if need > 0:
        taken = union([*foreign_cover, *((s, t) for s, t, _ in all_ours), *lease_runs])
        start = None
        for size in dict.fromkeys((max(block, need), need)):
            start = _free_run(low, high, size, taken, next_cursor)
            if start is not None:
                all_ours = sorted([*all_ours, (start, start + size, False)])
                next_cursor = start + size if start + size <= high else low
                break
        placed = start is not None
        if not placed:
            problems.append(f"no run of {need} ports in {low}-{high} is clear of the "
                            "table's live entries")
    target = math.ceil(now + horizon)
    ours: dict[int, Entry] = {}
    for s, t, was_intact in all_ours:
        old = still.get(s)
        if was_intact and old is not None and old.size == t - s and old.expires > target - renew_after:
            ours[s] = old
        else:
            ours[s] = Entry(t - s, target)
    # Expired or empty entries lying under one of our blocks go (the crate drops them
    # too); live ones were cut around above. One sweep, both sorted.
    runs = sorted((s, s + e.size) for s, e in ours.items())
    i = 0
    for b in sorted(keys):
        while i < len(runs) and runs[i][1] <= b:
            i += 1
        if i == len(runs):
            break
        e = keys[b]
        if runs[i][0] < b + (e.size or 1) and (not e.size or not e.live(now) or b in ours):
            del keys[b]
    keys.update(ours)
    new = Table(keys=keys, next=table.next, extra=dict(table.extra))
    changed = new.keys != table.keys
    foreign = sorted((s, t - s) for s, t in foreign_live)
    return Plan(new, ours, foreign, changed, placed, next_cursor, problems)


def needs_exchange(parsed: Parsed, now: float, mine: Mapping[int, Entry]) -> list[str]:
    """Why the table as read (without the lock) must be rewritten now; empty if it need not.

    Checked whenever the table changes, so a corrupt table, a foreign entry reaching
    too far ahead, or a block of ours changed by someone else is dealt with at once,
    not at the next renewal.
    """
    why: list[str] = []
    if parsed.repair:
        why.append("the table needs repair")
    if len(intact(parsed.table, mine)) != len(mine):
        why.append("a block of ours was changed or removed")
    return why


def grantable(ours: Mapping[int, Entry], now: float, margin: float) -> list[Span]:
    """Our blocks that may still be granted from: at least ``margin`` seconds before expiry."""
    return sorted((b, e.size) for b, e in ours.items() if e.expires - now >= margin)
