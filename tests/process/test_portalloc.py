"""Interop with fedimint-portalloc's table: the pure merge, and real files, flocks, processes.

The crate's part is played by ``tests/portalloc_crate.py`` (stdlib only, run as its own
process). The broker's part in the multi-process test is played by this file run as a
script (``python tests/process/test_portalloc.py worker …``): a minimal broker that grants runs
through :meth:`PortallocTable.sync` and never binds, so the table is the only thing
keeping the two worlds apart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from portlease.broker import portalloc as pa

HERE = Path(__file__).resolve().parents[1]
CRATE = str(HERE / "portalloc_crate.py")
sys.path.insert(0, str(HERE))
import portalloc_crate as crate  # noqa: E402

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None

NOW = 1_800_000_000.25


def crate_reads(data: bytes, tmp: Path) -> tuple[int, dict[int, tuple[int, int]]]:
    """What the crate would load from ``data`` (raises crate.Unreadable if it cannot)."""
    path = tmp / "probe.json"
    path.write_bytes(data)
    return crate.load(str(path))


def run_crate(
    d: Path, *args: str, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, CRATE, "--dir", str(d), *args],
        capture_output=True, text=True, timeout=30, check=check, **kw,
    )


# ------------------------------------------------------------------ pure part


def test_missing_file_is_empty_and_needs_no_repair() -> None:
    p = pa.parse(None)
    assert p.table == pa.Table() and not p.repair and not p.problems


@pytest.mark.parametrize(
    "data",
    [b"", b"  \n", b"{", b"[]", b"null", b'"x"', b'{"next": 10000}', b'{"keys": []}',
     b'{"next": 10000, "keys": {"10000": {"size": 3,', b"\xff\xfe", b'{"keys": {}, "keys": {}}',
     b'{"next": NaN, "keys": {}}'],
)
def test_corrupt_table_is_repaired_readably(data: bytes, tmp_path: Path) -> None:
    p = pa.parse(data)
    assert p.repair and p.problems
    nxt, keys = crate_reads(pa.render(p.table), tmp_path)
    assert keys == {}
    assert nxt == 10000


def test_lenient_entries_are_fixed_and_others_kept(tmp_path: Path) -> None:
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
    nxt, keys = crate_reads(pa.render(t), tmp_path)
    assert nxt == 12345 and keys[10020] == (2, 1_800_000_101)


def test_clean_table_needs_no_repair() -> None:
    data = b'{"next": 10003, "keys": {"10000": {"size": 3, "expires": 99}}}'
    p = pa.parse(data)
    assert not p.repair and not p.problems
    assert pa.parse(pa.render(p.table)).table == p.table


def test_merge_publishes_refreshes_and_removes_only_ours() -> None:
    crate_entry = pa.Entry(3, int(NOW) + 100)
    t = pa.Table(keys={10000: crate_entry}, next=10003)
    m = pa.merge(t, NOW, {20000: (5, None), 20010: (2, 30.0), 20020: (1, -1.0)}, set())
    assert m.table.next == 10003 and m.table.keys[10000] == crate_entry
    assert m.table.keys[20000] == pa.Entry(5, int(NOW) + 121)  # ceil(now + 120)
    assert m.table.keys[20010] == pa.Entry(2, int(NOW) + 31)  # the lease's own end is sooner
    assert 20020 not in m.table.keys  # already lapsed
    # 5 s later nothing moves (slack), 60 s later the expiry is pushed forward.
    owned = pa.owned_bases(m.table, {}, m.published)
    assert owned == {20000, 20010}
    m2 = pa.merge(m.table, NOW + 5, {20000: (5, None)}, owned)
    assert m2.table.keys[20000] == m.table.keys[20000] and 20010 not in m2.table.keys
    owned = pa.owned_bases(m2.table, {}, m2.published)
    m3 = pa.merge(m2.table, NOW + 60, {20000: (5, None)}, owned)
    assert m3.table.keys[20000].expires == int(NOW) + 181
    # Released: our entry goes, the crate's stays.
    m4 = pa.merge(m3.table, NOW + 61, {}, pa.owned_bases(m3.table, {}, m3.published))
    assert m4.table.keys == {10000: crate_entry}


def test_entry_the_crate_rewrote_at_our_base_is_not_ours() -> None:
    published = {20000: pa.Entry(5, int(NOW) + 121)}
    t = pa.Table(keys={20000: pa.Entry(5, int(NOW) + 200)})  # crate took it after ours lapsed
    assert pa.owned_bases(t, {}, published) == set()
    assert pa.foreign_ranges(t, NOW) == [(20000, 5)]


def test_restart_adopts_identical_entry() -> None:
    t = pa.Table(keys={20000: pa.Entry(5, int(NOW) + 50)})
    assert pa.owned_bases(t, {20000: (5, None)}, {}) == {20000}


def test_overlap_with_live_foreign_entry_is_reported_and_split() -> None:
    t = pa.Table(keys={20002: pa.Entry(3, int(NOW) + 100), 20008: pa.Entry(1, int(NOW) - 1)})
    m = pa.merge(t, NOW, {20000: (10, None)}, set())
    assert any("overlaps live" in p for p in m.problems)
    spans = sorted((b, e.size) for b, e in m.published.items())
    assert spans == [(20000, 2), (20005, 5)]
    assert 20008 not in m.table.keys  # expired foreign entry under our run: dropped
    assert m.table.keys[20002] == t.keys[20002]


def test_snapshot_of_lease_records() -> None:
    from portlease.broker.leases import LeaseRecord, Peer

    attached = LeaseRecord(token="a", start=20000, count=3, ttl=120, granted=NOW, peer=Peer(),
                           connection=1)
    detached = LeaseRecord(token="b", start=20010, count=1, ttl=60, granted=NOW, peer=Peer(),
                           expires=NOW + 45)
    assert pa.snapshot([attached, detached], NOW) == {20000: (3, None), 20010: (1, 45.0)}


def test_first_overlap() -> None:
    assert pa.first_overlap(10, 5, [(0, 10), (14, 2)]) == 16
    assert pa.first_overlap(10, 4, [(0, 10), (14, 2)]) is None


if given is not None:
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
    leases = st.dictionaries(
        st.integers(10000, 10300),
        st.tuples(st.integers(1, 20), st.none() | st.floats(-10, 300)),
        max_size=8,
    )

    @given(tables)
    @settings(max_examples=200, deadline=None)
    def test_render_parse_round_trip(table: pa.Table) -> None:
        data = pa.render(table)
        p = pa.parse(data)
        assert not p.repair and p.table == table
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pl-rt-{os.getpid()}.json"
        path.write_bytes(data)
        try:
            nxt, keys = crate.load(str(path))
        finally:
            path.unlink()
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
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pl-any-{os.getpid()}.json"
        path.write_bytes(pa.render(p.table))
        try:
            crate.load(str(path))  # raises Unreadable if the crate could not read it
        finally:
            path.unlink()
        if not p.repair:  # if we say it is fine, the crate must read it as it is
            path.write_bytes(data)
            try:
                crate.load(str(path))
            finally:
                path.unlink()

    @given(tables, leases, st.sets(st.integers(10000, 10300)), st.floats(0, 200))
    @settings(max_examples=300, deadline=None)
    def test_merge_invariants(
        table: pa.Table,
        ours: dict[int, tuple[int, float | None]],
        owned_guess: set[int],
        dt: float,
    ) -> None:
        owned = owned_guess & set(table.keys)
        now = NOW + dt - 100
        m = pa.merge(table, now, ours, owned)
        out = m.table
        # `next` and unknown fields are intact.
        assert out.next == table.next and out.extra == table.extra
        spans = sorted((b, b + e.size) for b, e in m.published.items())
        live_foreign = [
            (b, b + e.size) for b, e in table.keys.items()
            if b not in owned and e.size and e.live(now)
        ]
        # Entries we do not own survive, unless expired and under a run we publish.
        for b, e in table.keys.items():
            if b in owned:
                continue
            if e.live(now) and e.size:
                assert out.keys[b] == e
            elif b not in out.keys or out.keys[b] != e:
                assert any(s <= b < t or (b < t and s < b + e.size) for s, t in spans)
        # Our entries are disjoint from each other and from live foreign entries.
        for i, (s, t) in enumerate(spans):
            assert s < t
            if i:
                assert spans[i - 1][1] <= s
            assert not any(fs < t and s < fe for fs, fe in live_foreign)
            assert out.keys[s].expires > now
        # Every port of every live lease is reserved, by us or by the foreign entry.
        for base, (count, left) in ours.items():
            if left is not None and left <= 0:
                continue
            for port in range(base, base + count):
                assert any(s <= port < t for s, t in spans + live_foreign), port
        # Nothing we owned is left behind unless it is still published.
        assert all(b in m.published or b not in out.keys or out.keys[b] != table.keys[b]
                   or b not in owned for b in table.keys)
        assert pa.parse(pa.render(out)).table == out

    def reference_merge(
        table: pa.Table, now: float, ours: dict[int, tuple[int, float | None]], owned: set[int]
    ) -> tuple[dict[int, pa.Entry], dict[int, pa.Entry]]:
        """merge() worked out port by port: slow, obvious, independent of the sweep."""
        live = {p for b, e in table.keys.items() if b not in owned and e.live(now)
                for p in range(b, b + e.size)}
        claimed: dict[int, tuple[int, int]] = {}  # port -> (run index, expires)
        for i, (base, (count, left)) in enumerate(sorted(ours.items())):
            if count <= 0 or (left is not None and left <= 0):
                continue
            expires = math.ceil(now + (pa.CRATE_RESERVATION if left is None else min(left, 120)))
            for port in range(base, min(base + count, pa.U16_MAX)):
                if port not in live and port not in claimed:
                    claimed[port] = (i, expires)
        pieces: dict[int, pa.Entry] = {}
        start = None
        for port in sorted(claimed):
            if start is None or claimed.get(port - 1, (None,))[0] != claimed[port][0]:
                start = port
                pieces[start] = pa.Entry(0, claimed[port][1])
            pieces[start] = pa.Entry(pieces[start].size + 1, claimed[port][1])
        for base, entry in list(pieces.items()):
            old = table.keys.get(base) if base in owned else None
            if (old is not None and old.size == entry.size
                    and entry.expires - 10 <= old.expires <= entry.expires):
                pieces[base] = old
        keys = {
            b: e for b, e in table.keys.items()
            # an empty entry counts as its base port: one inside our run goes too
            if b not in owned and not any(p in claimed for p in range(b, b + max(e.size, 1)))
        }
        keys.update(pieces)
        return keys, pieces

    @given(tables, leases, st.sets(st.integers(10000, 10300)), st.floats(0, 200))
    @settings(max_examples=400, deadline=None)
    def test_merge_equals_the_port_by_port_reference(
        table: pa.Table,
        ours: dict[int, tuple[int, float | None]],
        owned_guess: set[int],
        dt: float,
    ) -> None:
        owned = owned_guess & set(table.keys)
        now = NOW + dt - 100
        m = pa.merge(table, now, ours, owned)
        keys, published = reference_merge(table, now, ours, owned)
        assert m.published == published
        assert m.table.keys == keys


# ------------------------------------------------------------------ real files and locks


def table_of(d: Path) -> dict[str, Any]:
    return json.loads((d / "fm-portalloc.json").read_text())


def test_sync_publishes_and_crate_steers_clear(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    t = pa.PortallocTable(str(d))
    # A lease right where the crate starts (10000): the crate must skip it.
    r = t.sync({}, lambda foreign: pa.Run(10000, 4))
    assert r.status == "ok" and r.published and r.wrote and r.chosen == pa.Run(10000, 4)
    doc = table_of(d)
    assert doc["next"] == 10000 and doc["keys"]["10000"]["size"] == 4
    base = int(run_crate(d, "alloc", "3").stdout)
    assert base >= 10004
    # The crate's entry is foreign to us, and survives our release.
    r2 = t.sync({})
    assert r2.foreign == ((base, 3),) and r2.wrote
    doc = table_of(d)
    assert list(doc["keys"]) == [str(base)] and doc["next"] == base + 3
    # Nothing changed: nothing written.
    assert not t.sync({}).wrote


def test_corrupt_table_is_repaired_for_the_crate(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    run_crate(d, "alloc", "2")
    run_crate(d, "corrupt")
    assert run_crate(d, "alloc", "2", check=False).returncode == 1  # the crate is stuck
    t = pa.PortallocTable(str(d))
    r = t.sync({20000: (3, None)})
    assert r.status == "ok" and r.wrote and any("not JSON" in p for p in r.problems)
    assert run_crate(d, "check", check=False).returncode == 0
    assert int(run_crate(d, "alloc", "2").stdout) >= 10000
    assert table_of(d)["keys"]["20000"]["size"] == 3


def test_stuck_lock_holder_makes_sync_skip_within_timeout(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    t = pa.PortallocTable(str(d), lock_timeout=0.3)
    t.sync({}, lambda f: pa.Run(10000, 2))
    crate_base = int(run_crate(d, "alloc", "3").stdout)  # a foreign entry, seen again stale
    assert t.sync({10000: (2, None)}).foreign
    holder = subprocess.Popen(
        [sys.executable, CRATE, "--dir", str(d), "hold", "30"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        seen: list[list[tuple[int, int]]] = []
        t0 = time.monotonic()
        r = t.sync({10000: (2, None)}, lambda f: seen.append(f) or pa.Run(20000, 1))
        elapsed = time.monotonic() - t0
        assert r.status == "skipped" and not r.locked and not r.published
        # It gave up after its own timeout, not when the holder let go (30 s later).
        assert r.waited >= 0.3 and elapsed < 30, (r.waited, elapsed)
        assert seen == [list(r.foreign)] and r.foreign == ((crate_base, 3),)  # last known, live
        assert r.chosen == pa.Run(20000, 1) and "held by another process" in r.problems[0]
    finally:
        holder.kill()
        holder.wait()
    r = t.sync({10000: (2, None), 20000: (1, None)})
    assert r.status == "ok" and set(table_of(d)["keys"]) == {"10000", str(crate_base), "20000"}


def test_short_lock_hold_is_waited_for(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    d.mkdir()
    holder = subprocess.Popen(
        [sys.executable, CRATE, "--dir", str(d), "hold", "0.15"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        r = pa.PortallocTable(str(d), lock_timeout=2).sync({}, lambda f: pa.Run(10000, 1))
    finally:
        holder.wait()
    assert r.status == "ok" and r.waited > 0.05


def test_choose_exception_propagates_and_releases_lock(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    t = pa.PortallocTable(str(d), lock_timeout=0.2)

    def boom(foreign: list[tuple[int, int]]) -> pa.Run:
        raise LookupError("exhausted")

    with pytest.raises(LookupError):
        t.sync({}, boom)
    assert t.sync({}).status == "ok"  # not left locked


def test_unreadable_table_is_not_overwritten(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    d = tmp_path / "pa"
    run_crate(d, "alloc", "2")
    (d / "fm-portalloc.json").chmod(0)
    r = pa.PortallocTable(str(d)).sync({20000: (1, None)})
    assert r.status == "error" and not r.published
    (d / "fm-portalloc.json").chmod(0o644)
    assert "20000" not in table_of(d)["keys"]


def test_files_created_are_shared_like_the_directory(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    d.mkdir()
    d.chmod(0o2775)
    old = os.umask(0o077)
    try:
        pa.PortallocTable(str(d)).sync({20000: (1, None)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((d / "lock").stat().st_mode) == 0o664
    assert stat.S_IMODE((d / "fm-portalloc.json").stat().st_mode) == 0o664


def test_table_replaced_or_edited_in_place_is_read_again(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    t = pa.PortallocTable(str(d))
    assert t.sync({10000: (2, None)}).wrote
    assert t.sync({10000: (2, None)}).foreign == ()  # our own table, not parsed again
    base = int(run_crate(d, "alloc", "1").stdout)  # the crate replaces the file (rename)
    assert t.sync({10000: (2, None)}).foreign == ((base, 1),)
    # Edited in place (same inode, other size): read again, not taken from memory.
    doc = table_of(d)
    doc["keys"]["20000"] = {"size": 7, "expires": int(time.time()) + 100}
    path = d / "fm-portalloc.json"
    with open(path, "r+") as f:
        f.write(json.dumps(doc))
        f.truncate()
    assert (20000, 7) in t.sync({10000: (2, None)}).foreign


def test_begin_holds_the_crate_lock_until_finish(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    t = pa.PortallocTable(str(d))
    held = t.begin({})
    assert isinstance(held, pa.Locked)
    other = pa.PortallocTable(str(d), lock_timeout=0.05)
    assert other.sync({}).status == "skipped"  # another process's view: the lock is taken
    r = t.finish(held, {10000: (3, None)})
    assert r.status == "ok" and r.wrote
    assert other.sync({}).foreign == ((10000, 3),)


# ------------------------------------------------------------------ the share around a grant


def _share_world(d: Path) -> tuple[Any, Any, dict[int, tuple[int, float | None]]]:
    from portlease.broker.allocator import Allocator
    from portlease.broker.share import PortallocShare

    allocator = Allocator(10000, 10099)
    leases: dict[int, tuple[int, float | None]] = {}
    share = PortallocShare(str(d), snapshot=lambda: dict(leases), allocator=lambda: allocator,
                           log=logging.getLogger("test.share"), lock_timeout=0.2)
    return share, allocator, leases


def _grant(allocator: Any, leases: dict[int, tuple[int, float | None]], count: int) -> int:
    start = allocator.allocate(count, lambda port: True, 0.0)
    assert start is not None
    allocator.hold(start, count)
    leases[start] = (count, None)
    return int(start)


def test_share_grant_skips_crate_entries_and_publishes_in_the_same_hold(tmp_path: Path) -> None:
    import trio

    d = tmp_path / "pa"
    theirs = [int(b) for b in run_crate(d, "--low", "10000", "--high", "10099", "alloc", "3",
                                        "--repeat", "2").stdout.split()]
    share, allocator, leases = _share_world(d)
    threads: list[int] = []

    def grant() -> int:
        threads.append(threading.get_ident())
        # The crate's lock is held while we grant: another caller cannot get in.
        assert pa.PortallocTable(str(d), lock_timeout=0.01).sync({}).status == "skipped"
        return _grant(allocator, leases, 4)

    async def main() -> list[int]:
        await share.start()
        return [await share.around_grant(grant) for _ in range(3)]

    ours = trio.run(main)
    assert threads == [threading.get_ident()] * 3  # grant() ran on the trio thread
    their_ports = {p for b in theirs for p in range(b, b + 3)}
    assert not their_ports & {p for b in ours for p in range(b, b + 4)}
    keys = table_of(d)["keys"]
    assert all(keys[str(b)]["size"] == 4 for b in ours)  # published with the grant
    assert share.foreign == [(b, 3) for b in theirs]
    # Held once each, however many grants saw them (the holds are a diff, not a rebuild).
    assert [allocator._holds[b] for b in theirs] == [1, 1]


def test_share_grant_failure_releases_the_lock_and_writes_nothing(tmp_path: Path) -> None:
    import trio

    d = tmp_path / "pa"
    share, _allocator, leases = _share_world(d)

    def grant() -> int:
        leases[10050] = (1, None)  # half-done work must not reach the table
        raise RuntimeError("no")

    async def main() -> None:
        with pytest.raises(RuntimeError):
            await share.around_grant(grant)

    trio.run(main)
    assert pa.PortallocTable(str(d), lock_timeout=0.05).sync({}).status == "ok"
    assert not (d / "fm-portalloc.json").exists()


def test_share_ended_lease_leaves_the_table_and_reapply_moves_holds(tmp_path: Path) -> None:
    import trio

    from portlease.broker.allocator import Allocator

    d = tmp_path / "pa"
    base = int(run_crate(d, "--low", "10000", "--high", "10099", "alloc", "2").stdout)
    share, allocator, leases = _share_world(d)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await share.start()
            nursery.start_soon(share.refresh_forever)
            start = await share.around_grant(lambda: _grant(allocator, leases, 1))
            assert str(start) in table_of(d)["keys"]
            del leases[start]
            share.lease_ended()
            with trio.fail_after(5):
                while str(start) in table_of(d)["keys"]:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert str(base) in table_of(d)["keys"]  # the crate's entry stays
    assert not allocator.is_free(base)
    new = Allocator(10000, 10199)
    share.reapply(new)
    assert not new.is_free(base) and not new.is_free(base + 1) and new.is_free(base + 2)


# ------------------------------------------------------------------ both worlds, many processes


def worker(directory: str, low: int, high: int, rounds: int, log: str, seed: int) -> None:
    """A minimal broker: grant runs through the table, hold them a little, release."""
    rng = random.Random(seed)
    table = pa.PortallocTable(directory, lock_timeout=5)
    held: dict[int, tuple[int, float]] = {}  # base -> (count, t0)
    cursor = low
    lines: list[str] = []

    def ours() -> Mapping[int, tuple[int, float | None]]:
        return {b: (n, None) for b, (n, _) in held.items()}

    def choose(foreign: list[tuple[int, int]]) -> pa.Run | None:
        nonlocal cursor
        count = rng.randint(1, 4)
        avoid = sorted([*foreign, *((b, n) for b, (n, _) in held.items())])
        for start in (cursor, low):
            base = start
            while base + count - 1 <= high:
                hit = pa.first_overlap(base, count, avoid)
                if hit is None:
                    cursor = base + count
                    return pa.Run(base, count)
                base = hit
        return None

    def release(base: int) -> None:
        count, t0 = held.pop(base)
        lines.append(json.dumps({"who": f"broker-{os.getpid()}", "start": base, "count": count,
                                 "t0": t0, "t1": time.monotonic()}))
        assert table.sync(ours()).locked

    for _ in range(rounds):
        r = table.sync(ours(), choose)
        assert r.locked, r.problems
        if r.chosen is not None:
            held[r.chosen.start] = (r.chosen.count, time.monotonic())
        time.sleep(rng.random() * 0.01)
        if len(held) > rng.randint(0, 3):
            release(rng.choice(list(held)))
    for base in list(held):
        release(base)
    with open(log, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def test_crate_and_brokers_never_hold_a_port_twice(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    log = tmp_path / "holds.jsonl"
    low = random.Random().randrange(20000, 29000, 500)
    high = low + 200
    d.mkdir()
    (d / "fm-portalloc.json").write_text(json.dumps({"next": low, "keys": {}}))
    procs = [
        subprocess.Popen([sys.executable, __file__, "worker", str(d), str(low), str(high), "60",
                          str(log), str(i)])
        for i in range(3)
    ] + [
        subprocess.Popen([sys.executable, CRATE, "--dir", str(d), "--low", str(low), "--high",
                          str(high), "--reservation", "2", "--max-wraps", "50", "alloc", "2",
                          "--repeat", "20", "--use", "0.02", "--log", str(log)],
                         stdout=subprocess.DEVNULL)
        for _ in range(3)
    ]
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [0] * len(procs)
    holds = [json.loads(line) for line in log.read_text().splitlines()]
    by_port: dict[int, list[dict[str, Any]]] = {}
    for h in holds:
        for port in range(h["start"], h["start"] + h["count"]):
            by_port.setdefault(port, []).append(h)
    twice = [
        (port, a, b)
        for port, hs in by_port.items()
        for i, a in enumerate(hs)
        for b in hs[i + 1:]
        if a["t0"] < b["t1"] and b["t0"] < a["t1"]
    ]
    assert not twice, twice[:3]
    kinds = {h["who"].split("-")[0] for h in holds}
    assert kinds == {"broker", "crate"} and len(holds) >= 120
    # Whether the two worlds used the same port at different times depends on the
    # scheduling of a loaded machine, so it is not asserted (it made the test flaky);
    # the invariant above is what must hold in every run.
    assert (d / "fm-portalloc.json").exists()
    crate.load(str(d / "fm-portalloc.json"))  # and the crate can still read the table


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        a = sys.argv[2:]
        worker(a[0], int(a[1]), int(a[2]), int(a[3]), a[4], int(a[5]))
