"""The lease journal: round trip, torn writes, compaction, one broker per state."""

from __future__ import annotations

from pathlib import Path

import pytest

from portlease.broker.leases import Instant, LeaseRecord, Peer
from portlease.broker.state import Journal
from portlease.client.protocol.errors import StartupError

AT = Instant(mono=1000.0, wall=1_700_000_000.0)
BOOT = "boot-a"


def rec(token: str, start: int, expires: float | None = None) -> LeaseRecord:
    return LeaseRecord(token=token, start=start, count=2, ttl=30.0, granted=1.0,
                       peer=Peer(pid=1, uid=2, gid=3, cmdline="x"), note="n", expires=expires)


def test_round_trip_with_ends_and_expiry_changes(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    j = Journal(path, boot=BOOT)
    assert j.open(AT).records == []
    a, b, c = rec("a", 10), rec("b", 20), rec("c", 30)
    for r in (a, b, c):
        j.granted(r, AT)
    j.ended(b)
    c.expires = 99.0
    j.expiry_changed(c, AT)
    j.close()
    loaded = Journal(path, boot=BOOT).open(AT)
    got = {r.token: r for r in loaded.records}
    assert set(got) == {"a", "c"} and loaded.bad_lines == 0
    assert got["c"].expires == 99.0 and got["a"].expires is None
    assert got["a"].peer == Peer(pid=1, uid=2, gid=3, cmdline="x") and got["a"].note == "n"


def test_torn_and_corrupt_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    j = Journal(str(path), boot=BOOT)
    j.open(AT)
    j.granted(rec("a", 10), AT)
    j.granted(rec("b", 20), AT)
    j.close()
    data = path.read_bytes()
    # Garbage in the middle, and a last line cut short as a crash mid-write leaves it.
    path.write_bytes(b"\xff\xfenot json\n" + data + b'{"type":"grant","token":"c","sta')
    loaded = Journal(str(path), boot=BOOT).open(AT)
    assert {r.token for r in loaded.records} == {"a", "b"}
    assert loaded.bad_lines == 2


def test_compaction_keeps_only_live_leases(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    j = Journal(str(path), boot=BOOT, compact_slack=10)
    j.open(AT)
    live = rec("live", 10)
    j.granted(live, AT)
    for i in range(20):
        r = rec(f"t{i}", 100 + 2 * i)
        j.granted(r, AT)
        j.ended(r)
    assert j.needs_compaction(1)
    j.compact([live], AT)
    assert not j.needs_compaction(1)
    j.granted(rec("after", 50), AT)
    j.close()
    assert len(path.read_bytes().splitlines()) == 2
    assert {r.token for r in Journal(str(path), boot=BOOT).open(AT).records} == {"live", "after"}


def test_second_journal_on_same_state_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    first = Journal(path, boot=BOOT)
    first.open(AT)
    with pytest.raises(StartupError, match="in use by another portlease broker"):
        Journal(path, boot=BOOT).open(AT)
    first.close()
    Journal(path, boot=BOOT).open(AT)  # free again once the first is closed


def test_expiry_comes_back_exactly_on_the_same_boot_whatever_the_wall_clock_did(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    j = Journal(path, boot=BOOT)
    j.open(AT)
    d = rec("d", 10, expires=AT.mono + 50)
    j.granted(d, AT)
    j.close()
    # The wall clock stepped an hour forward and back meanwhile; the monotonic clock moved 10 s.
    for wall_step in (3600.0, -3600.0):
        later = Instant(mono=AT.mono + 10, wall=AT.wall + wall_step)
        j2 = Journal(path, boot=BOOT)
        got = j2.open(later).records[0]
        j2.close()
        assert got.expires == AT.mono + 50  # 40 s left, on the monotonic clock


def test_after_a_reboot_the_wall_clock_decides_but_never_more_than_one_ttl(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    j = Journal(path, boot=BOOT)
    j.open(AT)
    j.granted(rec("d", 10, expires=AT.mono + 20), AT)
    j.close()
    # Another boot: the monotonic clock restarted near 0.
    rebooted = Instant(mono=5.0, wall=AT.wall + 5)
    got = Journal(path, boot="boot-b").open(rebooted).records[0]
    assert got.expires == 5.0 + 15  # 15 s left by the wall clock
    stepped = Instant(mono=5.0, wall=AT.wall - 10_000)  # the wall clock went far back
    j3 = Journal(path, boot="boot-c")
    j3._lock_fd = -1
    assert j3._read(stepped).records[0].expires == 5.0 + 30  # capped at the TTL


def test_journal_says_which_leases_were_detached(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    j = Journal(path, boot=BOOT)
    j.open(AT)
    attached = rec("a", 10)
    attached.connection = 7
    detached = rec("d", 20, expires=AT.mono + 30)
    later_detached = rec("l", 30)
    later_detached.connection = 8
    for r in (attached, detached, later_detached):
        j.granted(r, AT)
    later_detached.connection = None
    later_detached.expires = AT.mono + 30
    j.expiry_changed(later_detached, AT)
    j.close()
    loaded = Journal(path, boot=BOOT).open(AT)
    assert loaded.detached == {"d", "l"}


def test_a_planted_symlink_at_the_temporary_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    j = Journal(str(state / "s.jsonl"), boot=BOOT)
    j.open(AT)
    (state / "s.jsonl.tmp").symlink_to(victim)
    j.compact([rec("a", 10)], AT)  # removes the planted name, then O_EXCL | O_NOFOLLOW
    j.close()
    assert victim.read_text() == "precious"
    assert not (state / "s.jsonl.tmp").exists()


def test_a_state_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StartupError, match="group or others may write"):
        Journal(str(shared / "s.jsonl"), boot=BOOT).open(AT)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(StartupError, match="symbolic link"):
        Journal(str(link / "s.jsonl"), boot=BOOT).open(AT)
