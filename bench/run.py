#!/usr/bin/env python3
"""portlease against Google's portserver and the file-lock + JSON approach, in one run.

    python bench/run.py --quick     # every measurement, few samples; checks only that it runs
    python bench/run.py --full      # the figures for docs/performance.md (several minutes)

Writes ``bench/results/<mode>.md`` (tables, targets, machine), ``<mode>.json``
(every figure) and ``<mode>.png`` (when matplotlib is importable). Peers that
are not installed (``/usr/bin/portserver`` from Debian's python3-portpicker,
``systemd-socket-activate``) are reported as skipped. Nothing here asserts on a
number: the targets are reported as met or missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import shutil
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
RANGE = (10000, 31000)  # every contender's pool; below the kernel's ephemeral range
RELEASE_PORT_PL = 31500  # one-port pools for the release-after-SIGKILL test
RELEASE_PORT_PS = 31600
X = "\u00d7"  # the multiplication sign, for ratios


@dataclass(frozen=True)
class Mode:
    name: str
    lat_n: int  # samples per portlease latency figure
    ps_n: int  # portserver samples per level
    fl_n: int  # file-lock samples per level (0 and 1,000 held)
    fl_n_10k: int  # file-lock samples with 10,000 held
    cli_n: int
    held_levels: tuple[int, ...]
    ps_pool: tuple[int, int]  # portserver's pool in the scale test
    tp_seconds: float
    tp_clients: tuple[int, ...]
    release_n: int
    cold_n: int
    import_n: int


MODES = {
    "quick": Mode(
        "quick", lat_n=300, ps_n=150, fl_n=40, fl_n_10k=5, cli_n=5,
        held_levels=(0, 1000, 10000), ps_pool=(10000, 12999), tp_seconds=0.4,
        tp_clients=(1, 8, 32, 128), release_n=10, cold_n=2, import_n=3,
    ),
    "full": Mode(
        "full", lat_n=5000, ps_n=2000, fl_n=300, fl_n_10k=40, cli_n=40,
        held_levels=(0, 1000, 10000), ps_pool=RANGE, tp_seconds=3.0,
        tp_clients=(1, 8, 32, 128), release_n=200, cold_n=8, import_n=10,
    ),
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
    """p50/p99/mean in microseconds from samples in seconds."""
    us = [x * 1e6 for x in samples_s]
    return {
        "n": len(us), "p50_us": pct(us, 50), "p99_us": pct(us, 99),
        "mean_us": sum(us) / len(us) if us else float("nan"),
    }


def timed(fn: Callable[[], Any], n: int, *, after: Callable[[Any], None] | None = None,
          warmup: int = 20) -> list[float]:
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


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- contenders


class Broker:
    """A portlease broker in a subprocess, with limits raised for 10,000 leases."""

    def __init__(self, workdir: Path, name: str, low: int, high: int) -> None:
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
            [sys.executable, "-m", "portlease.broker", "serve", "--config", str(config),
             "--socket", self.socket, "--state", str(self.dir / "state.jsonl")],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                Connection(self.socket, reclaim=False, autostart=False).close()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"broker did not start; see {self.dir}/broker.log") from None
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self, *, reclaim: bool = True) -> Connection:
        return Connection(self.socket, reclaim=reclaim, autostart=False)

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

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


def sleeper() -> subprocess.Popen[bytes]:
    """A live process to name as a portserver holder (ports stay taken while it lives)."""
    return subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- results


@dataclass
class Results:
    mode: str
    data: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value


# ---------------------------------------------------------------- sections


def portlease_latency_and_scale(r: Results, mode: Mode, broker: Broker, workdir: Path) -> None:
    """Count 1/10 lease and lease+release on an open connection; and with 1k and 10k held.

    Each level of held leases has its own broker, and the levels are measured
    in interleaved rounds, so that the machine's drifts in speed fall on every
    level alike instead of passing for a cost of holding leases.
    """
    rounds = 10 if mode.name == "full" else 2
    brokers = {0: broker}
    for level in mode.held_levels:
        if level:
            brokers[level] = Broker(workdir, f"held-{level}", *RANGE)
    conns = {level: b.connect() for level, b in brokers.items()}
    holders = {level: b.connect(reclaim=False) for level, b in brokers.items()}
    bare = broker.connect(reclaim=False)
    scale: dict[str, Any] = {}
    try:
        for level, holder in holders.items():
            for _ in range(level):
                holder.lease(1)
        raw: dict[int, dict[str, list[float]]] = {lv: {"lease1": [], "cycle1": []} for lv in brokers}
        for _ in range(rounds):
            for level, conn in conns.items():
                raw[level]["lease1"] += timed(lambda c=conn: c.lease(1), mode.lat_n // rounds,
                                              after=conn.release)
                raw[level]["cycle1"] += timed(lambda c=conn: c.release(c.lease(1)),
                                              mode.lat_n // rounds)
        for level, b in brokers.items():
            row: dict[str, Any] = {"held": level}
            row.update({k: summary(v) for k, v in raw[level].items()})
            row["broker_rss_kib"] = rss_kib(b.pid)
            scale[str(level)] = row
            log(f"portlease held={level}: lease p50 {row['lease1']['p50_us']:.0f} us, "
                f"lease+release p50 {row['cycle1']['p50_us']:.0f} us, "
                f"rss {row['broker_rss_kib']} KiB")
        conn = conns[0]
        row = scale["0"]
        row["lease10"] = summary(timed(lambda: conn.lease(10), mode.lat_n, after=conn.release))
        row["cycle10"] = summary(timed(lambda: conn.release(conn.lease(10)), mode.lat_n))
        row["ping"] = summary(timed(conn.ping, mode.lat_n))
        row["ping_noreclaim"] = summary(timed(bare.ping, mode.lat_n))

        def fresh() -> None:
            with lease(1, socket=broker.socket, autostart=False):
                pass

        row["fresh1"] = summary(timed(fresh, mode.lat_n))
    finally:
        for c in (*conns.values(), *holders.values(), bare):
            c.close()
        for level, b in brokers.items():
            if level:
                b.stop()
    r.put("portlease_scale", scale)


def portserver_scale(r: Results, mode: Mode) -> None:
    """portserver request latency with 0/1k/10k ports held by a live process, spread over the pool.

    The pool is filled once around (every port handed out), with the held
    share going to a live holder and the rest to a process that is then
    killed, so that the measured requests meet what a long-running portserver
    meets: ports of dead owners to re-check and live holders to skip.
    """
    if not os.path.exists(PORTSERVER):
        r.skipped.append(f"portserver: {PORTSERVER} missing (apt-get install python3-portpicker)")
        return
    low, high = mode.ps_pool
    pool = high - low + 1
    out: dict[str, Any] = {"pool": [low, high]}
    for level in mode.held_levels:
        if level >= pool - mode.ps_n - 100:
            out[str(level)] = None
            continue
        ps = PortServer(low, high)
        holder, victim = sleeper(), sleeper()
        try:
            rss_idle = rss_kib(ps.pid)
            t0 = time.perf_counter()
            for i in range(pool):
                is_held = level and (i * level) // pool != ((i + 1) * level) // pool
                if ps.request(holder.pid if is_held else victim.pid) is None:
                    raise RuntimeError("portserver refused while filling its pool")
            fill = time.perf_counter() - t0
            victim.kill()
            victim.wait()
            measured = sleeper()
            try:
                samples = timed(lambda pid=measured.pid, ps=ps: ps.request(pid), mode.ps_n,
                                warmup=5)
            finally:
                measured.kill()
                measured.wait()
            row = summary(samples)
            row.update(rss_idle_kib=rss_idle, rss_kib=rss_kib(ps.pid), fill_s=fill)
            out[str(level)] = row
            log(f"portserver held={level}: p50 {row['p50_us']:.0f} us p99 {row['p99_us']:.0f} us "
                f"(pool {pool}, fill {fill:.1f} s)")
        finally:
            ps.stop()
            for p in (holder, victim):
                p.kill()
                p.wait()
    r.put("portserver_scale", out)


def head_to_head(r: Results, mode: Mode, broker: Broker, workdir: Path) -> None:
    """The count-1 figures the targets compare, taken in interleaved rounds.

    This VM's speed drifts by up to 2x within a minute; alternating the
    contenders in short rounds lets a slow spell fall on all of them alike, so
    the ratios stay fair even when the absolute figures move.
    """
    rounds = 10 if mode.name == "full" else 2
    conn = broker.connect()
    bare = broker.connect(reclaim=False)
    samples: dict[str, list[float]] = {
        "portlease_lease1": [], "portlease_cycle1": [], "portlease_cycle1_noreclaim": [],
        "portserver": [], "filelock_0": [], "filelock_1000": [],
    }
    dirs = {}
    for level in (0, 1000):
        dirs[level] = str(workdir / f"h2h-fm-{level}")
        filelock_alloc.seed(dirs[level], level)
    ps = None
    holders: list[subprocess.Popen[bytes]] = []
    if os.path.exists(PORTSERVER):
        low, high = mode.ps_pool
        ps = PortServer(low, high)
        victim = sleeper()
        for _ in range(high - low + 1):  # steady state: every port last owned by a dead pid
            ps.request(victim.pid)
        victim.kill()
        victim.wait()
        holders.append(sleeper())
    try:
        for _ in range(rounds):
            samples["portlease_lease1"] += timed(lambda: conn.lease(1), mode.lat_n // rounds,
                                                 after=conn.release)
            samples["portlease_cycle1"] += timed(lambda: conn.release(conn.lease(1)),
                                                 mode.lat_n // rounds)
            samples["portlease_cycle1_noreclaim"] += timed(
                lambda: bare.release(bare.lease(1)), mode.lat_n // rounds)
            if ps is not None:
                pid = holders[-1].pid
                samples["portserver"] += timed(lambda pid=pid, ps=ps: ps.request(pid),
                                               mode.ps_n // rounds, warmup=3)
            for level, d in dirs.items():
                samples[f"filelock_{level}"] += timed(
                    lambda d=d: filelock_alloc.allocate(d, 1), mode.fl_n // rounds,
                    after=lambda base, d=d: filelock_alloc.release(d, base), warmup=2)
    finally:
        conn.close()
        bare.close()
        if ps is not None:
            ps.stop()
        for h in holders:
            h.kill()
            h.wait()
    out = {k: summary(v) for k, v in samples.items() if v}
    out["rounds"] = rounds
    r.put("head_to_head", out)
    log("head to head: " + ", ".join(f"{k} {v['p50_us']:.0f} us" for k, v in out.items()
                                     if isinstance(v, dict)))


def filelock_scale(r: Results, mode: Mode, workdir: Path) -> None:
    """The file-lock + JSON allocator with 0/1k/10k ranges held (release untimed, to hold the level)."""
    out: dict[str, Any] = {}
    for level in mode.held_levels:
        d = str(workdir / f"fm-portalloc-{level}")
        filelock_alloc.seed(d, level)
        n = mode.fl_n_10k if level >= 10000 else mode.fl_n
        samples = timed(lambda d=d: filelock_alloc.allocate(d, 1), n,
                        after=lambda base, d=d: filelock_alloc.release(d, base), warmup=3)
        row = summary(samples)
        row["table_bytes"] = os.path.getsize(os.path.join(d, filelock_alloc.TABLE))
        out[str(level)] = row
        log(f"file-lock held={level}: p50 {row['p50_us']:.0f} us p99 {row['p99_us']:.0f} us")
    r.put("filelock_scale", out)


def cli_wrapper(r: Results, mode: Mode, broker: Broker) -> None:
    script = Path(sys.executable).with_name("portlease")
    exe = str(script) if script.exists() else shutil.which("portlease")
    if exe is None:
        r.skipped.append("CLI wrapper: no portlease script on PATH")
        return
    cmd = [exe, "lease", "--socket", broker.socket, "-n", "1", "--", "true"]

    def once() -> None:
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)

    r.put("cli", summary(timed(once, mode.cli_n, warmup=2)))
    r.put("python_startup", summary(timed(
        lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), mode.cli_n, warmup=2)))
    r.put("python_import_client", summary(timed(
        lambda: subprocess.run([sys.executable, "-c", "import portlease.client"], check=True),
        mode.cli_n, warmup=2)))
    log(f"CLI wrapper: p50 {r.data['cli']['p50_us'] / 1000:.1f} ms "
        f"(python -c pass: {r.data['python_startup']['p50_us'] / 1000:.1f} ms)")


# ---- throughput


def _tp_op(kind: str, target: str) -> Callable[[], None]:
    if kind == "portlease":
        conn = Connection(target, autostart=False)
        return lambda: conn.release(conn.lease(1))
    if kind == "portserver":
        address, pid = "\0" + target, os.getpid()

        def ps_op() -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(address)
                s.sendall(b"%d\n" % pid)
                if not s.recv(1024).strip():
                    raise RuntimeError("portserver: no port")
            finally:
                s.close()

        return ps_op

    def fl_op() -> None:
        filelock_alloc.allocate(target, 1)

    return fl_op


def _tp_worker(kind: str, target: str, pipe: Any, go: Any, window: Any) -> None:
    try:
        op = _tp_op(kind, target)
        pipe.send(("ready", 0))
        go.wait()
        start, end = window[0], window[1]
        n = 0
        while True:
            op()
            now = time.time()
            if now >= end:
                break
            if now >= start:
                n += 1
        pipe.send(("ok", n))
    except Exception as exc:  # reported, not raised: a worker must always answer
        pipe.send(("error", repr(exc)))
    finally:
        os._exit(0)  # no atexit/finalizers in a forked worker


def throughput_one(kind: str, target: str, clients: int, seconds: float,
                   server_pid: int | None) -> dict[str, Any]:
    """``clients`` forked processes run ``kind``'s operation in a loop for ``seconds``."""
    ctx = multiprocessing.get_context("fork")
    go, window = ctx.Event(), ctx.Array("d", 2)
    pipes, procs = [], []
    for _ in range(clients):
        recv_end, send_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_tp_worker, args=(kind, target, send_end, go, window))
        proc.start()
        send_end.close()
        pipes.append(recv_end)
        procs.append(proc)

    def answer(pipe: Any) -> tuple[str, Any]:
        if not pipe.poll(120):
            return ("error", "no answer in 120 s")
        try:
            return pipe.recv()  # type: ignore[no-any-return]
        except EOFError:
            return ("error", "worker died")

    errors = [v for s, v in map(answer, pipes) if s != "ready"]
    start = time.time() + 0.1
    window[0], window[1] = start, start + seconds
    go.set()
    time.sleep(max(0.0, start - time.time()))
    cpu_start = cpu_seconds(server_pid) if server_pid else 0.0
    time.sleep(seconds)
    cpu_end = cpu_seconds(server_pid) if server_pid else 0.0
    total = 0
    for pipe in pipes:
        status, value = answer(pipe)
        if status == "ok":
            total += value
        else:
            errors.append(value)
        pipe.close()
    for proc in procs:
        proc.join(timeout=30)
    row: dict[str, Any] = {"clients": clients, "ops": total, "per_s": total / seconds}
    if server_pid:
        row["server_cpu"] = (cpu_end - cpu_start) / seconds
    if errors:
        row["errors"] = errors[:3]
    return row


def throughput(r: Results, mode: Mode, broker: Broker, workdir: Path) -> None:
    out: dict[str, list[dict[str, Any]]] = {"portlease": [], "portserver": [], "filelock": []}
    for clients in mode.tp_clients:
        row = throughput_one("portlease", broker.socket, clients, mode.tp_seconds, broker.pid)
        out["portlease"].append(row)
        log(f"throughput portlease x{clients}: {row['per_s']:.0f}/s "
            f"(broker cpu {row['server_cpu']:.0%})")
    if os.path.exists(PORTSERVER):
        for clients in mode.tp_clients:
            ps = PortServer(*RANGE)
            try:
                # Ports stay held by the live workers: keep the window short of the pool.
                row = throughput_one("portserver", ps.name, clients, min(mode.tp_seconds, 2.0),
                                     ps.pid)
            finally:
                ps.stop()
            out["portserver"].append(row)
            log(f"throughput portserver x{clients}: {row['per_s']:.0f}/s")
    for clients in mode.tp_clients:
        d = str(workdir / f"fm-tp-{clients}")
        row = throughput_one("filelock", d, clients, min(mode.tp_seconds, 2.0), None)
        out["filelock"].append(row)
        log(f"throughput file-lock x{clients}: {row['per_s']:.0f}/s")
    r.put("throughput", out)


# ---- release after SIGKILL


def _forked(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def release_portlease(r: Results, mode: Mode, workdir: Path) -> None:
    """A holder process leases the broker's only port; SIGKILL it; lease until granted."""
    broker = Broker(workdir, "release", RELEASE_PORT_PL, RELEASE_PORT_PL)
    probe = broker.connect(reclaim=False)
    samples, attempts = [], []
    try:
        for _ in range(mode.release_n + 2):
            rfd, wfd = os.pipe()

            def hold(wfd: int = wfd) -> None:
                c = Connection(broker.socket, reclaim=False, autostart=False)
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
    r.put("release_portlease", row)
    log(f"release portlease: p50 {row['p50_us']:.0f} us p99 {row['p99_us']:.0f} us")


def release_portserver(r: Results, mode: Mode) -> None:
    """The only port of a one-port pool goes to a live child; SIGKILL it; ask until granted."""
    if not os.path.exists(PORTSERVER):
        return
    ps = PortServer(RELEASE_PORT_PS, RELEASE_PORT_PS)
    samples, attempts = [], []

    def idle() -> None:
        while True:
            signal.pause()

    holder = _forked(idle)
    try:
        if ps.request(holder) is None:
            raise RuntimeError("portserver gave no port")
        for _ in range(mode.release_n + 2):
            nxt = _forked(idle)
            tries = 0
            t0 = time.perf_counter()
            os.kill(holder, signal.SIGKILL)
            os.waitpid(holder, 0)
            while ps.request(nxt) is None:
                tries += 1
            samples.append(time.perf_counter() - t0)
            attempts.append(tries + 1)
            holder = nxt
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        ps.stop()
    row = summary(samples[2:])
    row["max_attempts"] = max(attempts)
    r.put("release_portserver", row)
    log(f"release portserver (one-port pool): p50 {row['p50_us']:.0f} us "
        f"p99 {row['p99_us']:.0f} us")


# ---- footprint


def cold_start(r: Results, mode: Mode, workdir: Path) -> None:
    ssa = shutil.which("systemd-socket-activate")
    if ssa is None:
        r.skipped.append("cold start: systemd-socket-activate missing (apt-get install systemd)")
        return
    samples = []
    for i in range(mode.cold_n):
        d = workdir / f"activate-{i}"
        d.mkdir()
        path = str(d / "portlease.sock")
        proc = subprocess.Popen(
            [ssa, "-l", path, sys.executable, "-m", "portlease.broker", "serve",
             "--state", str(d / "state.jsonl"), "--range", f"{RANGE[0]}-{RANGE[1]}",
             "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                t0 = time.perf_counter()
                try:
                    s.connect(path)
                    break
                except OSError:
                    s.close()
                    if time.monotonic() > deadline:
                        raise RuntimeError("systemd-socket-activate did not listen") from None
                    time.sleep(0.005)
            with s:
                s.sendall(b'{"op":"hello","id":1,"version":1}\n')
                buf = b""
                while b"\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise RuntimeError("activated broker hung up")
                    buf += chunk
                samples.append(time.perf_counter() - t0)
        finally:
            stop_process(proc)
    row = summary(samples)
    r.put("cold_start", row)
    log(f"cold start (socket activation): p50 {row['p50_us'] / 1000:.0f} ms")


def _import_cost(statement: str) -> float:
    """Seconds ``statement`` spends importing, from ``-X importtime``: every top-level
    import after interpreter start-up (``site``), cumulative."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", statement],
                          capture_output=True, text=True, check=True)
    total, after_site = 0, False
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        if name == " site":
            after_site = True
        elif after_site and not name.startswith("  "):
            total += int(parts[1])
    return total / 1e6


def import_time(r: Results, mode: Mode) -> None:
    statements = {
        "import portlease.client": "import portlease.client",
        "from portlease.client import Connection, lease": (
            "from portlease.client import Connection, lease"),
    }
    out: dict[str, Any] = {}
    for label, statement in statements.items():
        out[label] = summary([_import_cost(statement) for _ in range(mode.import_n)])
    check = subprocess.run(
        [sys.executable, "-c",
         "import sys; from portlease.client import Connection, lease; "
         "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} "
         "& {'trio', 'outcome', 'sniffio', 'asyncio'})))"],
        capture_output=True, text=True, check=True)
    out["heavy_modules_imported"] = check.stdout.split()
    r.put("import_client", out)
    log("import: " + ", ".join(f"{k} {v['p50_us'] / 1000:.1f} ms" for k, v in out.items()
                               if isinstance(v, dict))
        + f"; trio/asyncio imported: {out['heavy_modules_imported'] or 'none'}")


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
            "portserver python": run("/usr/bin/python3", "-V").replace("Python ", "") or "-",
        },
        "filesystem of the temp dir": run("stat", "-f", "-c", "%T", tempfile.gettempdir()),
        "ephemeral ports": open("/proc/sys/net/ipv4/ip_local_port_range").read().split(),
    }


def busy_cores(seconds: float = 1.0) -> float:
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


def calibrate() -> dict[str, float]:
    """The machine's speed right now: a fixed Python loop, and the round trip of a line
    between two processes over a Unix socket pair (the floor under any broker's reply)."""
    t0 = time.perf_counter()
    x = 0
    for i in range(1_000_000):
        x += i
    loop_ms = (time.perf_counter() - t0) * 1000
    a, b = socket.socketpair()
    n = 5000

    def echo() -> None:
        a.close()
        while True:
            data = b.recv(4096)
            if not data:
                return
            b.sendall(data)

    pid = _forked(echo)
    b.close()
    line = b"x" * 64 + b"\n"
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        a.sendall(line)
        a.recv(4096)
        samples.append(time.perf_counter() - t)
    a.close()
    os.waitpid(pid, 0)
    return {"python_loop_ms": round(loop_ms, 1), "unix_rtt_p50_us": round(pct(samples, 50) * 1e6, 1)}


# ---------------------------------------------------------------- report


def _us(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    if x >= 10000:
        return f"{x / 1000:.0f} ms"
    if x >= 1000:
        return f"{x / 1000:.2f} ms"
    return f"{x:.0f} µs"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b or a != a or b != b:
        return "-"
    return f"{b / a:.1f}{X}"


def _errs(row: dict[str, Any]) -> str:
    return f" ({len(row['errors'])}+ workers failed: {row['errors'][0]})" if row.get("errors") else ""


def targets(d: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, ratio or note, met)."""
    pl = d.get("portlease_scale", {})
    out: list[tuple[str, str, str, bool | None]] = []
    h2h = d.get("head_to_head", {})
    lease1 = h2h.get("portlease_lease1", {}).get("p50_us")
    cycle1 = h2h.get("portlease_cycle1", {}).get("p50_us")
    ps0 = h2h.get("portserver", {}).get("p50_us")
    if lease1 and ps0:
        out.append((f"count-1 allocation p50 ≥ 4{X} faster than portserver",
                    f"{_us(lease1)} vs {_us(ps0)}",
                    f"{ps0 / lease1:.1f}{X} (lease+release {ps0 / cycle1:.1f}{X})", ps0 / lease1 >= 4))
    fl1k = h2h.get("filelock_1000", {}).get("p50_us")
    if lease1 and fl1k:
        out.append((f"count-1 p50 ≥ 10{X} faster than file-lock+JSON with 1,000 held",
                    f"{_us(lease1)} vs {_us(fl1k)}",
                    f"{fl1k / lease1:.1f}{X} (lease+release {fl1k / cycle1:.1f}{X})",
                    fl1k / lease1 >= 10))
    tp = {row["clients"]: row["per_s"] for row in d.get("throughput", {}).get("portlease", [])}
    if 32 in tp:
        out.append(("throughput, 32 clients ≥ 5,000 leases/s", f"{tp[32]:,.0f}/s",
                    "lease+release cycles", tp[32] >= 5000))
    c0 = pl.get("0", {}).get("cycle1", {}).get("p50_us")
    l0 = pl.get("0", {}).get("lease1", {}).get("p50_us")
    c10k = pl.get("10000", {}).get("cycle1", {}).get("p50_us")
    l10k = pl.get("10000", {}).get("lease1", {}).get("p50_us")
    if c0 and c10k and l0 and l10k:
        worst = max(c10k / c0, l10k / l0)
        out.append(("p50 with 10,000 held within 20% of none",
                    f"lease {_us(l10k)} vs {_us(l0)}; lease+release {_us(c10k)} vs {_us(c0)}",
                    f"{(worst - 1) * 100:+.0f}% (worse of the two)", worst <= 1.2))
    rel = d.get("release_portlease", {}).get("p99_us")
    if rel:
        out.append(("release after SIGKILL ≤ 5 ms p99", _us(rel), "", rel <= 5000))
    cli = d.get("cli", {}).get("p50_us")
    if cli:
        out.append(("CLI wrapper `portlease lease -n 1 -- true` ≤ 100 ms", f"p50 {_us(cli)}",
                    f"p99 {_us(d['cli']['p99_us'])}", cli <= 100_000))
    if cycle1 and "0" in pl:
        out.append(("core round trip count-1 (lease+release) p50 ≤ 150 µs", _us(cycle1),
                    f"default client; without the reclaim thread "
                    f"{_us(h2h['portlease_cycle1_noreclaim']['p50_us'])}", cycle1 <= 150))
    return out


def render(r: Results, cmdline: str) -> str:
    d = r.data
    m = d["machine"]
    pl = d.get("portlease_scale", {})
    ps = d.get("portserver_scale", {})
    fl = d.get("filelock_scale", {})
    lines = [f"# portlease benchmark ({r.mode})", ""]
    lines.append(f"`{cmdline}` at commit `{m['commit']}`, {m['date']}; "
                 f"{m['cores']} {X} {m['cpu']}, {m['memory']}, Linux {m['kernel']}, "
                 f"Python {m['python']}.")
    lines.append("")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".")
    lines.append(f"Other load: {d['busy_start']:.2f} of {m['cores']} cores busy in the second "
                 f"before the run, {d['busy_end']:.2f} in the second after it; load average "
                 f"{d['load_start']} at the start, {d['load_end']} at the end.")
    cs0, cs1 = d["calibration_start"], d["calibration_end"]
    lines.append(f"Machine speed (this VM's varies from minute to minute): a 10⁶-step Python loop "
                 f"took {cs0['python_loop_ms']} ms before and {cs1['python_loop_ms']} ms after; "
                 f"a line's round trip between two processes over a Unix socket pair, p50 "
                 f"{cs0['unix_rtt_p50_us']} µs before and {cs1['unix_rtt_p50_us']} µs after.")
    lines.append("")

    lines += ["## Latency of one allocation, as the caller sees it", "",
              "| contender | what is timed | p50 | p99 | p50 ÷ portlease `lease(1)` p50 |",
              "|---|---|---|---|---|"]
    h2h = d.get("head_to_head", {})
    base = h2h.get("portlease_lease1", {}).get("p50_us")

    def row(name: str, what: str, s: dict[str, Any] | None, ratio: bool = True) -> None:
        if not s:
            return
        lines.append(f"| {name} | {what} | {_us(s['p50_us'])} | {_us(s['p99_us'])} | "
                     f"{_ratio(base, s['p50_us']) if ratio else ''} |")

    p0 = pl.get("0", {})
    row("portlease, sync client", "`lease(1)` on an open connection", h2h.get("portlease_lease1"),
        False)
    row("portlease, sync client", "`lease(1)` + `release` round trip",
        h2h.get("portlease_cycle1"))
    row("portlease, sync client", "`lease(10)`", p0.get("lease10"))
    row("portlease, sync client", "`lease(10)` + `release`", p0.get("cycle10"))
    row("portlease, sync client, `reclaim=False`", "`lease(1)` + `release`",
        h2h.get("portlease_cycle1_noreclaim"))
    row("portlease, sync client", "`ping` (protocol floor)", p0.get("ping"))
    row("portlease, sync client", "`with lease(1)` on a new connection (connect, hello, lease, "
        "close)", p0.get("fresh1"))
    row("portlease CLI", "`portlease lease -n 1 -- true`, whole process", d.get("cli"), False)
    row("(python itself)", "`python -c pass`, whole process", d.get("python_startup"), False)
    row("portpicker portserver", "one request (connect, pid, port), pool steady state",
        h2h.get("portserver"))
    row("file-lock + JSON", "`allocate(1)`, empty table", h2h.get("filelock_0"))
    row("file-lock + JSON", "`allocate(1)`, 1,000 ranges held", h2h.get("filelock_1000"))
    lines.append("")
    if h2h:
        lines.append(f"The `lease(1)`, both lease+release, portserver and file-lock rows were taken in "
                     f"{h2h['rounds']} interleaved rounds, so that a slow spell of the machine "
                     "falls on every contender; the other rows were taken one after another.")
        lines.append("")

    lines += ["## Scale: allocation p50 / p99 with ranges already held", "",
              "| held | portlease `lease(1)` | portlease lease+release | portserver request "
              "| file-lock `allocate(1)` |", "|---|---|---|---|---|"]
    for level in sorted({int(k) for k in pl} | {int(k) for k in fl}):
        k = str(level)

        def cell(s: dict[str, Any] | None) -> str:
            return f"{_us(s['p50_us'])} / {_us(s['p99_us'])}" if s else "-"

        lines.append(f"| {level:,} | {cell(pl.get(k, {}).get('lease1'))} | "
                     f"{cell(pl.get(k, {}).get('cycle1'))} | {cell(ps.get(k))} | "
                     f"{cell(fl.get(k))} |")
    if ps:
        lines.append("")
        lines.append(f"portserver pool {ps['pool'][0]}-{ps['pool'][1]}, held ports spread over "
                     "it, the rest last given to a process since killed (its steady state); "
                     "file-lock: release of the measured entry untimed, table kept at the level.")
    lines.append("")

    tp = d.get("throughput", {})
    if tp.get("portlease"):
        lines += ["## Throughput (client processes, 2 cores shared with the server)", "",
                  "| clients | portlease lease+release/s (broker CPU) | portserver requests/s (CPU) "
                  "| file-lock allocations/s |", "|---|---|---|---|"]
        pst = {x["clients"]: x for x in tp.get("portserver", [])}
        flt = {x["clients"]: x for x in tp.get("filelock", [])}
        for x in tp["portlease"]:
            c = x["clients"]
            a = f"{x['per_s']:,.0f} ({x.get('server_cpu', 0):.0%})" + _errs(x)
            b = (f"{pst[c]['per_s']:,.0f} ({pst[c].get('server_cpu', 0):.0%})" + _errs(pst[c])
                 if c in pst else "-")
            f = f"{flt[c]['per_s']:,.0f}" + _errs(flt[c]) if c in flt else "-"
            lines.append(f"| {c} | {a} | {b} | {f} |")
        lines.append("")

    lines += ["## Release after SIGKILL of the holder, and footprint", "",
              "| figure | portlease | portserver | file-lock + JSON |", "|---|---|---|---|"]
    rp, rs = d.get("release_portlease"), d.get("release_portserver")
    lines.append(
        "| SIGKILL → grantable again, p50 / p99 | "
        + (f"{_us(rp['p50_us'])} / {_us(rp['p99_us'])}" if rp else "-") + " | "
        + (f"{_us(rs['p50_us'])} / {_us(rs['p99_us'])} (best case: one-port pool; otherwise "
           "when the scan next reaches the port)" if rs else "-")
        + f" | {filelock_alloc.TTL} s (the entry's expiry; by the format, not measured) |")
    top = str(max(int(k) for k in pl)) if pl else "0"
    ps_top = max((int(k) for k, v in ps.items() if k != "pool" and v), default=None)
    lines.append(
        f"| server RSS idle / with {int(top):,} held | "
        + (f"{pl['0']['broker_rss_kib'] / 1024:.1f} MiB / {pl[top]['broker_rss_kib'] / 1024:.1f} MiB"
           if pl else "-") + " | "
        + (f"{ps[str(ps_top)]['rss_idle_kib'] / 1024:.1f} MiB / "
           f"{ps[str(ps_top)]['rss_kib'] / 1024:.1f} MiB (with {ps_top:,} held)"
           if ps_top is not None else "-")
        + " | no server; table "
        + (f"{fl[top]['table_bytes'] / 1024:.0f} KiB with {int(top):,} held" if top in fl else "-")
        + " |")
    cs = d.get("cold_start")
    if cs:
        lines.append(f"| cold start under socket activation (connect → first reply), p50 / p99 | "
                     f"{_us(cs['p50_us'])} / {_us(cs['p99_us'])} | - | - |")
    ic = d.get("import_client")
    if ic:
        mods = ", ".join(ic["heavy_modules_imported"]) or "none"
        for label, v in ic.items():
            if isinstance(v, dict):
                lines.append(f"| `{label}` (-X importtime, cumulative), p50 | "
                             f"{_us(v['p50_us'])} | - | - |")
        lines.append(f"| trio or asyncio loaded by the sync client | {mods} | - | - |")
    lines.append("")

    lines += ["## Targets", "", "| target | measured | ratio / note | met |", "|---|---|---|---|"]
    for name, measured, note, met in targets(d):
        lines.append(f"| {name} | {measured} | {note} | "
                     f"{'yes' if met else 'no' if met is not None else '-'} |")
    if r.skipped:
        lines += ["", "Skipped: " + "; ".join(r.skipped) + "."]
    lines.append("")
    return "\n".join(lines)


def chart(r: Results, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    d = r.data
    pl, ps, fl = (d.get(k, {}) for k in ("portlease_scale", "portserver_scale", "filelock_scale"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    names, vals = [], []
    h2h = d.get("head_to_head", {})
    for name, s in (("portlease\nlease(1)", h2h.get("portlease_lease1")),
                    ("portlease\nlease+release", h2h.get("portlease_cycle1")),
                    ("portserver", h2h.get("portserver")),
                    ("file-lock\n0 held", h2h.get("filelock_0")),
                    ("file-lock\n1,000 held", h2h.get("filelock_1000"))):
        if s:
            names.append(name)
            vals.append(s["p50_us"])
    ax.bar(names, vals, color=["#2a7", "#2a7", "#c73", "#57c", "#57c"][: len(vals)])
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency (µs, log)")
    ax.set_title("One count-1 allocation")
    base = vals[0] if vals else None
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.0f}" + (f"\n{v / base:.1f}{X}" if base and i else ""), ha="center",
                va="bottom", fontsize=8)
    ax = axes[1]
    for label, src, key in (("portlease lease(1)", pl, "lease1"), ("portserver", ps, None),
                            ("file-lock", fl, None)):
        xs, ys = [], []
        for k, v in src.items():
            if k == "pool" or not v:
                continue
            s = v[key] if key else v
            xs.append(max(int(k), 1))
            ys.append(s["p50_us"])
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ranges held (0 plotted at 1)")
    ax.set_ylabel("p50 (µs, log)")
    ax.set_title("Allocation cost vs. ranges held")
    ax.legend(fontsize=8)
    ax = axes[2]
    for label, key in (("portlease (lease+release)", "portlease"), ("portserver", "portserver"),
                       ("file-lock", "filelock")):
        rows = d.get("throughput", {}).get(key, [])
        if rows:
            ax.plot([x["clients"] for x in rows], [x["per_s"] for x in rows], marker="o",
                    label=label)
    ax.axhline(5000, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent client processes")
    ax.set_ylabel("allocations / s (log)")
    ax.set_title("Throughput")
    ax.legend(fontsize=8)
    fig.suptitle(f"portlease benchmark ({r.mode}) at {d['machine']['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="few samples; well under 2 minutes")
    group.add_argument("--full", action="store_true", help="the published figures (default)")
    parser.add_argument("--docs", action="store_true",
                        help="also replace the results section of docs/performance.md")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="output directory (default bench/results)")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    cmdline = "python bench/run.py --" + mode.name
    r = Results(mode.name)
    started = time.monotonic()
    r.put("machine", machine())
    r.put("load_start", loadavg())
    r.put("busy_start", busy_cores())
    r.put("calibration_start", calibrate())
    log(f"{cmdline}: commit {r.data['machine']['commit']}, load {r.data['load_start']}")
    def section(fn: Any, *args: Any) -> None:
        # One measurement that fails (a peer refusing on a busy machine, a port
        # taken by someone else) is reported as skipped; the others still run.
        try:
            fn(r, mode, *args)
        except Exception as exc:
            log(f"{fn.__name__}: FAILED: {exc!r}")
            r.skipped.append(f"{fn.__name__}: failed: {exc}")

    with workdir() as wd:
        broker = Broker(wd, "main", *RANGE)
        try:
            r.put("broker_rss_start_kib", rss_kib(broker.pid))
            section(portlease_latency_and_scale, broker, wd)
            section(head_to_head, broker, wd)
            section(cli_wrapper, broker)
            section(throughput, broker, wd)
        finally:
            broker.stop()
        section(portserver_scale)
        section(filelock_scale, wd)
        section(release_portlease, wd)
        section(release_portserver)
        section(cold_start, wd)
        section(import_time)
    r.put("load_end", loadavg())
    r.put("busy_end", busy_cores())
    r.put("calibration_end", calibrate())
    r.put("seconds", round(time.monotonic() - started, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    md = render(r, cmdline)
    (args.out / f"{mode.name}.md").write_text(md)
    (args.out / f"{mode.name}.json").write_text(
        json.dumps({"mode": mode.name, "skipped": r.skipped, **r.data}, indent=1) + "\n")
    png = chart(r, args.out / f"{mode.name}.png")
    if args.docs:
        update_docs(md)
    print(md)
    log(f"done in {r.data['seconds']} s; wrote {args.out}/{mode.name}.md/.json"
        + ("/.png" if png else " (no matplotlib: no chart)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
