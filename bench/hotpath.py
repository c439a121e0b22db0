#!/usr/bin/env python3
"""Where the broker's time goes on the one-shot ``with lease(1)`` path.

    python bench/hotpath.py            # about a minute; writes bench/results/hotpath.{md,json}

Two views, both of a real ``portlease serve`` process driven over its socket:

1. CPU per request mix: the broker's own CPU time (utime + stime from
   /proc/PID/stat, so scheduler waits do not count) per operation, for a raw
   client doing ever more on a new connection (connect + close; + hello +
   ``ping``; + ``lease``, released by the close; + an explicit ``release``),
   and on an open connection; and the same for bench/floors.py's epoll server.
   The differences between rows are the cost of each step.
2. cProfile of the broker (``python -m cProfile -m portlease serve``)
   while the sync client runs ``with lease(1)`` in a loop: the functions with
   the most time of their own, and the cumulative cost of the broker's parts.
   cProfile inflates Python calls by 2-3x; read it for shares, not for µs.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import run

from portlease.client import lease

HERE = Path(__file__).resolve().parent


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        x = f.read().rsplit(")", 1)[1].split()
    return (int(x[11]) + int(x[12])) / os.sysconf("SC_CLK_TCK")


def per_op(fn: Callable[[], None], pid: int, n: int) -> dict[str, float]:
    for _ in range(200):
        fn()
    time.sleep(0.6)  # let the broker's 0.5 s tick land outside the window as often as inside
    c0, t0 = cpu(pid), time.perf_counter()
    for _ in range(n):
        fn()
    wall = time.perf_counter() - t0
    c1 = cpu(pid)
    return {"n": n, "wall_us": wall / n * 1e6, "server_cpu_us": (c1 - c0) / n * 1e6}


def cpu_mix(wd: Path, n: int, rounds: int = 5) -> dict[str, Any]:
    b = run.Broker(wd, "mix", *run.RANGE)
    floor = run.Floor(wd, "epoll")
    path = b.socket

    def session(data: bytes, lines: int) -> tuple[socket.socket, bytes]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(data)
        buf = b""
        while buf.count(b"\n") < lines:
            buf += s.recv(65536)
        return s, buf

    lease_line = b'{"op":"lease","id":3,"count":1}\n'

    def connect_close() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.close()

    def hello_ping() -> None:
        session(run.HELLO + run.PING, 2)[0].close()

    def hello_lease() -> None:
        session(run.HELLO + lease_line, 2)[0].close()

    def hello_lease_release() -> None:
        s, buf = session(run.HELLO + lease_line, 2)
        token = json.loads(buf.split(b"\n")[1])["token"]
        s.sendall(b'{"op":"release","id":4,"token":"%s"}\n' % token.encode())
        while b"released" not in s.recv(65536):
            pass
        s.close()

    open_conn, _ = session(run.HELLO, 1)
    f = open_conn.makefile("rb")

    def open_cycle() -> None:
        open_conn.sendall(lease_line)
        token = json.loads(f.readline())["token"]
        open_conn.sendall(b'{"op":"release","id":4,"token":"%s"}\n' % token.encode())
        f.readline()

    def open_ping() -> None:
        open_conn.sendall(run.PING)
        f.readline()

    def fresh_client() -> None:
        with lease(1, socket=path, autostart=False):
            pass

    rows: dict[str, Any] = {}
    table = (
        ("new connection: connect + close", connect_close, b.pid),
        ("new connection: + hello + ping (pipelined)", hello_ping, b.pid),
        ("new connection: hello + lease (pipelined), released by the close", hello_lease, b.pid),
        ("new connection: hello + lease, release, close", hello_lease_release, b.pid),
        ("sync client: `with lease(1)` (new connection)", fresh_client, b.pid),
        ("open connection: lease + release", open_cycle, b.pid),
        ("open connection: ping", open_ping, b.pid),
        ("epoll floor server: connect + line + close", floor.connect_request_close, floor.proc.pid),
        ("epoll floor server: round trip", floor.round_trip, floor.proc.pid),
    )
    try:
        # Interleaved rounds, the median of each row: a slow spell of this shared
        # machine then falls on every row alike instead of on one.
        got: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in table}
        for _ in range(rounds):
            for name, fn, pid in table:
                got[name].append(per_op(fn, pid, n // rounds))
        for name, runs in got.items():
            cpu_sorted = sorted(r["server_cpu_us"] for r in runs)
            wall_sorted = sorted(r["wall_us"] for r in runs)
            rows[name] = {"n": n, "rounds": rounds, "server_cpu_us": cpu_sorted[len(runs) // 2],
                          "wall_us": wall_sorted[len(runs) // 2],
                          "server_cpu_us_rounds": [r["server_cpu_us"] for r in runs]}
            run.log(f"{name}: {rows[name]['server_cpu_us']:.0f} µs server CPU per op")
    finally:
        open_conn.close()
        floor.stop()
        b.stop()
    return rows


def cprofile_fresh(wd: Path, n: int) -> dict[str, Any]:
    d = wd / "cprofile"
    d.mkdir()
    sock = str(d / "s.sock")
    cfg = d / "c.toml"
    cfg.write_text(f'port_min = {run.RANGE[0]}\nport_max = {run.RANGE[1]}\nlog_level = "warning"\n')
    prof = d / "broker.prof"
    p = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "portlease",
                          "serve", "--config", str(cfg), "--socket", sock, "--state",
                          str(d / "state.jsonl")], stdin=subprocess.DEVNULL)
    run.wait_connectable(sock, p, "profiled broker")
    time.sleep(0.5)
    for _ in range(n):
        with lease(1, socket=sock, autostart=False):
            pass
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    stats = pstats.Stats(str(prof))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]

    def name(key: tuple[str, int, str]) -> str:
        file, line, func = key
        short = file.split("/work/main/")[-1] if "/work/main/" in file else os.path.basename(file)
        return f"{short}:{line}({func})"

    own = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:20]
    cum = sorted(raw.items(), key=lambda kv: kv[1][3], reverse=True)[:120]
    return {
        "ops": n, "total_s": total,
        "own": [{"function": name(k), "calls": v[1], "own_s": v[2], "cum_s": v[3],
                 "own_per_op_us": v[2] / n * 1e6} for k, v in own],
        "cumulative": [{"function": name(k), "calls": v[1], "cum_s": v[3],
                        "cum_per_op_us": v[3] / n * 1e6} for k, v in cum
                       if "broker/" in name(k) or "client/protocol" in name(k)],
    }


def render(data: dict[str, Any]) -> str:
    lines = ["# Where the broker's time goes: `with lease(1)` on a new connection", "",
             f"`python bench/hotpath.py` at commit `{data['machine']['commit']}`, "
             f"{data['machine']['date']}.", "",
             "## Broker CPU per operation (utime + stime; scheduler waits excluded)", "",
             "| operation | wall per op (client's view) | server CPU per op |", "|---|---|---|"]
    for k, v in data["cpu_mix"].items():
        lines.append(f"| {k} | {v['wall_us']:.0f} µs | {v['server_cpu_us']:.0f} µs |")
    cp = data["cprofile"]
    lines += ["", f"## cProfile of the broker, {cp['ops']:,} {run.X} `with lease(1)` (inflated 2-3{run.X}: "
              "read shares)", "", "Most time of their own:", "",
              "| function | calls | own time per op |", "|---|---|---|"]
    for row in cp["own"][:15]:
        lines.append(f"| `{row['function']}` | {row['calls']:,} | {row['own_per_op_us']:.1f} µs |")
    lines += ["", "Cumulative, the broker's own functions:", "",
              "| function | calls | cumulative per op |", "|---|---|---|"]
    for row in cp["cumulative"][5:40]:  # the first are start-up (module, main, run)
        lines.append(f"| `{row['function']}` | {row['calls']:,} | {row['cum_per_op_us']:.1f} µs |")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("-n", type=int, default=20000, help="operations per row (over 5 rounds)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU, as bench/run.py does "
                    "(-1: no pinning)")
    args = ap.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})  # see bench/run.py: same-CPU wake-ups for every row
    data: dict[str, Any] = {"machine": run.machine(), "cpu_pinned": args.cpu}
    with tempfile.TemporaryDirectory(prefix="plprof-") as wd:
        data["cpu_mix"] = cpu_mix(Path(wd), args.n)
        data["cprofile"] = cprofile_fresh(Path(wd), 5000)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hotpath.json").write_text(json.dumps(data, indent=1) + "\n")
    md = render(data)
    (args.out / "hotpath.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
