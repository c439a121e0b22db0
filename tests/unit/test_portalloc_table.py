"""The pure half of the fedimint-portalloc share: parse, render, caps, and the block plan.

Plain calls and hypothesis. What the crate would read is checked with the crate
stand-in's strict loader (``tests/portalloc_crate.py``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portlease.broker import portalloc as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import portalloc_crate as crate

NOW = 1_800_000_000.25


def crate_reads(data: bytes) -> tuple[int, dict[int, tuple[int, int]]]:
    """What the crate would load from ``data`` (raises crate.Unreadable if it cannot)."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pl-unit-{os.getpid()}.json"
    path.write_bytes(data)
    try:
        return crate.load(str(path))
    finally:
        path.unlink()


# ------------------------------------------------------------------ parse and render


def test_missing_file_is_empty_and_needs_no_repair() -> None:
    p = pa.parse(None)
    assert p.table == pa.Table() and not p.repair and not p.problems


@pytest.mark.parametrize(
    "data",
    [b"", b"  \n", b"{", b"[]", b"null", b'"x"', b'{"next": 10000}', b'{"keys": []}',
     b'{"next": 10000, "keys": {"10000": {"size": 3,', b"\xff\xfe", b'{"keys": {}, "keys": {}}',
     b'{"next": NaN, "keys": {}}'],
)
def test_corrupt_table_is_repaired_readably(data: bytes) -> None:
    p = pa.parse(data)
    assert p.repair and p.problems
    nxt, keys = crate_reads(pa.render(p.table))
    assert keys == {} and nxt == 10000


def test_lenient_entries_are_fixed_and_others_kept() -> None:
    data = json.dumps({
        "next": 12345,
        "keys": {
            "10000": {"size": 3, "expires": 1_800_000_100, "owner": "fedimint"},
            "010010": {"size": 2, "expires": 1_800_000_100},  # non-canonical key
            "10020": {"size": 2.0, "expires": 1_800_000_100.5},  # floats
            "10030": {"size": "4", "expires": 1},  # a string, and long expired
            "10040": {"size": -1, "expires": 5},  # unusable: dropped
            "abc": {"size": 1, "expires": 5},  # unusable: dropped
            "65530": {"size": 10, "expires": 1_800_000_100},  # past 65535: cut
        },
        "comment": ["kept", 1],
    }).encode()
    p = pa.parse(data)
    assert p.repair
    t = p.table
    assert t.next == 12345 and t.extra == {"comment": ["kept", 1]}
    assert t.keys[10000] == pa.Entry(3, 1_800_000_100, {"owner": "fedimint"})
    assert t.keys[10010] == pa.Entry(2, 1_800_000_100)
    assert t.keys[10020] == pa.Entry(2, 1_800_000_101)
    assert t.keys[10030] == pa.Entry(4, 1)
    assert t.keys[65530] == pa.Entry(5, 1_800_000_100)
    assert set(t.keys) == {10000, 10010, 10020, 10030, 65530}
    nxt, keys = crate_reads(pa.render(t))
    assert nxt == 12345 and keys[10020] == (2, 1_800_000_101)


def test_clean_table_needs_no_repair() -> None:
    data = b'{"next": 10003, "keys": {"10000": {"size": 3, "expires": 99}}}'
    p = pa.parse(data)
    assert not p.repair and not p.problems
    assert pa.parse(pa.render(p.table)).table == p.table


@pytest.mark.parametrize("depth", [*range(960, 1000, 3), 5000])
def test_deeply_nested_fields_are_dropped_and_never_raise(depth: int) -> None:
    """Issue 20: a ~2 KB table nested 982 deep made json.dumps raise RecursionError in
    the broker's render, which crashed it (and 981 deep at every restart).

    Run in a fresh thread: the broker parses and renders near the bottom of a worker
    thread's stack, where json.loads still reads what json.dumps can no longer write.
    """
    nested = "[" * depth + "]" * depth
    results: list[object] = []

    def work() -> None:
        try:
            for data in (f'{{"next": 10000, "keys": {{}}, "x": {nested}}}',
                         f'{{"keys": {{"10000": {{"size": 1, "expires": 9, "x": {nested}}}}}}}'):
                p = pa.parse(data.encode())  # never raises
                assert p.repair and "x" not in p.table.extra
                assert all("x" not in e.extra for e in p.table.keys.values())
                out = pa._render(p.table)  # the plain renderer: nothing left that it cannot write
                results.append(crate_reads(out)[1])
        except BaseException as exc:
            results.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert all(r in ({}, {10000: (1, 9)}) for r in results), results


def test_render_never_raises_on_what_cannot_be_written() -> None:
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    t = pa.Table({10000: pa.Entry(1, 5, {"x": deep})}, 10001, {"y": deep})
    assert crate_reads(pa.render(t)) == (10001, {10000: (1, 5)})


def test_huge_values_are_quoted_short_in_problems() -> None:
    """Issue 20: an 8 MB "next" string gave an 8 MB log line per grant."""
    huge = "9" * (8 << 20)
    p = pa.parse(json.dumps({"next": huge, "keys": {"x" * 100_000: {}}}).encode())
    assert p.repair and p.table.next == pa.LOW
    assert p.problems and all(len(m) < 300 for m in p.problems), [len(m) for m in p.problems]
    assert len(pa.quote("x" * 10_000)) < 120 and len(pa.quote(list(range(10_000)))) < 120


def test_too_many_entries_or_bytes_is_corrupt() -> None:
    """Issue 20: 65,535 entries made every request cost 74 ms; a table is capped."""
    keys = {str(1 + i): {"size": 1, "expires": 2_000_000_000} for i in range(65_535)}
    p = pa.parse(json.dumps({"keys": keys}, separators=(",", ":")).encode())
    assert p.repair and p.table.keys == {}
    assert "entries" in p.problems[0] or "bytes" in p.problems[0]
    assert pa.parse(b" " * (pa.MAX_TABLE_BYTES + 1)).repair
    few = {str(10000 + i): {"size": 1, "expires": 2_000_000_000} for i in range(pa.MAX_ENTRIES)}
    assert len(pa.parse(json.dumps({"keys": few}).encode()).table.keys) == pa.MAX_ENTRIES


def test_expiry_far_ahead_is_cut_back_and_reported() -> None:
    """Issue 20: {"size": 55535, "expires": u64::MAX} made every grant exhausted for ever."""
    data = b'{"keys": {"10000": {"size": 55535, "expires": 18446744073709551615},' \
           b' "20": {"size": 1, "expires": 1800000100}}}'
    p = pa.parse(data)
    assert not p.repair
    pa.cap_expiries(p, NOW)
    limit = int(NOW) + 1 + pa.CRATE_RESERVATION + pa.EXPIRY_SLACK
    assert p.repair and p.table.keys[10000].expires == limit
    assert p.table.keys[20].expires == 1_800_000_100  # within 120 s: untouched
    assert "10000" in p.problems[-1] and "cut back" in p.problems[-1]
    mine = {10000: pa.Entry(55535, 18446744073709551615)}
    p2 = pa.parse(data)
    pa.cap_expiries(p2, NOW, mine)  # our own entries are never cut
    assert not p2.repair


# ------------------------------------------------------------------ runs


def test_runs_helpers() -> None:
    assert pa.union([(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]) == [(0, 4), (5, 12)]
    assert pa.subtract([(0, 10), (20, 30)], [(2, 4), (9, 21), (25, 26)]) == [
        (0, 2), (4, 9), (21, 25), (26, 30)]
    assert pa.overlaps([(0, 5)], [(4, 6)]) and not pa.overlaps([(0, 5)], [(5, 6)])
    assert pa.first_overlap(10, 5, [(0, 10), (14, 2)]) == 16
    assert pa.first_overlap(10, 4, [(0, 10), (14, 2)]) is None
    assert pa.block_size(10000, 32000) == 64 and pa.block_size(100, 199) == 6


# ------------------------------------------------------------------ the block plan


def _entries(n: int, start: int = 10000, expires: int = int(NOW) + 100) -> dict[int, pa.Entry]:
    return {start + 2 * i: pa.Entry(1, expires) for i in range(n)}


def test_a_block_is_placed_clear_of_live_entries_and_expired_ones_under_it_go() -> None:
    t = pa.Table({20000: pa.Entry(10, int(NOW) + 50), 20010: pa.Entry(5, int(NOW) - 1)}, 10003)
    p = pa.plan(t, NOW, mine={}, leases=[], low=20000, high=20099, block=16, need=1)
    assert p.placed and p.changed and p.foreign == [(20000, 10)]
    assert p.ours == {20010: pa.Entry(16, int(NOW) + 121)}
    assert 20010 in p.table.keys and p.table.keys[20000] == t.keys[20000]
    assert p.table.next == 10003 and p.cursor == 20026
    # Nothing needed, our block intact and fresh: nothing changes.
    again = pa.plan(p.table, NOW + 5, mine=p.ours, leases=[(20011, 1)], low=20000, high=20099,
                    block=16)
    assert not again.changed and again.ours == p.ours and again.placed is None


def test_blocks_renew_before_they_lapse_and_empty_ones_go_back() -> None:
    mine = {20000: pa.Entry(16, int(NOW) + 80), 20016: pa.Entry(16, int(NOW) + 80),
            20032: pa.Entry(16, int(NOW) + 80)}
    t = pa.Table(dict(mine), 10000)
    p = pa.plan(t, NOW, mine=mine, leases=[(20040, 2)], low=20000, high=20099, block=16, spare=1)
    # The block with a lease stays and is renewed; one empty spare stays; the other goes.
    assert set(p.ours) == {20000, 20032}
    assert all(e.expires == int(NOW) + 121 for e in p.ours.values())
    assert 20016 not in p.table.keys


def test_a_block_someone_removed_is_retaken_only_where_no_live_entry_lies() -> None:
    mine = {20000: pa.Entry(16, int(NOW) + 100)}
    t = pa.Table({20004: pa.Entry(3, int(NOW) + 100)})  # ours deleted, the crate took 20004-6
    p = pa.plan(t, NOW, mine=mine, leases=[(20001, 1), (20005, 1)], low=20000, high=20099,
                block=16)
    assert any("changed or removed" in m for m in p.problems)
    assert any("20005-20005" in m and "in use twice" in m for m in p.problems)
    spans = sorted((b, e.size) for b, e in p.ours.items())
    assert spans == [(20000, 4), (20007, 9)]
    assert p.table.keys[20004] == t.keys[20004]


def test_restored_leases_get_few_entries() -> None:
    leases = [(20000 + 3 * i, 1) for i in range(500)]  # scattered, as a restart finds them
    p = pa.plan(pa.Table(), NOW, mine={}, leases=leases, low=20000, high=29999, block=64)
    assert len(p.ours) <= 30
    covered = {q for b, e in p.ours.items() for q in range(b, b + e.size)}
    assert all(s in covered for s, _ in leases)


def test_two_thousand_leases_are_tens_of_entries() -> None:
    """The point of blocks: the crate's cost grows with entries, not with our leases."""
    mine: dict[int, pa.Entry] = {}
    t = pa.Table()
    leases: list[tuple[int, int]] = []
    cursor = None
    free: list[int] = []
    for _ in range(2000):
        if not free:
            p = pa.plan(t, NOW, mine=mine, leases=leases, low=10000, high=32000, block=64,
                        need=1, cursor=cursor)
            assert p.placed
            added = set(p.ours) - set(mine)
            t, mine, cursor = p.table, p.ours, p.cursor
            free = [q for b in sorted(added) for q in range(b, b + mine[b].size)][::-1]
        leases.append((free.pop(), 1))
    assert len(t.keys) <= 40


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    foreign=st.dictionaries(st.integers(20000, 20200),
                            st.tuples(st.integers(0, 12), st.integers(-30, 200)), max_size=10),
    mine_raw=st.dictionaries(st.integers(20000, 20200), st.tuples(st.integers(1, 20),
                             st.integers(20, 130), st.booleans()), max_size=6),
    leases=st.lists(st.tuples(st.integers(20000, 20200), st.integers(1, 6)), max_size=10),
    need=st.integers(0, 30),
    block=st.integers(1, 20),
)
def test_plan_invariants(
    foreign: dict[int, tuple[int, int]],
    mine_raw: dict[int, tuple[int, int, bool]],
    leases: list[tuple[int, int]],
    need: int,
    block: int,
) -> None:
    now = NOW
    t = pa.Table({b: pa.Entry(s, int(now) + d) for b, (s, d) in foreign.items()}, 10000)
    mine: dict[int, pa.Entry] = {}
    for b, (s, d, present) in mine_raw.items():
        e = pa.Entry(s, int(now) + d)
        mine[b] = e
        if present and not any(b < fb + fs and fb < b + s for fb, (fs, _) in foreign.items()) \
                and not any(b < mb + me.size and mb < b + s for mb, me in mine.items() if mb != b):
            t.keys[b] = e
    p = pa.plan(t, now, mine=mine, leases=leases, low=20000, high=20250, block=block, need=need)
    out = p.table
    live_foreign = [(b, b + e.size) for b, e in out.keys.items()
                    if b not in p.ours and e.size and e.live(now)]
    ours = sorted((b, b + e.size) for b, e in p.ours.items())
    # Ours are in the table as planned, disjoint, live for the whole grant margin.
    for i, (s, e) in enumerate(ours):
        assert out.keys[s] == p.ours[s] and s < e
        assert i == 0 or ours[i - 1][1] <= s
        assert p.ours[s].expires > now + 60
    # Never over a live entry that is not ours, which all survive untouched.
    assert not pa.overlaps(ours, live_foreign)
    for b, e in t.keys.items():
        if e.size and e.live(now) and b not in pa.intact(t, mine):
            assert out.keys[b] == e
    # Every lease port is covered, by a block of ours or by a live foreign entry.
    cover = pa.union([*ours, *live_foreign])
    for s, n in leases:
        assert not pa.subtract([(s, s + n)], cover), (s, n)
    # A placed block has room for the need, clear of leases, within the range.
    if need and p.placed:
        lease_runs = pa.union((s, s + n) for s, n in leases)
        assert any(e - s >= need and s >= 20000 and e <= 20251
                   and not pa.overlaps([(s, e)], lease_runs) for s, e in ours)
    # And the crate can read what would be written.
    assert crate_reads(pa.render(out))[1] == {b: (e.size, e.expires) for b, e in out.keys.items()}


entries = st.builds(
    pa.Entry,
    size=st.integers(0, 40),
    expires=st.integers(int(NOW) - 50, int(NOW) + 50),
    extra=st.dictionaries(st.sampled_from(["owner", "pid", "note"]), st.integers() | st.text()),
)
tables = st.builds(
    pa.Table,
    keys=st.dictionaries(st.integers(10000, 10300), entries, max_size=12),
    next=st.none() | st.integers(0, 65535),
    extra=st.dictionaries(st.sampled_from(["comment", "version"]), st.integers() | st.text()),
)


@given(tables)
@settings(max_examples=200, deadline=None)
def test_render_parse_round_trip(table: pa.Table) -> None:
    data = pa.render(table)
    p = pa.parse(data)
    assert not p.repair and p.table == table
    nxt, keys = crate_reads(data)
    assert nxt == (10000 if table.next is None else table.next)
    assert keys == {b: (e.size, e.expires) for b, e in table.keys.items()}


@given(st.binary(max_size=200) | st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["next", "keys", "size", "expires", "10000", "x", "07"]), inner,
        max_size=4),
    max_leaves=20,
).map(lambda v: json.dumps(v).encode()))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_input_parses_to_a_crate_readable_table(data: bytes) -> None:
    p = pa.parse(data)  # never raises
    crate_reads(pa.render(p.table))  # raises Unreadable if the crate could not read it
    if not p.repair:  # if we say it is fine, the crate must read it as it is
        crate_reads(data)
