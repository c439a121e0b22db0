"""Load: 10,000 concurrent connections each holding a lease, floods, slow-loris, fd exhaustion.

    python bench/load.py                 # 10,000 connections (about 1-2 minutes on 2 cores)
    python bench/load.py --short         # 3,000 connections and short phases (CI)
    python bench/load.py --hostile       # as root: one uid floods at its caps while another
                                         # uid leases (issues 11 and 20; --short: a few s each)
    python bench/load.py --renew 1000000 # one detached lease renewed N times: broker RSS

Phases, each against a real ``portlease serve`` process:

1. idle: grant round trip (lease count 1 on an open connection) p50/p99, RSS;
2. ramp: worker processes (bench/load_worker.py) open N connections, non-blocking,
   each sending hello + lease at once; a probe client keeps leasing meanwhile;
3. loaded: all N leases held (checked: N distinct ports); probe grant p50/p99,
   ``status`` latency, broker RSS (VmRSS/VmHWM from /proc) and open fds;
   and a normal client's grant while another client asks for status in a loop;
4. mass release: the workers close everything; time until status shows 0 leases;
5. slow-loris: connections trickle one byte at a time, never a newline; probe meanwhile;
6. flood: processes connect/hello/close in a tight loop; probe meanwhile;
7. fd limit: a broker under RLIMIT_NOFILE 256 gets 300 connections: past its limit
   each gets a ``busy`` error line and is closed, the broker logs it, and once
   connections close it serves new ones again.

Exit status 1 when a behaviour check fails (a lease missing or shared, a
refused connection without its ``busy`` line, no recovery after the fd limit,
the broker dying). Latencies are reported, not judged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rawproto import Raw

HERE = Path(__file__).resolve().parent
PY = sys.executable


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def lat(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (f"n={len(values)} p50 {pct(values, 50) * 1e3:.2f} ms p99 {pct(values, 99) * 1e3:.2f} ms "
            f"max {max(values) * 1e3:.1f} ms")


def hello(path: str) -> Raw:
    return Raw(path, timeout=30)


@dataclass
class Broker:
    dir: Path
    range: str
    config: dict[str, Any]
    nofile: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.dir / "b.sock")

    @property
    def log(self) -> Path:
        return self.dir / "broker.log"

    def start(self) -> Broker:
        cfg = self.dir / "broker.toml"
        cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in self.config.items()))
        limit = self.nofile

        def lower_nofile() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "portlease", "serve", "--config", str(cfg), "--socket", self.socket,
                 "--state", str(self.dir / "state.jsonl"), "--range", self.range],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=lower_nofile)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                hello(self.socket).close()
                return self
            time.sleep(0.02)
        raise RuntimeError(f"broker did not start: {self.log.read_text()[-2000:]}")

    def proc_status(self) -> dict[str, int]:
        assert self.proc is not None
        out: dict[str, int] = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])  # kB
        out["fds"] = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        return out

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Probe:
    """A normal client leasing and releasing one port in a loop; grant latencies per phase."""

    path: str
    interval: float = 0.005
    samples: list[float] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def rtts(self, n: int) -> list[float]:
        c = hello(self.path)
        out = []
        try:
            for _ in range(n):
                t = time.perf_counter()
                got = c.call({"op": "lease", "count": 1})
                out.append(time.perf_counter() - t)
                c.call({"op": "release", "token": got["token"]})
        finally:
            c.close()
        return out

    def start(self) -> None:
        self.samples, self.errors = [], 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        c = hello(self.path)
        for _ in range(1_000_000):
            if self._stop.is_set():
                break
            t = time.perf_counter()
            got = c.call({"op": "lease", "count": 1})
            if got.get("reply") != "granted":
                self.errors += 1
            else:
                self.samples.append(time.perf_counter() - t)
                c.call({"op": "release", "token": got["token"]})
            time.sleep(self.interval)
        c.close()

    def stop(self) -> list[float]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)
        return self.samples


def worker(role: str, path: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PY, str(HERE / "load_worker.py"), "--role", role, "--socket", path, *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def main_load(args: argparse.Namespace, out: Path, failures: list[str], figures: dict[str, Any]) -> None:
    n = args.conns
    d = out / "loaded"
    d.mkdir(parents=True, exist_ok=True)
    b = Broker(d, args.range, {"max_ports_per_uid": n + 1000, "log_level": "warning"}).start()
    probe = Probe(b.socket)
    try:
        idle = probe.rtts(args.samples)
        rss0 = b.proc_status()
        print(f"idle broker: grant round trip {lat(idle)}; RSS {rss0['VmRSS'] / 1024:.1f} MiB")

        # ---- ramp
        per = [n // args.workers + (1 if i < n % args.workers else 0) for i in range(args.workers)]
        probe.start()
        t0 = time.monotonic()
        ws = [worker("hold", b.socket, "--n", str(k), "--id", str(i)) for i, k in enumerate(per)]
        reports = []
        for w in ws:
            assert w.stdout is not None
            reports.append(json.loads(w.stdout.readline()))
        ramp = time.monotonic() - t0
        during_ramp = probe.stop()
        grant_lat = [x for r in reports for x in r["latencies"]]
        ports = [p for r in reports for p in r["ports"]]
        errors: dict[str, int] = {}
        for r in reports:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        eagain = sum(r.get("eagain", 0) for r in reports)
        print(f"ramp: {len(ports)} of {n} connections granted in {ramp:.2f} s "
              f"({len(ports) / ramp:.0f} grants/s); errors {errors or 0}; connect() retried "
              f"{eagain} times on a full listen backlog (EAGAIN)")
        print(f"  per-connection hello+lease latency during the ramp: {lat(grant_lat)}")
        print(f"  a normal client's grant during the ramp: {lat(during_ramp)}")
        if len(ports) != n or len(set(ports)) != n:
            failures.append(f"{len(ports)} grants, {len(set(ports))} distinct ports for {n} connections")

        # ---- loaded
        c = hello(b.socket)
        t = time.perf_counter()
        st = c.call({"op": "status"})
        status_s = time.perf_counter() - t
        summary = st["summary"]
        c.close()
        if summary["leases"] != n:
            failures.append(f"status shows {summary['leases']} leases, expected {n}")
        loaded = probe.rtts(args.samples)
        rss1 = b.proc_status()
        print(f"loaded ({summary['leases']} leases, {summary['clients']} clients): grant round trip "
              f"{lat(loaded)}")
        print(f"  status with {summary['leases']} leases: {status_s * 1e3:.0f} ms "
              f"(the event loop is busy for that long)")
        print(f"  broker RSS {rss1['VmRSS'] / 1024:.1f} MiB (peak {rss1['VmHWM'] / 1024:.1f} MiB), "
              f"{rss1['fds']} open fds; {(rss1['VmRSS'] - rss0['VmRSS']) / n:.1f} kB per held connection")

        # ---- a client asking for status in a loop while everything is held
        probe.start()
        looper = worker("status", b.socket, "--seconds", str(args.phase))
        assert looper.stdout is not None
        loop_out = json.loads(looper.stdout.readline())
        looper.wait(30)
        during_status = probe.stop()
        print(f"  another process asking for status in a loop ({loop_out['calls'] / args.phase:.1f} "
              f"calls/s, {loop_out['bytes'] / 1e6:.1f} MB each): a normal client's grant "
              f"{lat(during_status)}")
        figures["status_loop_p99_ms"] = pct(during_status, 99) * 1e3

        # ---- mass release
        t0 = time.monotonic()
        for w in ws:
            assert w.stdin is not None
            w.stdin.write("close\n")
            w.stdin.flush()
        for w in ws:
            w.wait(60)
        c = hello(b.socket)
        left = -1
        for _ in range(3000):
            left = c.call({"op": "status"})["summary"]["leases"]
            if left == 0:
                break
            time.sleep(0.01)
        c.close()
        released = time.monotonic() - t0
        print(f"mass release: {n} connections closed, leases 0 after {released:.2f} s")
        if left != 0:
            failures.append(f"{left} leases left after the mass release")

        # ---- slow-loris
        probe.start()
        loris = worker("loris", b.socket, "--n", str(args.loris), "--seconds", str(args.phase))
        assert loris.stdout is not None
        loris_out = json.loads(loris.stdout.readline())
        loris.wait(30)
        during_loris = probe.stop()
        print(f"slow-loris ({loris_out['connections']} connections, one byte each every 5 ms, "
              f"{loris_out['bytes_each']} bytes each, no newline): a normal client's grant "
              f"{lat(during_loris)}")

        # ---- flood
        probe.start()
        floods = [worker("flood", b.socket, "--seconds", str(args.phase)) for _ in range(args.flooders)]
        flood_out = []
        for f in floods:
            assert f.stdout is not None
            flood_out.append(json.loads(f.stdout.readline()))
            f.wait(30)
        during_flood = probe.stop()
        total = sum(x["connections"] for x in flood_out)
        failed = sum(x["failed"] for x in flood_out)
        print(f"flood ({args.flooders} processes, {total / args.phase:.0f} connections/s, half "
              f"dropped before hello, {failed} failed): a normal client's grant {lat(during_flood)}")
        if not b.alive():
            failures.append("the loaded broker died")
        rss2 = b.proc_status()
        print(f"  broker RSS after everything {rss2['VmRSS'] / 1024:.1f} MiB, {rss2['fds']} open fds")
        figures.update({
            "conns": n, "idle_p50_ms": pct(idle, 50) * 1e3, "idle_p99_ms": pct(idle, 99) * 1e3,
            "loaded_p50_ms": pct(loaded, 50) * 1e3, "loaded_p99_ms": pct(loaded, 99) * 1e3,
            "ramp_grants_per_s": len(ports) / ramp, "ramp_probe_p99_ms": pct(during_ramp, 99) * 1e3,
            "rss_idle_mib": rss0["VmRSS"] / 1024, "rss_loaded_mib": rss1["VmRSS"] / 1024,
            "status_ms": status_s * 1e3, "loris_p99_ms": pct(during_loris, 99) * 1e3,
            "flood_p99_ms": pct(during_flood, 99) * 1e3, "flood_conn_per_s": total / args.phase,
        })
    finally:
        b.stop()


def fd_limit(args: argparse.Namespace, out: Path, failures: list[str], figures: dict[str, Any]) -> None:
    d = out / "fdlimit"
    d.mkdir(parents=True, exist_ok=True)
    b = Broker(d, args.fd_range, {"log_level": "info"}, nofile=256).start()
    conns: list[Raw] = []
    try:
        served, busy, other = [], 0, 0
        for _ in range(300):
            r = Raw(b.socket, timeout=10, hello=False)
            with contextlib.suppress(OSError):
                r.sock.sendall(b'{"op":"hello","id":0,"version":1}\n')
            try:
                first = r.line()
            except (OSError, ValueError):
                first = {}
            if first.get("reply") == "hello":
                served.append(r)
            else:
                busy += first.get("code") == "busy"
                other += first.get("code") != "busy"
                r.close()
        conns = served
        time.sleep(2.0)  # refusals are logged at most once a second, with their count
        logged = sum(int(n) for n in re.findall(r"refused (\d+) connection", b.log.read_text()))
        print(f"fd limit 256: of 300 connections {len(served)} served, {busy} got 'busy' and were "
              f"closed, {other} got neither; the broker logged {logged} refusals")
        if busy == 0 or other:
            failures.append(f"fd limit: busy {busy}, without a reply {other}")
        if logged < busy:
            failures.append(f"fd limit: {busy} refusals but {logged} logged")
        held = served[0].call({"op": "lease", "count": 2})
        for r in served[-100:]:
            r.close()
        del served[-100:]
        time.sleep(0.2)
        again = 0
        for _ in range(50):
            r = hello(b.socket)
            again += 1
            served.append(r)
        ok = held.get("reply") == "granted" and served[0].call({"op": "ping"})["reply"] == "pong"
        print(f"  after 100 closed: {again} of 50 new connections served; an old client's lease and "
              f"ping {'work' if ok else 'FAIL'}; broker {'alive' if b.alive() else 'DEAD'}")
        if again != 50 or not ok or not b.alive():
            failures.append("fd limit: no recovery after connections closed")
        figures.update({"fd_served": len(conns), "fd_busy": busy})
    finally:
        for r in conns:
            r.close()
        b.stop()


# ------------------------------------------------------------------ hostile neighbour

FLOOD_USER, HONEST_USER = "plbench-flood", "plbench-honest"
SYSTEM_PY = "/usr/bin/python3"  # the workers are stdlib only; /root (pyenv) is closed to others


def ensure_user(name: str) -> tuple[int, int]:
    """A real second (and third) uid for the hostile-neighbour run: ``useradd`` if missing."""
    import pwd

    for attempt in range(10):
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            pass
        # useradd fails while another one (a concurrent test's) holds /etc/passwd's lock.
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                               "/usr/sbin/nologin", name], capture_output=True, text=True)
        if done.returncode not in (0, 9):  # 9: created meanwhile by someone else
            if attempt == 9:
                raise RuntimeError(f"useradd {name}: {done.stderr.strip()}")
            time.sleep(0.3)
    pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def as_user(user: str, *cmd: str) -> list[str]:
    uid, gid = ensure_user(user)
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *cmd]


def rss_sampler(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.05):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    peak[0] = max(peak[0], int(line.split()[1]))


def sampled_broker(d: Path, args: argparse.Namespace) -> tuple[Broker, list[int], threading.Event]:
    """A root broker in ``d`` that both users reach (socket 0666 in a 0755 directory), with
    its VmRSS sampled: the peak in KiB is ``peak[0]`` until ``stop`` is set."""
    os.chmod(d, 0o755)
    b = Broker(d, args.hostile_range, {"log_level": "warning", "socket_mode": "0666"}).start()
    peak = [0]
    stop = threading.Event()
    assert b.proc is not None
    threading.Thread(target=rss_sampler, args=(b.proc.pid, stop, peak), daemon=True).start()
    return b, peak, stop


def hostile_neighbour(args: argparse.Namespace, short: Path, figures: dict[str, Any]) -> None:
    """One uid floods at its caps while an honest client of another uid leases and releases.

    The broker runs as root with a socket both users may reach (mode 0666 in a
    0755 directory). Phase 1: the honest client alone (baseline). Phase 2: the
    flooder (bench/load_worker.py --role hostile, as FLOOD_USER) opens
    connections up to its cap and beyond, holds leases with long notes, writes
    pipelined ``status`` requests it never reads, and trickles slow-loris
    partial lines, while the honest client (as HONEST_USER) goes on. Reported:
    the honest client's latencies in both phases and the broker's peak RSS
    (sampled VmRSS, and VmHWM at the end). Figures are reported, not judged.
    """
    if os.geteuid() != 0:
        raise SystemExit("--hostile needs root (useradd, setpriv)")
    d = short / "hostile"
    d.mkdir()
    os.chmod(short, 0o755)
    b, peak, stop = sampled_broker(d, args)
    worker_py = str(HERE / "load_worker.py")

    def honest(seconds: float) -> subprocess.Popen[str]:
        return subprocess.Popen(
            as_user(HONEST_USER, SYSTEM_PY, worker_py, "--role", "honest", "--socket", b.socket,
                    "--seconds", str(seconds), "--interval", "0.002"),
            stdout=subprocess.PIPE, text=True)

    def result(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
        out, _ = proc.communicate(timeout=args.hostile_seconds * 4 + 120)
        if proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"{what} failed (exit {proc.returncode})")
        parsed: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return parsed

    try:
        rss_idle = b.proc_status()["VmRSS"]
        baseline = result(honest(args.hostile_seconds / 2), "honest client (alone)")
        flood = subprocess.Popen(
            as_user(FLOOD_USER, SYSTEM_PY, worker_py, "--role", "hostile", "--socket", b.socket,
                    "--n", str(args.hostile_conns), "--leases", str(args.hostile_leases),
                    "--note", "1000",
                    "--seconds", str(args.hostile_seconds), "--interval", "0.01"),
            stdout=subprocess.PIPE, text=True)
        time.sleep(min(5.0, args.hostile_seconds / 4))  # let it reach its caps first
        during = honest(args.hostile_seconds * 0.6)
        loaded = result(during, "honest client (during the flood)")
        flooder = result(flood, "flooder")
        alive = b.alive()
        status = b.proc_status() if alive else {}
    finally:
        stop.set()
        b.stop()
    row = {
        "baseline": baseline, "during_flood": loaded, "flooder": flooder,
        "broker_rss_idle_mib": rss_idle / 1024, "broker_rss_peak_mib": peak[0] / 1024,
        "broker_vmhwm_mib": status.get("VmHWM", 0) / 1024, "broker_alive": alive,
        "targets": {"honest_p99_ms": 50, "rss_mib": 256}, "leases_asked": args.hostile_leases,
        "commit": subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": args.hostile_seconds, "load_average": os.getloadavg(),
    }
    figures["hostile"] = row
    ok_p99 = loaded["all"].get("p99_ms", float("inf")) <= 50
    ok_rss = max(peak[0], status.get("VmHWM", 0)) / 1024 <= 256
    print(f"hostile neighbour: flooder (uid {FLOOD_USER}) opened {flooder['connections']} connections "
          f"(refused: {flooder['refused']}), held {flooder['leases']} leases with "
          f"{flooder['note_bytes']}-byte notes, wrote {flooder['status_bytes_written']:,} bytes of "
          f"pipelined status, {flooder['loris_bytes']:,} slow-loris bytes; "
          f"{flooder['closed_by_broker']} of its connections were closed by the broker")
    def fmt(x: dict[str, Any]) -> str:
        if not x.get("n"):
            return "n=0"
        return f"p50 {x['p50_ms']:.2f} ms, p99 {x['p99_ms']:.2f} ms, max {x['max_ms']:.1f} ms (n={x['n']})"

    print(f"  honest client (uid {HONEST_USER}) alone: open connection {fmt(baseline['open'])}; "
          f"new connection {fmt(baseline['fresh'])}")
    print(f"  honest client during the flood: open connection {fmt(loaded['open'])}; new connection "
          f"{fmt(loaded['fresh'])}; errors {loaded['errors']}")
    print(f"  broker RSS idle {rss_idle / 1024:.1f} MiB, peak {peak[0] / 1024:.1f} MiB "
          f"(VmHWM {status.get('VmHWM', 0) / 1024:.1f} MiB), alive: {alive}")
    print(f"  issue 11 figure: honest p99 ≤ 50 ms: {'met' if ok_p99 else 'MISSED'} "
          f"({loaded['all'].get('p99_ms', float('nan')):.1f} ms); broker RSS ≤ 256 MiB: "
          f"{'met' if ok_rss else 'MISSED'}")


FLOODS: dict[str, tuple[str, ...]] = {
    # issue 20: many connections of one uid, 64 cheap requests in flight on each
    "ping": ("--role", "pipeline", "--request", "ping", "--depth", "64"),
    "status-after": ("--role", "pipeline", "--request", "status-after", "--depth", "64"),
    # issue 20: one ``status`` of a large page on each connection, never read (the issue's
    # pages were ~700 kB; 190 leases with escaped notes and command lines come near that
    # within 200 ports)
    "pages": ("--role", "pages", "--leases", "190", "--note", "1000"),
}


def hostile_flood(args: argparse.Namespace, short: Path, kind: str) -> dict[str, Any]:
    """The honest uid's latency alone, then while FLOOD_USER runs flood ``kind`` (FLOODS),
    on a broker of its own (so its peak memory is this flood's)."""
    d = short / f"flood-{kind}"
    d.mkdir()
    b, peak, stop = sampled_broker(d, args)
    worker_py = str(HERE / "load_worker.py")

    def honest(seconds: float) -> dict[str, Any]:
        proc = subprocess.run(
            as_user(HONEST_USER, SYSTEM_PY, worker_py, "--role", "honest", "--socket", b.socket,
                    "--seconds", str(seconds), "--interval", "0.002"),
            stdout=subprocess.PIPE, text=True, timeout=seconds * 4 + 120, check=True)
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return out

    flood: subprocess.Popen[str] | None = None
    try:
        rss_idle = b.proc_status()["VmRSS"]
        baseline = honest(args.flood_seconds / 2)
        flood = subprocess.Popen(
            # --pad: control characters in the command line, which ``status`` shows escaped
            # (six bytes each), so that each page is larger still.
            as_user(FLOOD_USER, SYSTEM_PY, worker_py, "--pad", "\x01" * 300, "--socket", b.socket,
                    "--n", str(args.flood_conns), "--seconds", str(args.flood_seconds * 10 + 60),
                    *FLOODS[kind]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert flood.stdout is not None and flood.stdin is not None
        ready = json.loads(flood.stdout.readline())
        loaded = honest(args.flood_seconds)
        status = b.proc_status() if b.alive() else {}
        flood.stdin.write("stop\n")
        flood.stdin.flush()
        flooder = json.loads(flood.stdout.readline())
        flood.wait(60)
        alive = b.alive()
    finally:
        stop.set()
        if flood is not None and flood.poll() is None:
            flood.kill()
        b.stop()
    row = {"baseline": baseline, "during_flood": loaded, "flooder": {**ready, **flooder},
           "broker_rss_idle_mib": rss_idle / 1024, "broker_rss_peak_mib": peak[0] / 1024,
           "broker_vmhwm_mib": status.get("VmHWM", 0) / 1024, "broker_alive": alive}

    def fmt(x: dict[str, Any]) -> str:
        return f"p50 {x['p50_ms']:.2f} ms p99 {x['p99_ms']:.2f} ms (n={x['n']})" if x.get("n") else "n=0"

    print(f"flood {kind!r} ({ready.get('connections')} connections of uid {FLOOD_USER}): honest uid "
          f"alone {fmt(baseline['all'])}; during {fmt(loaded['all'])}, errors {loaded['errors']}; "
          f"broker VmHWM {row['broker_vmhwm_mib']:.1f} MiB (idle RSS {rss_idle / 1024:.1f} MiB); "
          f"flooder got {flooder.get('replies', '-')} replies; broker alive: {alive}")
    return row


def renew_heap(args: argparse.Namespace, short: Path, figures: dict[str, Any]) -> None:
    """Broker RSS before and after one detached lease is renewed ``--renew`` times (issue 20)."""
    d = short / "renew"
    d.mkdir()
    b = Broker(d, args.hostile_range, {"log_level": "warning"}).start()
    try:
        before = b.proc_status()
        done = subprocess.run([PY, str(HERE / "load_worker.py"), "--role", "renew", "--socket", b.socket,
                               "--n", str(args.renew), "--depth", "1000"],
                              stdout=subprocess.PIPE, text=True, check=True, timeout=3600)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        time.sleep(1.0)  # a tick or two: what expiry frees, it has freed
        after = b.proc_status()
    finally:
        b.stop()
    row = {"renews": out["renews"], "seconds": out["seconds"], "rss_before_mib": before["VmRSS"] / 1024,
           "rss_after_mib": after["VmRSS"] / 1024, "vmhwm_mib": after["VmHWM"] / 1024}
    figures["renew"] = row
    print(f"renew: {row['renews']:,} renews of one detached lease in {row['seconds']:.1f} s; broker RSS "
          f"{row['rss_before_mib']:.1f} -> {row['rss_after_mib']:.1f} MiB (peak {row['vmhwm_mib']:.1f} MiB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=4, help="client processes sharing the connections")
    ap.add_argument("--range", default="10000-20999")
    ap.add_argument("--fd-range", default="20500-20599")
    ap.add_argument("--samples", type=int, default=1000, help="probe round trips per measurement")
    ap.add_argument("--phase", type=float, default=10.0, help="seconds of slow-loris and of flood")
    ap.add_argument("--loris", type=int, default=50, help="slow-loris connections")
    ap.add_argument("--flooders", type=int, default=2)
    ap.add_argument("--out", help="directory for broker logs (default: temporary)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--short", action="store_true", help="CI preset: 3,000 connections, 3 s phases")
    ap.add_argument("--hostile", action="store_true",
                    help="only the hostile-neighbour figure (root: creates two users)")
    ap.add_argument("--hostile-seconds", type=float, default=30.0)
    ap.add_argument("--hostile-conns", type=int, default=1200,
                    help="connections the flooder tries (above the default per-uid cap of 1024)")
    ap.add_argument("--hostile-leases", type=int, default=4096,
                    help="leases the flooder holds (4096: the default max_ports_per_uid)")
    ap.add_argument("--hostile-range", help="default 10000-20999, with --short 10000-13999")
    ap.add_argument("--floods", default="caps," + ",".join(FLOODS),
                    help="with --hostile: which floods, comma-separated (caps: issue 11's)")
    ap.add_argument("--flood-seconds", type=float, default=10.0,
                    help="seconds the honest client runs during each of FLOODS (half that alone)")
    ap.add_argument("--flood-conns", type=int, default=1000)
    ap.add_argument("--renew", type=int, default=0, help="only the renew figure: this many renews")
    ap.add_argument("--results", type=Path, default=HERE / "results",
                    help="with --hostile: where hostile-<mode>.json goes")
    args = ap.parse_args()
    if args.renew:
        args.hostile_range = args.hostile_range or "10000-20999"
        short = Path(tempfile.mkdtemp(prefix="pll-"))
        figures: dict[str, Any] = {}
        try:
            renew_heap(args, short, figures)
        finally:
            shutil.rmtree(short, ignore_errors=True)
        if args.json:
            print(json.dumps(figures))
        return 0
    if args.hostile:
        if args.short:
            # Short, and in a range no other test of the suite uses (chaos: 18000-19999,
            # load --short: 14000-17499, the port_range fixture: 22000-31999).
            args.hostile_seconds, args.hostile_leases, args.flood_seconds = 8.0, 3000, 4.0
            args.hostile_range = args.hostile_range or "10000-13999"
        args.hostile_range = args.hostile_range or "10000-20999"
        short = Path(tempfile.mkdtemp(prefix="pll-"))
        os.chmod(short, 0o755)
        figures = {}
        floods = [f for f in args.floods.split(",") if f]
        try:
            if "caps" in floods:
                hostile_neighbour(args, short, figures)
            for kind in floods:
                if kind != "caps":
                    figures.setdefault("floods", {})[kind] = hostile_flood(args, short, kind)
        finally:
            shutil.rmtree(short, ignore_errors=True)
        rows = figures.get("floods", {})
        worst = max([r["during_flood"]["all"].get("p99_ms", float("inf")) for r in rows.values()], default=0)
        hwm = max([r["broker_vmhwm_mib"] for r in rows.values()], default=0)
        if rows:
            print(f"issue 20 figures: honest p99 under the floods at most {worst:.1f} ms (target 50 ms); "
                  f"broker VmHWM at most {hwm:.1f} MiB (target 256 MiB)")
        # Behaviour, not timing: under every flood the broker lives and the other uid is served.
        broken = [k for k, r in rows.items() if not r["broker_alive"] or r["during_flood"]["errors"]
                  or not r["during_flood"]["all"].get("n")]
        args.results.mkdir(parents=True, exist_ok=True)
        name = "hostile-short.json" if args.short else "hostile.json"
        (args.results / name).write_text(json.dumps(figures, indent=1) + "\n")
        print(f"wrote {args.results / name}")
        if broken:
            print(f"RESULT: FAIL: the broker died or the honest uid was not served under {broken}")
            return 1
        return 0
    if args.short:
        args.conns, args.workers, args.range, args.samples, args.phase, args.loris = (
            3000, 2, "14000-17499", 300, 3.0, 20)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="portlease-load-"))
    out.mkdir(parents=True, exist_ok=True)
    # Socket paths must stay under 108 bytes: run the brokers in a short directory.
    short = Path(tempfile.mkdtemp(prefix="pll-"))
    failures: list[str] = []
    figures = {}
    t0 = time.monotonic()
    try:
        main_load(args, short, failures, figures)
        fd_limit(args, short, failures, figures)
    finally:
        for sub in ("loaded", "fdlimit"):
            with contextlib.suppress(OSError):
                shutil.copy(short / sub / "broker.log", out / f"broker-{sub}.log")
        shutil.rmtree(short, ignore_errors=True)
    print(f"load run took {time.monotonic() - t0:.1f} s; broker logs in {out}")
    if args.json:
        print(json.dumps(figures))
    if failures:
        print("RESULT: FAIL")
        for f in failures:
            print("  -", f)
        return 1
    print("RESULT: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
