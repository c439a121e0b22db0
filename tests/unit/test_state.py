"""The lease journal: round trip, torn writes, compaction, one broker per state."""

from __future__ import annotations

from pathlib import Path

import pytest

from portlease.broker.errors import StartupError
from portlease.broker.leases import LeaseRecord, Peer
from portlease.broker.state import Journal


def rec(token: str, start: int, expires: float | None = None) -> LeaseRecord:
    return LeaseRecord(token=token, start=start, count=2, ttl=30.0, granted=1.0,
                       peer=Peer(pid=1, uid=2, gid=3, cmdline="x"), note="n", expires=expires)


def test_round_trip_with_ends_and_expiry_changes(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    j = Journal(path)
    assert j.open().records == []
    a, b, c = rec("a", 10), rec("b", 20), rec("c", 30)
    for r in (a, b, c):
        j.granted(r)
    j.ended(b)
    c.expires = 99.0
    j.expiry_changed(c)
    j.close()
    loaded = Journal(path).open()
    got = {r.token: r for r in loaded.records}
    assert set(got) == {"a", "c"} and loaded.bad_lines == 0
    assert got["c"].expires == 99.0 and got["a"].expires is None
    assert got["a"].peer == Peer(pid=1, uid=2, gid=3, cmdline="x") and got["a"].note == "n"


def test_torn_and_corrupt_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    j = Journal(str(path))
    j.open()
    j.granted(rec("a", 10))
    j.granted(rec("b", 20))
    j.close()
    data = path.read_bytes()
    # Garbage in the middle, and a last line cut short as a crash mid-write leaves it.
    path.write_bytes(b"\xff\xfenot json\n" + data + b'{"type":"grant","token":"c","sta')
    loaded = Journal(str(path)).open()
    assert {r.token for r in loaded.records} == {"a", "b"}
    assert loaded.bad_lines == 2


def test_compaction_keeps_only_live_leases(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    j = Journal(str(path), compact_slack=10)
    j.open()
    live = rec("live", 10)
    j.granted(live)
    for i in range(20):
        r = rec(f"t{i}", 100 + 2 * i)
        j.granted(r)
        j.ended(r)
    assert j.needs_compaction(1)
    j.compact([live])
    assert not j.needs_compaction(1)
    j.granted(rec("after", 50))
    j.close()
    assert len(path.read_bytes().splitlines()) == 2
    assert {r.token for r in Journal(str(path)).open().records} == {"live", "after"}


def test_second_journal_on_same_state_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    first = Journal(path)
    first.open()
    with pytest.raises(StartupError, match="in use by another portlease broker"):
        Journal(path).open()
    first.close()
    Journal(path).open()  # free again once the first is closed
