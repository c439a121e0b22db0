"""A real broker sharing its range with fedimint-portalloc callers (tests/portalloc_crate.py)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from brokerproc import BrokerProc, Raw
from portlease.client import Connection

CRATE = str(Path(__file__).resolve().parents[1] / "portalloc_crate.py")
LOW, HIGH = 31700, 31779


def crate(directory: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, CRATE, "--dir", str(directory), "--low", str(LOW), "--high", str(HIGH),
         *args],
        capture_output=True, text=True, timeout=timeout,
    )


def crate_alloc(directory: Path, n: int, repeat: int = 1) -> list[range]:
    out = crate(directory, "alloc", str(n), "--repeat", str(repeat))
    assert out.returncode == 0, out.stderr
    return [range(int(b), int(b) + n) for b in out.stdout.split()]


def table(directory: Path) -> dict[int, tuple[int, int]]:
    data = json.loads((directory / "fm-portalloc.json").read_text())
    return {int(k): (v["size"], v["expires"]) for k, v in data["keys"].items()}


def live_ports(directory: Path) -> set[int]:
    now = time.time()
    return {p for b, (s, e) in table(directory).items() if now < e for p in range(b, b + s)}


def wait_until(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@contextlib.contextmanager
def sharing_broker(tmp_path: Path, shared: Path) -> Iterator[BrokerProc]:
    """A broker on LOW-HIGH that shares its range through ``shared``."""
    b = BrokerProc(tmp_path, ["--portalloc-dir", str(shared)], range=f"{LOW}-{HIGH}").start()
    try:
        yield b
    finally:
        b.stop()


def test_broker_and_crate_never_hand_out_the_same_port(tmp_path: Path) -> None:
    shared = tmp_path / "fm"
    with sharing_broker(tmp_path, shared) as b:
        theirs = crate_alloc(shared, 3, repeat=4)
        their_ports = {p for r in theirs for p in r}
        with Connection(b.socket) as conn:
            ours = [conn.lease(3) for _ in range(6)]
            our_ports = {p for lease in ours for p in lease.ports}
            assert not our_ports & their_ports  # the broker skipped the crate's live entries
            # ... and published its own, so the crate steers clear of them.
            assert our_ports <= live_ports(shared)
            later = crate_alloc(shared, 3, repeat=4)
            assert not {p for r in later for p in r} & our_ports
            assert crate(shared, "check").returncode == 0
        # The connection closed: our entries leave the table, the crate's stay.
        wait_until(lambda: not (our_ports & live_ports(shared)))
        assert their_ports <= live_ports(shared)


def test_corrupt_table_is_survived_and_repaired_for_the_crate(tmp_path: Path) -> None:
    shared = tmp_path / "fm"
    shared.mkdir()
    with sharing_broker(tmp_path, shared) as b:
        assert crate(shared, "corrupt").returncode == 0
        assert crate(shared, "check").returncode != 0  # the crate itself is now stuck
        with Connection(b.socket) as conn:
            held = conn.lease(2)
            assert crate(shared, "check").returncode == 0  # repaired in a form it reads
            assert set(held.ports) <= live_ports(shared)
            assert not set(crate_alloc(shared, 2)[0]) & set(held.ports)
        assert "portalloc:" in b.log.read_text()


def test_stuck_lock_holder_does_not_stall_the_broker(tmp_path: Path) -> None:
    shared = tmp_path / "fm"
    shared.mkdir()
    with sharing_broker(tmp_path, shared) as b:
        holder = subprocess.Popen(
            [sys.executable, CRATE, "--dir", str(shared), "hold", "20"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            with Connection(b.socket) as conn:
                held = conn.lease(1)  # granted on bind checks alone, after the lock timeout
                assert LOW <= held.port <= HIGH
                conn.ping()
            assert "was busy" in b.log.read_text()
        finally:
            holder.kill()
            holder.wait()


def test_pipelined_leases_behind_a_shared_grant_are_all_answered(tmp_path: Path) -> None:
    with sharing_broker(tmp_path, tmp_path / "fm") as b:
        raw = Raw(str(b.socket), timeout=5, hello=False)
        try:
            # One write: hello, three leases, a ping. Every line must get its reply
            # without the client sending anything more.
            raw.send(b'{"op":"hello","id":1,"version":1}\n'
                     + b"".join(b'{"op":"lease","id":%d,"count":1}\n' % i for i in (2, 3, 4))
                     + b'{"op":"ping","id":5}\n')
            replies = [raw.line() for _ in range(5)]
            assert [r["id"] for r in replies] == [1, 2, 3, 4, 5]
            assert [r["reply"] for r in replies[1:4]] == ["granted"] * 3
        finally:
            raw.close()
