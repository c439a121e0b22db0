#!/usr/bin/env python3
"""portlease against Google's portserver and the I/O floors of this machine, in one run.

    python bench/run.py --quick     # every section, few samples (CI: checks only that it runs)
    python bench/run.py --full      # the published figures (about a minute here)

Writes ``bench/results/<mode>.md`` (the tables and targets), ``<mode>.json``
(every figure, the machine, the calibration) and ``<mode>.png`` (the chart;
needs matplotlib), and prints the tables; ``--full`` also puts the tables into
docs/performance.md between its result markers. Nothing here asserts on a
number: targets are reported as met or missed. ``--quick`` exits 1 only when
a section failed to run.

Why interleaved rounds: this VM's speed drifts by up to 2x within a minute.
Every figure that enters a ratio is taken in short rounds that alternate the
contenders (portlease's calls, portserver, the floor servers, a socket pair),
so that a slow spell falls on all of them alike and the ratio stays fair even
when the absolute figures move. The calibration line (a fixed Python loop and a
socket pair round trip, before and after) says how fast the machine was.

Sections:

- head to head: ``with lease(1)`` on a new connection, ``lease(1)`` and
  ``lease`` + ``release`` on an open connection (the sync client, defaults),
  one portserver request (Debian's ``/usr/bin/portserver``), the broker's own
  ``ping`` through a raw client, and the floors: a raw client against minimal
  one-line servers (``bench/floors.py``: raw ``select.epoll``, asyncio streams,
  trio ``serve_listeners``), connect + one request + close and a round trip on
  an open connection, and a bare socket pair round trip between two processes;
- leases held: ``lease(1)`` and ``lease`` + ``release`` with 10,000 leases held
  vs none (two brokers, interleaved);
- release after SIGKILL: a holder of the broker's only port is killed; the
  clock runs from ``kill()`` until a fresh request gets the port;
- fedimint-portalloc share: a grant (``lease(1)``, release untimed) from a broker
  started with ``--portalloc-dir`` with 0 / 500 / 2,000 leases held, against the
  crate's own call in a table of that size (``bench/filelock_alloc.py``, the
  crate's algorithm and file format in Python).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import filelock_alloc

from portlease.client import Connection, Exhausted, lease

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PORTSERVER = "/usr/bin/portserver"
RANGE = (10000, 31000)  # the brokers' range; below the kernel's ephemeral range
RELEASE_PORT = 31500  # the one-port range of the release-after-SIGKILL broker
X = "\u00d7"  # the multiplication sign, for ratios
PING = b'{"op":"ping","id":2}\n'
HELLO = b'{"op":"hello","id":1,"version":1}\n'


@dataclass(frozen=True)
class Mode:
    name: str
    rounds: int
    h2h_n: int  # samples per head-to-head figure, over all rounds
    ps_pool: tuple[int, int]  # portserver's pool
    held: int  # leases held in the scale section
    scale_n: int
    release_n: int
    pa_levels: tuple[int, ...]
    pa_n: int  # portalloc grants per level, over all rounds
    crate_n: int


MODES = {
    "quick": Mode("quick", rounds=3, h2h_n=300, ps_pool=(10000, 11999), held=10000, scale_n=300,
                  release_n=20, pa_levels=(0, 2000), pa_n=30, crate_n=15),
    "full": Mode("full", rounds=10, h2h_n=10000, ps_pool=RANGE, held=10000, scale_n=10000,
                 release_n=500, pa_levels=(0, 500, 2000), pa_n=600, crate_n=300),
}


# ---------------------------------------------------------------- small helpers


def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``samples``."""
    s = sorted(samples)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def summary(samples_s: list[float]) -> dict[str, float]:
    """n, p50/p99/mean in microseconds, from samples in seconds."""
    us = [x * 1e6 for x in samples_s]
    return {
        "n": len(us), "p50_us": pct(us, 50), "p99_us": pct(us, 99),
        "mean_us": sum(us) / len(us) if us else float("nan"),
    }


def timed(fn: Callable[[], Any], n: int, *, after: Callable[[Any], None] | None = None,
          warmup: int = 10) -> list[float]:
    """Time ``n`` calls of ``fn`` (seconds each); ``after(result)`` runs untimed."""
    for _ in range(warmup):
        r = fn()
        if after is not None:
            after(r)
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        r = fn()
        out.append(clock() - t0)
        if after is not None:
            after(r)
    return out


@dataclass
class Op:
    """One contender in interleaved rounds: ``fn`` is timed, ``after(result)`` is not."""

    fn: Callable[[], Any]
    after: Callable[[Any], None] | None = None
    n: int | None = None  # samples over all rounds, when not the section's default


def interleaved(ops: dict[str, Op], n: int, rounds: int) -> dict[str, list[float]]:
    """Run every op ``n / rounds`` times per round, the order rotated each round."""
    samples: dict[str, list[float]] = {name: [] for name in ops}
    names = list(ops)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            op = ops[name]
            per = max(1, (op.n or n) // rounds)
            samples[name] += timed(op.fn, per, after=op.after, warmup=3 if r else 10)
    return samples


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_connectable(path: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.02)
        finally:
            s.close()


def read_line(s: socket.socket, buf: bytes = b"") -> bytes:
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


# ---------------------------------------------------------------- contenders


class Broker:
    """A ``portlease serve`` process with limits raised for 10,000 leases."""

    def __init__(self, workdir: Path, name: str, low: int, high: int, *args: str) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.socket = str(self.dir / "portlease.sock")
        config = self.dir / "portlease.toml"
        config.write_text(
            f"port_min = {low}\nport_max = {high}\n"
            "max_ports_per_uid = 65535\nmax_leases_per_connection = 65535\n"
            'log_level = "warning"\n'
        )
        self.log = open(self.dir / "broker.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "portlease", "serve", "--config", str(config),
             "--socket", self.socket, "--state", str(self.dir / "state.jsonl"), *args],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
        )
        try:
            wait_connectable(self.socket, self.proc, f"broker {name}")
            Connection(self.socket, autostart=False).close()  # serving, not just listening
        except Exception:
            self.stop()
            raise RuntimeError(f"broker {name} did not start: "
                               f"{(self.dir / 'broker.log').read_text()[-2000:]}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self) -> Connection:
        return Connection(self.socket, autostart=False)

    def hold(self, n: int, batch: int = 500) -> socket.socket:
        """A raw connection holding ``n`` one-port leases (pipelined ``batch`` at a time)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.socket)
        s.sendall(HELLO)
        buf = read_line(s)
        buf = buf.split(b"\n", 1)[1]
        done, rid = 0, 10
        while done < n:
            k = min(batch, n - done)
            s.sendall(b"".join(b'{"op":"lease","id":%d,"count":1}\n' % (rid + i) for i in range(k)))
            rid += k
            got = 0
            while got < k:
                buf = read_line(s, buf)
                line, buf = buf.split(b"\n", 1)
                if b'"granted"' not in line:
                    raise RuntimeError(f"seeding {n} leases: {line[:200]!r}")
                got += 1
            done += k
        return s

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


class PortServer:
    """Google's portserver (Debian's /usr/bin/portserver) on an abstract Unix socket."""

    _seq = 0

    def __init__(self, low: int, high: int) -> None:
        PortServer._seq += 1
        self.name = f"portlease-bench-{os.getpid()}-{PortServer._seq}"
        self.address = "\0" + self.name
        self.proc = subprocess.Popen(
            [PORTSERVER, "--portserver_static_pool", f"{low}-{high}",
             "--portserver_address", "@" + self.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.address)  # an empty request: the server logs and hangs up
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("portserver did not start") from None
                time.sleep(0.02)
            finally:
                s.close()

    def request(self, pid: int) -> int | None:
        """portpicker's client: connect, send the pid as a line, read one port."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.address)
            s.sendall(b"%d\n" % pid)
            buf = s.recv(1024)
        finally:
            s.close()
        return int(buf) if buf.strip() else None

    def stop(self) -> None:
        stop_process(self.proc)


class Floor:
    """One of bench/floors.py's minimal servers, and a raw client's two calls to it."""

    def __init__(self, workdir: Path, kind: str) -> None:
        self.path = str(workdir / f"floor-{kind}.sock")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "floors.py"), kind, self.path],
                                     stdin=subprocess.DEVNULL)
        wait_connectable(self.path, self.proc, f"{kind} floor server")
        self.open = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.open.connect(self.path)

    def connect_request_close(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
            s.sendall(PING)
            read_line(s)
        finally:
            s.close()

    def round_trip(self) -> None:
        self.open.sendall(PING)
        read_line(self.open)

    def stop(self) -> None:
        self.open.close()
        stop_process(self.proc)


class RawBroker:
    """The broker's own floor: ``ping`` through a raw client (hello pipelined with it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.open = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.open.connect(path)
        self.open.sendall(HELLO)
        read_line(self.open)

    def connect_request_close(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
            s.sendall(HELLO + PING)
            buf = read_line(s)
            if buf.count(b"\n") < 2:
                read_line(s, buf.split(b"\n", 1)[1])
        finally:
            s.close()

    def round_trip(self) -> None:
        self.open.sendall(PING)
        read_line(self.open)

    def lease_on_new_connection(self) -> None:
        """What ``with lease(1)`` does on the wire: hello + lease in one write, close."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
            s.sendall(HELLO + b'{"op":"lease","id":2,"count":1}\n')
            buf = read_line(s)
            while buf.count(b"\n") < 2:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                buf += chunk
            if b'"granted"' not in buf:
                raise RuntimeError(f"lease refused: {buf[:200]!r}")
        finally:
            s.close()  # the broker releases the lease with the connection

    def lease(self) -> bytes:
        """``lease`` count 1 on the open connection; returns its token (for :meth:`release`)."""
        self.open.sendall(b'{"op":"lease","id":3,"count":1}\n')
        line = read_line(self.open)
        token: str = json.loads(line)["token"]
        return token.encode()

    def release(self, token: bytes) -> None:
        self.open.sendall(b'{"op":"release","id":4,"token":"%s"}\n' % token)
        read_line(self.open)

    def stop(self) -> None:
        self.open.close()


def sleeper() -> subprocess.Popen[bytes]:
    """A live process to name as a portserver holder (its ports stay taken while it lives)."""
    return subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL)


def _forked(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


class SocketPair:
    """A line's round trip to an echoing child process over a socket pair: the IPC floor."""

    def __init__(self, cpu: int | None = None) -> None:
        self.a, b = socket.socketpair()

        def echo() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            self.a.close()
            while True:
                data = b.recv(4096)
                if not data:
                    return
                b.sendall(data)

        self.pid = _forked(echo)
        b.close()

    def round_trip(self) -> None:
        self.a.sendall(PING)
        self.a.recv(4096)

    def stop(self) -> None:
        self.a.close()
        os.waitpid(self.pid, 0)


# ---------------------------------------------------------------- results


@dataclass
class Results:
    mode: str
    data: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value


# ---------------------------------------------------------------- sections


H2H_ROWS: list[tuple[str, str, str]] = [
    # (key, who, what)
    ("pl_fresh", "portlease, sync client", "`with lease(1)` on a new connection "
     "(connect, hello + lease, close)"),
    ("pl_lease", "portlease, sync client", "`lease(1)` on an open connection"),
    ("pl_cycle", "portlease, sync client", "`lease(1)` + `release` on an open connection"),
    ("ps", "portpicker portserver", "one request (connect, pid line, port, close)"),
    ("pl_raw_cc", "portlease broker, raw client", "connect, hello + `ping` in one write, close"),
    ("pl_raw_lease_cc", "portlease broker, raw client", "connect, hello + `lease` in one write, "
     "close (what `with lease(1)` sends)"),
    ("pl_raw_rtt", "portlease broker, raw client", "`ping` round trip on an open connection"),
    ("pl_raw_lease", "portlease broker, raw client", "`lease` count 1 on an open connection "
     "(release untimed)"),
    ("epoll_cc", "floor: raw `select.epoll` loop", "connect + one line + close"),
    ("epoll_rtt", "floor: raw `select.epoll` loop", "round trip on an open connection"),
    ("asyncio_cc", "floor: asyncio streams", "connect + one line + close"),
    ("asyncio_rtt", "floor: asyncio streams", "round trip on an open connection"),
    ("trio_cc", "floor: trio `serve_listeners`", "connect + one line + close"),
    ("trio_rtt", "floor: trio `serve_listeners`", "round trip on an open connection"),
    ("socketpair", "floor: bare socket pair", "round trip between two processes"),
]


def head_to_head(r: Results, mode: Mode, wd: Path) -> None:
    """Every count-1 figure that enters a ratio, in one set of interleaved rounds."""
    broker = Broker(wd, "main", *RANGE)
    stack = contextlib.ExitStack()
    stack.callback(broker.stop)
    with stack:
        conn = broker.connect()
        stack.callback(conn.close)
        raw = RawBroker(broker.socket)
        stack.callback(raw.stop)

        def fresh() -> None:
            with lease(1, socket=broker.socket, autostart=False):
                pass

        ops: dict[str, Op] = {
            "pl_fresh": Op(fresh),
            "pl_lease": Op(lambda: conn.lease(1), after=conn.release),
            "pl_cycle": Op(lambda: conn.release(conn.lease(1))),
            "pl_raw_cc": Op(raw.connect_request_close),
            "pl_raw_lease_cc": Op(raw.lease_on_new_connection),
            "pl_raw_rtt": Op(raw.round_trip),
            "pl_raw_lease": Op(raw.lease, after=raw.release),
        }
        if os.path.exists(PORTSERVER):
            low, high = mode.ps_pool
            ps = PortServer(low, high)
            stack.callback(ps.stop)
            victim = sleeper()
            t0 = time.perf_counter()
            for _ in range(high - low + 1):  # steady state: every port last owned by a dead pid
                ps.request(victim.pid)
            log(f"portserver pool {low}-{high} filled in {time.perf_counter() - t0:.1f} s")
            victim.kill()
            victim.wait()
            holder = sleeper()
            stack.callback(holder.wait)
            stack.callback(holder.kill)
            ops["ps"] = Op(lambda: ps.request(holder.pid))
        else:
            r.skipped.append(f"portserver: {PORTSERVER} missing (apt-get install python3-portpicker)")
        for kind in ("epoll", "asyncio", "trio"):
            floor = Floor(wd, kind)
            stack.callback(floor.stop)
            ops[f"{kind}_cc"] = Op(floor.connect_request_close)
            ops[f"{kind}_rtt"] = Op(floor.round_trip)
        pair = SocketPair()
        stack.callback(pair.stop)
        ops["socketpair"] = Op(pair.round_trip)
        samples = interleaved(ops, mode.h2h_n, mode.rounds)
        out: dict[str, Any] = {k: summary(v) for k, v in samples.items()}
        out["rounds"] = mode.rounds
        out["broker_rss_kib"] = rss_kib(broker.pid)
    r.put("head_to_head", out)
    log("head to head p50: " + ", ".join(f"{k} {v['p50_us']:.0f} µs" for k, v in out.items()
                                         if isinstance(v, dict)))


def leases_held(r: Results, mode: Mode, wd: Path) -> None:
    """``lease(1)`` and ``lease`` + ``release`` with ``mode.held`` leases held vs none."""
    stack = contextlib.ExitStack()
    with stack:
        ops: dict[str, Op] = {}
        rss: dict[str, int] = {}
        brokers: dict[int, Broker] = {}
        for level in (0, mode.held):
            b = Broker(wd, f"held-{level}", *RANGE)
            stack.callback(b.stop)
            brokers[level] = b
            if level:
                t0 = time.perf_counter()
                stack.callback(b.hold(level).close)
                log(f"{level} leases held in {time.perf_counter() - t0:.1f} s")
            conn = b.connect()
            stack.callback(conn.close)
            ops[f"lease_{level}"] = Op(lambda c=conn: c.lease(1), after=conn.release)
            ops[f"cycle_{level}"] = Op(lambda c=conn: c.release(c.lease(1)))
        samples = interleaved(ops, mode.scale_n, mode.rounds)
        for level, b in brokers.items():
            rss[str(level)] = rss_kib(b.pid)
    out: dict[str, Any] = {k: summary(v) for k, v in samples.items()}
    out["held"] = mode.held
    out["broker_rss_kib"] = rss
    r.put("leases_held", out)
    log(f"held {mode.held}: lease p50 {out[f'lease_{mode.held}']['p50_us']:.0f} µs vs "
        f"{out['lease_0']['p50_us']:.0f} µs with none")


def release_after_sigkill(r: Results, mode: Mode, wd: Path) -> None:
    """A holder process leases the broker's only port; SIGKILL it; lease until granted."""
    broker = Broker(wd, "release", RELEASE_PORT, RELEASE_PORT)
    probe = broker.connect()
    samples, attempts = [], []
    try:
        for _ in range(mode.release_n + 2):
            rfd, wfd = os.pipe()

            def hold(wfd: int = wfd) -> None:
                c = Connection(broker.socket, autostart=False)
                c.lease(1)
                os.write(wfd, b"1")
                while True:
                    signal.pause()

            pid = _forked(hold)
            os.close(wfd)
            if os.read(rfd, 1) != b"1":
                raise RuntimeError("holder failed to lease")
            os.close(rfd)
            tries = 0
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            while True:
                tries += 1
                try:
                    got = probe.lease(1)
                    break
                except Exhausted:
                    continue
            samples.append(time.perf_counter() - t0)
            attempts.append(tries)
            probe.release(got)
    finally:
        probe.close()
        broker.stop()
    row = summary(samples[2:])
    row["max_attempts"] = max(attempts)
    r.put("release_after_sigkill", row)
    log(f"release after SIGKILL: p50 {row['p50_us']:.0f} µs p99 {row['p99_us']:.0f} µs")


def portalloc_share(r: Results, mode: Mode, wd: Path) -> None:
    """A grant with ``--portalloc-dir`` and N leases held, vs the crate's own call at N entries."""
    stack = contextlib.ExitStack()
    with stack:
        ops: dict[str, Op] = {}
        for level in mode.pa_levels:
            shared = wd / f"fm-share-{level}"
            b = Broker(wd, f"portalloc-{level}", *RANGE, "--portalloc-dir", str(shared))
            stack.callback(b.stop)
            if level:
                t0 = time.perf_counter()
                stack.callback(b.hold(level).close)
                log(f"portalloc: {level} leases held (and published) in "
                    f"{time.perf_counter() - t0:.1f} s")
            conn = b.connect()
            stack.callback(conn.close)
            ops[f"grant_{level}"] = Op(lambda c=conn: c.lease(1), after=conn.release, n=mode.pa_n)
            d = str(wd / f"fm-crate-{level}")
            filelock_alloc.seed(d, level)
            ops[f"crate_{level}"] = Op(lambda d=d: filelock_alloc.allocate(d, 1),
                                       after=lambda base, d=d: filelock_alloc.release(d, base),
                                       n=mode.crate_n)
        samples = interleaved(ops, mode.pa_n, mode.rounds)
        beside = crate_beside_broker(mode, b, str(shared))
    out: dict[str, Any] = {k: summary(v) for k, v in samples.items()}
    out["levels"] = list(mode.pa_levels)
    out["crate_beside"] = beside
    r.put("portalloc", out)
    log("portalloc grant p50: " + ", ".join(
        f"{lv} held {out[f'grant_{lv}']['p50_us'] / 1000:.2f} ms "
        f"(crate {out[f'crate_{lv}']['p50_us'] / 1000:.2f} ms)" for lv in mode.pa_levels))


def crate_beside_broker(mode: Mode, b: Broker, shared: str) -> dict[str, Any]:
    """The crate's own call in the broker's table, with the broker idle and while another
    process leases and releases on it in a loop: what a crate caller pays for the share.

    Alternating phases in rounds; the grants come from a forked process so that
    they do not share this process's GIL with the timed crate calls.
    """
    idle: list[float] = []
    busy: list[float] = []
    per = max(1, mode.crate_n // mode.rounds)

    def crate_call() -> int:
        return filelock_alloc.allocate(shared, 1)

    def forget(base: int) -> None:
        filelock_alloc.release(shared, base)

    def hammer() -> None:
        c = Connection(b.socket, autostart=False)
        while True:
            c.release(c.lease(1))

    for _ in range(mode.rounds):
        idle += timed(crate_call, per, after=forget, warmup=2)
        pid = _forked(hammer)
        try:
            time.sleep(0.05)
            busy += timed(crate_call, per, after=forget, warmup=2)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return {"held": int(Path(shared).name.rsplit("-", 1)[1]), "idle": summary(idle),
            "while_granting": summary(busy)}


# ---------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  cwd=REPO).stdout.strip()
        except OSError:
            return ""

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split(":", 1)[1].strip()

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    status = run("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": run("git", "rev-parse", "--short", "HEAD") + (" (tree modified)" if status else ""),
        "cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "portlease": version("portlease"), "trio": version("trio"),
            "msgspec": version("msgspec"),
            "portpicker (Debian python3-portpicker)": run(
                "dpkg-query", "-W", "-f", "${Version}", "python3-portpicker") or "-",
        },
        "filesystem of the temp dir": run("stat", "-f", "-c", "%T", tempfile.gettempdir()),
    }


def busy_cores(seconds: float = 0.5) -> float:
    """How many cores' worth of CPU the whole machine used over ``seconds`` (other work)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v[:8]) - idle, sum(v[:8])

    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def calibrate() -> dict[str, Any]:
    """The machine's speed right now: a fixed Python loop, a socket pair round trip, other load."""
    t0 = time.perf_counter()
    x = 0
    for i in range(1_000_000):
        x += i
    loop_ms = (time.perf_counter() - t0) * 1000
    pair = SocketPair()
    try:
        rtt = timed(pair.round_trip, 3000)
    finally:
        pair.stop()
    out: dict[str, Any] = {"python_loop_ms": round(loop_ms, 1),
                           "socketpair_p50_us": round(pct(rtt, 50) * 1e6, 1)}
    mine = os.sched_getaffinity(0)
    other = sorted(set(range(os.cpu_count() or 1)) - mine)
    if len(mine) == 1 and other:
        # What an unpinned run risks per round trip: the peer on another CPU.
        pair = SocketPair(cpu=other[0])
        try:
            out["socketpair_cross_cpu_p50_us"] = round(pct(timed(pair.round_trip, 3000), 50) * 1e6, 1)
        finally:
            pair.stop()
    out.update(busy_cores=round(busy_cores(), 2), load=loadavg())
    return out


# ---------------------------------------------------------------- report


def _us(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    if x >= 10000:
        return f"{x / 1000:.0f} ms"
    if x >= 1000:
        return f"{x / 1000:.2f} ms"
    return f"{x:.0f} µs"


def p50(d: dict[str, Any], *path: str) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d.get("p50_us") if isinstance(d, dict) else None


def targets(d: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, ratio, met) for every target of issue 13 this run measured."""
    h = d.get("head_to_head", {})
    out: list[tuple[str, str, str, bool | None]] = []
    ps = p50(h, "ps")

    def faster(key: str, label: str, need: float) -> None:
        mine = p50(h, key)
        if mine and ps:
            out.append((f"{label}: ≥ {need:g}{X} faster than a portserver request",
                        f"{_us(mine)} vs {_us(ps)}", f"{ps / mine:.1f}{X}", ps / mine >= need))

    faster("pl_fresh", "`with lease(1)` on a new connection", 2.5)
    faster("pl_lease", "`lease(1)` on an open connection", 8)
    faster("pl_cycle", "`lease` + `release` on an open connection", 4)
    for key, floor, label in (("pl_fresh", "epoll_cc", "`with lease(1)` on a new connection"),
                              ("pl_lease", "epoll_rtt", "`lease(1)` on an open connection")):
        mine, base = p50(h, key), p50(h, floor)
        if mine and base:
            what = "connect+request+close" if floor.endswith("cc") else "round trip"
            out.append((f"{label}: ≤ 3{X} the raw epoll floor ({what})",
                        f"{_us(mine)} vs {_us(base)}", f"{mine / base:.1f}{X}", mine / base <= 3))
    held = d.get("leases_held", {})
    n = held.get("held")
    if n:
        worst = max(p50(held, f"lease_{n}") / p50(held, "lease_0"),  # type: ignore[operator]
                    p50(held, f"cycle_{n}") / p50(held, "cycle_0"))  # type: ignore[operator]
        out.append((f"p50 with {n:,} leases held within 20% of none",
                    f"lease {_us(p50(held, f'lease_{n}'))} vs {_us(p50(held, 'lease_0'))}; "
                    f"lease+release {_us(p50(held, f'cycle_{n}'))} vs {_us(p50(held, 'cycle_0'))}",
                    f"{(worst - 1) * 100:+.0f}% (worse of the two)", worst <= 1.2))
    rel = d.get("release_after_sigkill", {}).get("p99_us")
    if rel:
        out.append(("release after SIGKILL ≤ 5 ms p99", _us(rel), "", rel <= 5000))
    pa = d.get("portalloc", {})
    top = max(pa.get("levels", [0]))
    g = p50(pa, f"grant_{top}")
    if g and top:
        crate = p50(pa, f"crate_{top}")
        out.append((f"with `--portalloc-dir` and {top:,} leases held: grant p50 ≤ 10 ms", _us(g),
                    f"the crate's own call: {_us(crate)}", g <= 10000))
    return out


def render(r: Results, cmdline: str) -> str:
    d = r.data
    m = d["machine"]
    lines = [f"# portlease benchmark ({r.mode})", ""]
    lines.append(f"`{cmdline}` at commit `{m['commit']}`, {m['date']}, {d.get('seconds', '?')} s; "
                 f"{m['cores']} {X} {m['cpu']}, {m['memory']}, Linux {m['kernel']}, "
                 f"Python {m['python']}; temp dir on {m['filesystem of the temp dir']}; "
                 + (f"client and every server pinned to CPU {d['cpu_pinned']}."
                    if d.get("cpu_pinned") is not None else "no CPU pinning."))
    lines.append("")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".")
    lines.append("")
    c0, c1 = d["calibration_start"], d.get("calibration_end", d["calibration_start"])
    lines.append(f"Calibration (before → after): 10⁶-step Python loop {c0['python_loop_ms']} → "
                 f"{c1['python_loop_ms']} ms; socket pair round trip p50 {c0['socketpair_p50_us']} → "
                 f"{c1['socketpair_p50_us']} µs"
                 + (f" (with the peer on another CPU: {c0['socketpair_cross_cpu_p50_us']} → "
                    f"{c1.get('socketpair_cross_cpu_p50_us', '-')} µs)"
                    if "socketpair_cross_cpu_p50_us" in c0 else "")
                 + f"; other load {c0['busy_cores']} → "
                 f"{c1['busy_cores']} cores busy, load average {c0['load']} → {c1['load']}.")
    lines.append("")

    h = d.get("head_to_head", {})
    if h:
        ps, ecc, ertt = p50(h, "ps"), p50(h, "epoll_cc"), p50(h, "epoll_rtt")
        lines += [f"## One call, side by side ({h['rounds']} interleaved rounds)", "",
                  "| who | what is timed | p50 | p99 | portserver ÷ this | this ÷ epoll floor |",
                  "|---|---|---|---|---|---|"]
        for key, who, what in H2H_ROWS:
            s = h.get(key)
            if not s:
                continue
            floor = ecc if key.endswith("_cc") or key in ("pl_fresh", "ps") else ertt
            vs_ps = f"{ps / s['p50_us']:.2f}{X}" if ps and key != "ps" else ""
            vs_floor = (f"{s['p50_us'] / floor:.1f}{X}"
                        if floor and not key.startswith(("epoll", "socketpair")) else "")
            lines.append(f"| {who} | {what} | {_us(s['p50_us'])} | {_us(s['p99_us'])} | "
                         f"{vs_ps} | {vs_floor} |")
        lines.append("")
        lines.append("The epoll floor column divides by the epoll server's connect + request + "
                     "close for calls that open a connection, and by its round trip for calls on "
                     "an open one.")
        lines.append("")

    held = d.get("leases_held", {})
    if held:
        n = held["held"]
        rss = held["broker_rss_kib"]
        lines += [f"## With {n:,} leases held ({d['head_to_head'].get('rounds', '?') if h else '?'}"
                  " interleaved rounds, two brokers)", "",
                  "| leases held | `lease(1)` p50 / p99 | `lease` + `release` p50 / p99 | broker RSS |",
                  "|---|---|---|---|"]
        for level in (0, n):
            a, b = held[f"lease_{level}"], held[f"cycle_{level}"]
            lines.append(f"| {level:,} | {_us(a['p50_us'])} / {_us(a['p99_us'])} | "
                         f"{_us(b['p50_us'])} / {_us(b['p99_us'])} | "
                         f"{rss[str(level)] / 1024:.1f} MiB |")
        lines.append("")

    rel = d.get("release_after_sigkill")
    if rel:
        lines += ["## Release after SIGKILL of the holder", "",
                  f"The broker's only port, held by a forked client, SIGKILLed; clock from `kill()` "
                  f"(reaping included) until a fresh `lease(1)` on an open connection gets it: "
                  f"p50 {_us(rel['p50_us'])}, p99 {_us(rel['p99_us'])} over {rel['n']} kills, "
                  f"at most {rel['max_attempts']} attempts.", ""]

    pa = d.get("portalloc", {})
    if pa:
        lines += ["## fedimint-portalloc share", "",
                  "| leases held (entries in the table) | broker grant with `--portalloc-dir`, "
                  "p50 / p99 | the crate's own call (Python stand-in), p50 / p99 |",
                  "|---|---|---|"]
        for level in pa["levels"]:
            g, c = pa[f"grant_{level}"], pa[f"crate_{level}"]
            lines.append(f"| {level:,} | {_us(g['p50_us'])} / {_us(g['p99_us'])} | "
                         f"{_us(c['p50_us'])} / {_us(c['p99_us'])} |")
        lines.append("")
        cb = pa.get("crate_beside")
        if cb:
            i, w = cb["idle"], cb["while_granting"]
            lines.append(f"A crate caller in the broker's own table ({cb['held']:,} leases held): "
                         f"p50 / p99 {_us(i['p50_us'])} / {_us(i['p99_us'])} with the broker idle, "
                         f"{_us(w['p50_us'])} / {_us(w['p99_us'])} while another process leases "
                         "and releases on the broker in a loop.")
            lines.append("")

    lines += ["## Targets (issue 13)", "", "| target | measured | ratio / note | met |",
              "|---|---|---|---|"]
    for name, measured, note, met in targets(d):
        lines.append(f"| {name} | {measured} | {note} | "
                     f"{'yes' if met else 'no' if met is not None else '-'} |")
    if r.skipped:
        lines += ["", "Skipped: " + "; ".join(r.skipped) + "."]
    lines.append("")
    return "\n".join(lines)


def chart(r: Results, path: Path) -> bool:
    """Three panels; every bar colour, line and marker has its legend entry."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    d = r.data
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    h = d.get("head_to_head", {})
    ax = axes[0]
    groups = {"portlease": "#2a7", "portserver": "#c73", "floor": "#8899aa"}
    labels, vals, colors = [], [], []
    for key, who, what in H2H_ROWS:
        s = h.get(key)
        if not s:
            continue
        group = "portserver" if key == "ps" else "floor" if who.startswith("floor") else "portlease"
        short_who = (who.replace("floor: ", "").replace("portlease, ", "")
                     .replace("portlease broker, ", "broker, "))
        labels.append(f"{short_who}: {what.split(' (')[0]}".replace("`", ""))
        vals.append(s["p50_us"])
        colors.append(groups[group])
    ypos = list(range(len(vals)))[::-1]
    ax.barh(ypos, vals, color=colors)
    ax.set_yticks(ypos, labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("p50 (µs, log scale)")
    ax.set_title("One call, interleaved rounds")
    for y, v in zip(ypos, vals, strict=True):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=7)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=g if g != "floor" else "floor (minimal servers)")
                       for g, c in groups.items()], fontsize=8, loc="lower right")

    ax = axes[1]
    held = d.get("leases_held", {})
    if held:
        n = held["held"]
        xs = [0, n]
        for key, label, style in (("lease", "lease(1), p50", "o-"), ("cycle", "lease+release, p50",
                                                                     "s-")):
            ax.plot(xs, [held[f"{key}_{lv}"]["p50_us"] for lv in xs], style, label=label)
            ax.plot(xs, [held[f"{key}_{lv}"]["p99_us"] for lv in xs], style.replace("-", ":"),
                    label=label.replace("p50", "p99"))
        ax.set_xticks(xs, [f"{x:,}" for x in xs])
        ax.set_yscale("log")
        ax.set_ylim(bottom=10)
        ax.legend(fontsize=8)
    ax.set_xlabel("leases held")
    ax.set_ylabel("µs (log scale)")
    ax.set_title("Open connection, leases held")

    ax = axes[2]
    pa = d.get("portalloc", {})
    if pa:
        xs = pa["levels"]
        for key, label, style in (("grant", "broker grant, --portalloc-dir", "o"),
                                  ("crate", "crate's own call (Python stand-in)", "s")):
            ax.plot(xs, [pa[f"{key}_{lv}"]["p50_us"] / 1000 for lv in xs], style + "-",
                    label=f"{label}, p50")
            ax.plot(xs, [pa[f"{key}_{lv}"]["p99_us"] / 1000 for lv in xs], style + ":",
                    label=f"{label}, p99")
        ax.axhline(10, color="grey", ls="--", lw=1, label="target: grant p50 ≤ 10 ms")
        ax.set_xticks(xs, [f"{x:,}" for x in xs])
        ax.legend(fontsize=7)
    ax.set_xlabel("leases held (entries in the table)")
    ax.set_ylabel("ms")
    ax.set_title("fedimint-portalloc share")
    fig.suptitle(f"portlease benchmark ({r.mode}) at {d['machine']['commit']}, "
                 f"{d['machine']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main


DOCS = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- bench results: begin -->", "<!-- bench results: end -->"


def update_docs(md: str) -> None:
    """Put the tables between the markers in docs/performance.md (headings one level down)."""
    text = DOCS.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = "\n".join(("#" + ln if ln.startswith("#") else ln) for ln in md.splitlines()[2:])
    DOCS.write_text(f"{head}{BEGIN}\n{body.strip()}\n{END}{tail}")


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="portlease-bench-") as d:
        yield Path(d)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="few samples, under a minute (CI)")
    group.add_argument("--full", action="store_true", help="the published figures (the default)")
    parser.add_argument("--no-docs", action="store_true",
                        help="with --full: leave docs/performance.md alone (by default its "
                        "results section is replaced when writing to bench/results)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="output directory (default bench/results)")
    parser.add_argument("--cpu", type=int, default=0,
                        help="pin this process and every server it starts to this CPU "
                        "(default 0; -1: no pinning)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only this section (repeatable): " + ", ".join(SECTIONS))
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    cmdline = "python bench/run.py --" + mode.name
    r = Results(mode.name)
    if args.cpu >= 0:
        # One CPU for the client and every server (children inherit the mask).
        # Unpinned, each process lands on a CPU of the scheduler's choosing and
        # tends to stay there: a server that sits on the other CPU pays a
        # cross-CPU wake-up per request (about 50 µs on this VM when that CPU is
        # idle, against 5 µs on the same CPU), which favours whichever contender
        # happened to land next to the client. Pinned, all pay the same switch.
        os.sched_setaffinity(0, {args.cpu})
    r.put("cpu_pinned", args.cpu if args.cpu >= 0 else None)
    started = time.monotonic()
    r.put("machine", machine())
    r.put("calibration_start", calibrate())
    log(f"{cmdline}: commit {r.data['machine']['commit']}, {r.data['calibration_start']}")
    with workdir() as wd:
        for name, fn in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            # A section that fails (a peer refusing on a busy machine, a port taken
            # by someone else) is reported as skipped; the others still run.
            try:
                fn(r, mode, wd)
            except Exception as exc:
                log(f"{name}: FAILED: {exc!r}")
                r.skipped.append(f"{name}: failed: {exc}")
    r.put("calibration_end", calibrate())
    r.put("seconds", round(time.monotonic() - started, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    md = render(r, cmdline)
    (args.out / f"{mode.name}.md").write_text(md)
    (args.out / f"{mode.name}.json").write_text(
        json.dumps({"mode": mode.name, "skipped": r.skipped, **r.data}, indent=1) + "\n")
    png = chart(r, args.out / f"{mode.name}.png")
    if mode.name == "full" and not args.no_docs and args.out.resolve() == (HERE / "results"):
        update_docs(md)
    print(md)
    log(f"done in {r.data['seconds']} s; wrote {args.out}/{mode.name}.md/.json"
        + ("/.png" if png else " (no matplotlib: no chart)"))
    return 1 if r.skipped and mode.name == "quick" and any("failed" in s for s in r.skipped) else 0


SECTIONS: dict[str, Callable[[Results, Mode, Path], None]] = {
    "head_to_head": head_to_head,
    "leases_held": leases_held,
    "release": release_after_sigkill,
    "portalloc": portalloc_share,
}


if __name__ == "__main__":
    sys.exit(main())
