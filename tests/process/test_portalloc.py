"""The share's I/O half against real files, flocks, processes and a hostile group member.

The crate's part is played by ``tests/portalloc_crate.py`` (stdlib only, its own
process). A member of the directory's group is a real second uid (tests/localusers.py)
when the test runs as root; otherwise the same files are planted by this uid.
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portlease.broker import portalloc as pa
from portlease.broker.portalloc_files import ShareDir, file_mode

HERE = Path(__file__).resolve().parents[1]
CRATE = str(HERE / "portalloc_crate.py")
sys.path.insert(0, str(HERE))
import portalloc_crate as crate  # noqa: E402

from localusers import temporary_users  # noqa: E402


def run_crate(d: Path, *args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, CRATE, "--dir", str(d), *args],
                          capture_output=True, text=True, timeout=60, check=check, **kw)


def table_of(d: Path) -> dict[str, Any]:
    return json.loads((d / "fm-portalloc.json").read_text())


def exchange(sd: ShareDir, *, mine: dict[int, pa.Entry] | None = None, need: int = 0,
             leases: list[tuple[int, int]] | None = None, low: int = 20000, high: int = 20099) -> Any:
    def decide(parsed: pa.Parsed, now: float) -> pa.Plan:
        pa.cap_expiries(parsed, now, mine or {})
        return pa.plan(parsed.table, now, mine=mine or {}, leases=leases or [], low=low, high=high,
                       block=8, need=need)
    return sd.exchange(decide)


@pytest.fixture
def member(tmp_path: Path) -> Iterator[list[str]]:
    """A command prefix that runs as a member of the share directory's group; the directory
    (``tmp_path/fm``) is 2770 root:GROUP, as the NixOS module makes it. Without root the
    prefix is empty (this uid plants the files)."""
    d = tmp_path / "fm"
    d.mkdir()
    if os.geteuid() != 0:
        yield []
        return
    import grp
    import pwd
    with temporary_users("plpa", {"m": True}) as (group, names):
        os.chown(d, 0, grp.getgrnam(group).gr_gid)
        d.chmod(0o2770)
        for parent in (tmp_path, *tmp_path.parents):  # let the member reach it
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
        pw = pwd.getpwnam(names["m"])
        yield ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]


def as_member(prefix: list[str], *cmd: str) -> None:
    subprocess.run([*prefix, *cmd], check=True, timeout=30, capture_output=True)


# ------------------------------------------------------------------ ordinary exchanges


def test_a_block_is_published_and_the_crate_steers_clear(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    sd = ShareDir(str(d))
    r = exchange(sd, need=1, low=10000, high=10099)
    assert r.status == "ok" and r.wrote and r.plan.placed
    assert r.plan.ours == {10000: pa.Entry(8, r.plan.ours[10000].expires)}
    base = int(run_crate(d, "alloc", "3").stdout)
    assert base >= 10008  # the crate skipped our block
    r2 = exchange(sd, mine=r.plan.ours, leases=[(10000, 1)], low=10000, high=10099)
    assert r2.status == "ok" and not r2.wrote and r2.plan.foreign == [(base, 3)]
    assert sorted(table_of(d)["keys"]) == sorted(["10000", str(base)])


def test_a_corrupt_table_is_repaired_for_the_crate(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    run_crate(d, "alloc", "2")
    run_crate(d, "corrupt")
    assert run_crate(d, "alloc", "2", check=False).returncode == 1  # the crate is stuck
    r = exchange(ShareDir(str(d)), need=3)
    assert r.status == "ok" and r.wrote and any("not JSON" in p for p in r.problems)
    assert run_crate(d, "check", check=False).returncode == 0


def test_a_stuck_lock_makes_an_exchange_busy_within_its_timeout(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, CRATE, "--dir", str(d), "hold", "60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        r = exchange(ShareDir(str(d), lock_timeout=0.3), need=1)
        assert r.status == "busy" and r.plan is None and not r.wrote
        assert "held by another process" in r.problems[0]
        assert not (d / "fm-portalloc.json").exists()  # nothing read or written
    finally:
        holder.kill()
        holder.wait()
    assert exchange(ShareDir(str(d)), need=1).status == "ok"


def test_files_created_take_their_mode_from_the_directory(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    d.mkdir()
    d.chmod(0o2770)
    old = os.umask(0o077)
    try:
        exchange(ShareDir(str(d)), need=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((d / "lock").stat().st_mode) == 0o660
    assert stat.S_IMODE((d / "fm-portalloc.json").stat().st_mode) == 0o660


_UNREADABLE_EXCHANGE = """
import sys
from portlease.broker import portalloc as pa
from portlease.broker.portalloc_files import ShareDir

def decide(parsed, now):
    return pa.plan(parsed.table, now, mine={}, leases=[], low=20000, high=20099, block=8, need=1)

r = ShareDir(sys.argv[1]).exchange(decide)
print(r.status, r.plan is None)
"""


def test_an_unreadable_table_is_not_overwritten(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    run_crate(d, "alloc", "2")
    table = d / "fm-portalloc.json"
    before = table.read_bytes()
    table.chmod(0)
    if os.geteuid() != 0:
        r = exchange(ShareDir(str(d)), need=1)
        assert r.status == "error" and r.plan is None
    else:
        # Root reads any file: the exchange runs in a child without the two
        # capabilities that let it (its bounding set drops them at exec), so the
        # mode denies it as it denies any other owner.
        out = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
             _UNREADABLE_EXCHANGE, str(d)], capture_output=True, text=True, timeout=60)
        assert out.stdout.split() == ["error", "True"], out.stderr
    assert table.read_bytes() == before


# ------------------------------------------------------------------ a hostile member (issue 20)


def test_a_fifo_at_the_table_is_replaced_without_hanging(tmp_path: Path, member: list[str]) -> None:
    """Before: open(O_RDONLY) of a FIFO blocked the worker for good, holding the flock."""
    d = tmp_path / "fm"
    as_member(member, "mkfifo", str(d / "fm-portalloc.json"))
    r = exchange(ShareDir(str(d)), need=1)  # returns: nothing waits for a writer
    assert r.status == "ok" and any("not a regular file" in p for p in r.problems)
    assert stat.S_ISREG((d / "fm-portalloc.json").lstat().st_mode)
    assert run_crate(d, "check", check=False).returncode == 0


def test_a_fifo_at_the_temporary_name_is_not_written_through(tmp_path: Path, member: list[str]) -> None:
    d = tmp_path / "fm"
    as_member(member, "mkfifo", str(d / "fm-portalloc.tmp"))
    r = exchange(ShareDir(str(d)), need=1)
    assert r.status == "ok" and r.wrote
    assert stat.S_ISREG((d / "fm-portalloc.json").lstat().st_mode)
    assert not (d / "fm-portalloc.tmp").exists()


@pytest.mark.parametrize("target", ["root-only", "journal"])
def test_a_symlinked_table_is_never_followed(tmp_path: Path, member: list[str], target: str) -> None:
    """Before: one grant copied a root-only JSON file (or the broker's journal, with a
    lease token) into the group-readable table, with the target's mode."""
    d = tmp_path / "fm"
    secret = tmp_path / "secret.json"
    body = ({"keys": {}, "password": "hunter2"} if target == "root-only"
            else {"keys": {}, "token": "0123456789abcdef0123456789abcdef"})
    secret.write_text(json.dumps(body))
    secret.chmod(0o600 if target == "journal" else 0o644)
    before = secret.read_bytes()
    as_member(member, "ln", "-s", str(secret), str(d / "fm-portalloc.json"))
    r = exchange(ShareDir(str(d)), need=1)
    assert r.status == "ok" and any("symbolic link" in p for p in r.problems)
    table = (d / "fm-portalloc.json")
    assert not table.is_symlink() and stat.S_ISREG(table.lstat().st_mode)
    text = table.read_text()
    assert "hunter2" not in text and "0123456789abcdef" not in text
    assert secret.read_bytes() == before  # the target is untouched
    assert stat.S_IMODE(table.stat().st_mode) == file_mode(d.stat().st_mode)  # not the target's


def test_a_hard_link_at_the_table_is_not_read(tmp_path: Path) -> None:
    d = tmp_path / "fm"
    d.mkdir()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"keys": {}, "token": "abcdef"}))
    os.link(other, d / "fm-portalloc.json")
    r = exchange(ShareDir(str(d)), need=1)
    assert r.status == "ok" and any("hard links" in p for p in r.problems)
    assert "abcdef" not in (d / "fm-portalloc.json").read_text()
    assert "abcdef" in other.read_text()


def test_a_sparse_gigabyte_table_is_not_read(tmp_path: Path) -> None:
    """Before: a 1 GB sparse table raised the broker's peak memory by 64 MiB."""
    d = tmp_path / "fm"
    d.mkdir()
    with open(d / "fm-portalloc.json", "wb") as f:
        f.truncate(1 << 30)
    code = ("import resource, sys; from portlease.broker.portalloc_files import ShareDir, file_mode;"
            "from portlease.broker import portalloc as pa;"
            "m0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            f"r = ShareDir({str(d)!r}).exchange(lambda p, now: pa.plan(p.table, now, mine={{}},"
            " leases=[], low=20000, high=20099, block=8, need=1));"
            "m1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "print(r.status, (m1 - m0) // 1024, r.problems[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout.split(maxsplit=2)
    assert out[0] == "ok" and int(out[1]) < 16, out  # MiB of peak memory added
    assert "more than" in out[2]
    assert (d / "fm-portalloc.json").stat().st_size < 4096


def test_a_lock_that_is_a_fifo_or_symlink_is_refused_not_waited_on(tmp_path: Path) -> None:
    d = tmp_path / "fm"
    d.mkdir()
    os.mkfifo(d / "lock")
    r = exchange(ShareDir(str(d)), need=1)
    assert r.status == "error" and "not a regular file" in r.problems[0]
    (d / "lock").unlink()
    (d / "lock").symlink_to(tmp_path / "elsewhere")
    r = exchange(ShareDir(str(d)), need=1)
    assert r.status == "error" and "symbolic link" in r.problems[0]
    assert not (tmp_path / "elsewhere").exists()


# ------------------------------------------------------------------ both worlds, many processes


def worker(directory: str, low: int, high: int, rounds: int, log: str, seed: int) -> None:
    """A minimal broker: take blocks through the table, grant inside them, hold, release."""
    rng = random.Random(seed)
    sd = ShareDir(directory, lock_timeout=10)
    mine: dict[int, pa.Entry] = {}
    held: dict[int, tuple[int, float]] = {}
    lines: list[str] = []

    def sync(need: int = 0) -> pa.Plan:
        leases = [(b, n) for b, (n, _) in held.items()]
        r = sd.exchange(lambda p, now: pa.plan(p.table, now, mine=mine, leases=leases, low=low,
                                               high=high, block=4, need=need))
        assert r.status == "ok", r.problems
        assert r.plan is not None
        mine.clear()
        mine.update(r.plan.ours)
        return r.plan

    def free_run(count: int) -> int | None:
        taken = pa.union((b, b + n) for b, (n, _) in held.items())
        for b, e in sorted(mine.items()):
            for s, t in pa.subtract([(b, b + e.size)], taken):
                if t - s >= count:
                    return s
        return None

    for _ in range(rounds):
        count = rng.randint(1, 3)
        start = free_run(count)
        if start is None:
            sync(need=count)
            start = free_run(count)
        if start is not None:
            held[start] = (count, time.monotonic())
        time.sleep(rng.random() * 0.01)
        if held and len(held) > rng.randint(0, 3):
            base = rng.choice(list(held))
            n, t0 = held.pop(base)
            lines.append(json.dumps({"who": f"broker-{os.getpid()}", "start": base, "count": n,
                                     "t0": t0, "t1": time.monotonic()}))
    with open(log, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def overlapping_holds(holds: list[dict[str, Any]]) -> list[tuple[int, Any, Any]]:
    by_port: dict[int, list[dict[str, Any]]] = {}
    for h in holds:
        for port in range(h["start"], h["start"] + h["count"]):
            by_port.setdefault(port, []).append(h)
    return [(port, a, b) for port, hs in by_port.items() for i, a in enumerate(hs)
            for b in hs[i + 1:] if a["t0"] < b["t1"] and b["t0"] < a["t1"]]


def test_crate_and_block_takers_never_hold_a_port_twice(tmp_path: Path) -> None:
    d = tmp_path / "pa"
    log = tmp_path / "holds.jsonl"
    low = random.Random().randrange(20000, 29000, 500)
    high = low + 120
    d.mkdir()
    procs = [
        subprocess.Popen([sys.executable, __file__, "worker", str(d), str(low), str(high), "60",
                          str(log), str(i)])
        for i in range(2)
    ] + [
        subprocess.Popen([sys.executable, CRATE, "--dir", str(d), "--low", str(low), "--high",
                          str(high), "--reservation", "2", "--max-wraps", "50", "alloc", "2",
                          "--repeat", "20", "--use", "0.02", "--log", str(log)],
                         stdout=subprocess.DEVNULL)
        for _ in range(2)
    ]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0] * len(procs)
    holds = [json.loads(line) for line in log.read_text().splitlines()]
    twice = overlapping_holds(holds)
    assert not twice, twice[:3]
    assert {h["who"].split("-")[0] for h in holds} == {"broker", "crate"}
    crate.load(str(d / "fm-portalloc.json"))  # and the crate can still read the table


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        a = sys.argv[2:]
        worker(a[0], int(a[1]), int(a[2]), int(a[3]), a[4], int(a[5]))
