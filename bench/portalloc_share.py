"""The fedimint-portalloc share, measured: crate call cost beside held leases, grant cost, lock waits.

Run (as anyone; a broker on ports 30400-30599 by default, --range to change)::

    python3 bench/portalloc_share.py            # about a minute; prints a table
    python3 bench/portalloc_share.py --json out.json

What is timed, interleaved where two things are compared:

1. the crate's call (``bench/filelock_alloc.py``: the unbuffered stand-in) in the
   broker's directory while the broker holds 0, 500 and 2,000 leases, and the number
   of entries the broker put in the table for them;
2. a grant (``lease(1)`` on an open connection, release untimed) with the share on
   and off, interleaved;
3. taking 2,000 leases (one connection, ``lease(1)`` each) with the share on and off;
4. lock waits: while crate stand-ins call in a loop, the share's exchanges and how
   long each waited for the lock (from the broker's share counters in its log is not
   enough, so the broker here is in-process: see ``_inproc``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import filelock_alloc

from portlease.client import Connection

PYTHON = sys.executable


@contextlib.contextmanager
def broker(wd: Path, name: str, port_range: str, share: Path | None) -> Iterator[str]:
    d = wd / name
    d.mkdir()
    sock = str(d / "s.sock")
    args = [PYTHON, "-m", "portlease", "serve", "--socket", sock, "--state", str(d / "state"),
            "--range", port_range, "--log-level", "warning"]
    if share is not None:
        args += ["--portalloc-dir", str(share)]
    with open(d / "log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((d / "log").read_text())
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def lease_many(sock: str, n: int, stack: contextlib.ExitStack) -> None:
    """Hold ``n`` one-port leases on as many connections as the per-connection limit needs."""
    for i in range(0, n, 1000):
        conn = stack.enter_context(Connection(sock))
        for _ in range(min(1000, n - i)):
            conn.lease(1)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ms(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} µs"


def crate_call_times(share: Path, calls: int, low: int, high: int) -> list[float]:
    """Seconds per crate call (allocate one port, timed; then release it) in ``share``."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        base = filelock_alloc.allocate(str(share), 1, low=low, high=high)
        times.append(time.perf_counter() - t0)
        filelock_alloc.release(str(share), base)
    return times


def crate_beside(wd: Path, port_range: str, levels: list[int], calls: int) -> list[dict[str, object]]:
    """The crate's call in the broker's directory with N leases held; entries in the table."""
    out = []
    low, high = (int(x) for x in port_range.split("-"))
    for level in levels:
        share = wd / f"fm-{level}"
        with broker(wd, f"b-{level}", port_range, share) as sock, contextlib.ExitStack() as held:
            lease_many(sock, level, held)
            path = share / "fm-portalloc.json"
            entries = len(json.loads(path.read_text())["keys"]) if path.exists() else 0
            times = crate_call_times(share, calls, low, high)
            out.append({"leases": level, "entries": entries, "p50": statistics.median(times),
                        "p99": pct(times, 0.99)})
        # and the same crate call in a table that has that many entries of its own (old design)
        old = wd / f"fm-old-{level}"
        filelock_alloc.seed(str(old), level, start=low - level if low - level > 1024 else 40000)
        times = crate_call_times(old, calls, low, high)
        out[-1].update(per_lease_p50=statistics.median(times), per_lease_p99=pct(times, 0.99))
    return out


def grant_cost(wd: Path, ranges: tuple[str, str], rounds: int, per: int) -> dict[str, object]:
    """lease(1) on an open connection (release untimed), share on vs off, interleaved."""
    on: list[float] = []
    off: list[float] = []
    with broker(wd, "g-on", ranges[0], wd / "fm-g") as s_on, broker(wd, "g-off", ranges[1], None) as s_off, \
            Connection(s_on) as c_on, Connection(s_off) as c_off:
        for r in range(rounds):
            for conn, acc in ((c_on, on), (c_off, off)) if r % 2 == 0 else ((c_off, off), (c_on, on)):
                for _ in range(per):
                    t0 = time.perf_counter()
                    lease = conn.lease(1)
                    acc.append(time.perf_counter() - t0)
                    conn.release(lease.token)
    return {"on_p50": statistics.median(on), "on_p99": pct(on, 0.99),
            "off_p50": statistics.median(off), "off_p99": pct(off, 0.99), "n": len(on)}


def hold_many(wd: Path, ranges: tuple[str, str], n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, rng, share in (("on", ranges[0], wd / "fm-h"), ("off", ranges[1], None)):
        with broker(wd, f"h-{name}", rng, share) as sock, contextlib.ExitStack() as held:
            t0 = time.perf_counter()
            lease_many(sock, n, held)
            out[name] = time.perf_counter() - t0
    return out


def lock_waits(wd: Path, port_range: str, seconds: float, crates: int) -> dict[str, object]:
    """Crate stand-ins calling in a loop while a client takes and drops leases on the broker:
    grants, busy refusals, how many grants had to wait for a new block, and their waits."""
    share = wd / "fm-w"
    low, high = (int(x) for x in port_range.split("-"))
    crate = str(Path(__file__).resolve().parents[1] / "tests" / "portalloc_crate.py")
    with broker(wd, "w", port_range, share) as sock, Connection(sock) as conn:
        procs = [subprocess.Popen([PYTHON, crate, "--dir", str(share), "--low", str(low), "--high",
                                   str(high), "--reservation", "2", "--max-wraps", "1000", "alloc",
                                   "1", "--repeat", "100000"], stdout=subprocess.DEVNULL)
                 for _ in range(crates)]
        times: list[float] = []
        busy = 0
        end = time.monotonic() + seconds
        held = []
        try:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    held.append(conn.lease(1))
                except Exception as exc:
                    if "busy" not in str(exc):
                        raise
                    busy += 1
                times.append(time.perf_counter() - t0)
                if len(held) > 150:
                    for lease in held:
                        conn.release(lease.token)
                    held = []
        finally:
            for p in procs:
                p.kill()
                p.wait()
    slow = [t for t in times if t > 0.002]
    return {"grants": len(times), "busy": busy, "p50": statistics.median(times),
            "p99": pct(times, 0.99), "max": max(times), "waited": len(slow),
            "waited_p50": statistics.median(slow) if slow else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--range", default="30400-30599", help="two halves: share on / off")
    ap.add_argument("--wide", default="30400-30599",
                    help="the range for the 2,000-lease levels; give 10000-32000 only inside "
                    "a private network namespace (unshare -n), as the docs do")
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--json")
    a = ap.parse_args()
    low, high = (int(x) for x in a.range.split("-"))
    mid = (low + high) // 2
    halves = (f"{low}-{mid}", f"{mid + 1}-{high}")
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="pl-share-bench-") as tmp:
        wd = Path(tmp)
        results["crate"] = crate_beside(wd, a.wide, [0, 500, 2000], a.calls)
        results["grant"] = grant_cost(wd, halves, rounds=10, per=50)
        results["hold_2000"] = hold_many(wd, (a.wide, a.wide), 2000)
        results["lock_waits"] = lock_waits(wd, a.range, 20, crates=4)
    for row in results["crate"]:  # type: ignore[union-attr]
        print(f"crate call, broker holding {row['leases']:>5} leases ({row['entries']} entries of "
              f"the broker's): p50 {ms(row['p50'])} p99 {ms(row['p99'])}; the same call in a "
              f"table of {row['leases']} entries (one per lease): p50 {ms(row['per_lease_p50'])}")
    g = results["grant"]
    print(f"grant lease(1), share on: p50 {ms(g['on_p50'])} p99 {ms(g['on_p99'])}; "  # type: ignore[index]
          f"off: p50 {ms(g['off_p50'])} p99 {ms(g['off_p99'])} ({g['n']} each)")  # type: ignore[index]
    h = results["hold_2000"]
    print(f"2,000 leases on one connection: share on {h['on']:.2f} s, off {h['off']:.2f} s")  # type: ignore[index]
    w = results["lock_waits"]
    print(f"with 4 crate stand-ins looping: {w['grants']} lease calls, {w['busy']} busy, "  # type: ignore[index]
          f"p50 {ms(w['p50'])} p99 {ms(w['p99'])} max {ms(w['max'])}; "  # type: ignore[index]
          f"{w['waited']} waited over 2 ms (p50 {ms(w['waited_p50'])})")  # type: ignore[index]
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
