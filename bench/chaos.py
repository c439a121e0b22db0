"""Chaos run: three CI runners share one broker while everything goes wrong.

    python bench/chaos.py --duration 300 --runners 3 --procs 8      # long run
    python bench/chaos.py --short                                   # CI, about a minute

Three runners (bench/chaos_runner.py, process groups a, b, c with RUNNER_NAME
set) keep test processes (bench/chaos_child.py) going that lease 1-12 ports
through ``portlease lease -- …``, the sync client, detached leases and the
CLI's ``--detach``; each binds every port it got (TCP listen + UDP on 0.0.0.0),
holds it, exits. Some are SIGKILLed mid-lease, some SIGSTOPped for longer than
the TTL, some abandon detached leases. Meanwhile this script SIGKILLs the
broker and starts it again — as ``portlease serve`` binding its own socket,
on a listening socket this script holds and passes as fd 3 (the way a systemd
socket unit does, so connections queue while it is down), and under
``systemd-socket-activate`` — and squatters (bench/chaos_squatter.py) bind
random ports of the range.

Everyone logs JSON lines with CLOCK_MONOTONIC times. The checker then counts:

- EADDRINUSE on a leased port that no squatter explains (must be 0);
- ports held by two live holders at once, from the grant/release/kill log (0);
- time from SIGKILL of a holder to its lease leaving ``status``: immediate for
  attached leases, within the TTL for orphans after a broker restart;
- leases taken from a SIGSTOPped holder when no restart was involved (0), and
  ports unusable after SIGCONT (0);
- ports leaked when the run settles: the free count returns to its start (0).

Exit status 1 when any safety check fails. Timings are reported, not judged,
except that a lease of a dead holder must be gone within its bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rawproto import Raw

HERE = Path(__file__).resolve().parent
PY = sys.executable
SSA = shutil.which("systemd-socket-activate")
QUARANTINE = 5.0  # the allocator's quarantine of ports that failed a bind check
SWEEP = 1.0  # the broker's expiry sweep (0.5 s) plus the status poll, for TTL bounds
RECLAIM_GRACE = 1.5  # seconds after a restart within which clients have reclaimed their leases


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


# ---------------------------------------------------------------- the broker, restarted


@dataclass
class BrokerCtl:
    socket: str
    state: str
    range: str
    ttl: float
    log_path: Path
    events: Any
    modes: list[str]
    proc: subprocess.Popen[bytes] | None = None
    mode: str = ""
    held: socket.socket | None = None
    crashes: list[str] = field(default_factory=list)
    stopped_outside: int = 0
    n: int = 0

    def _serve_args(self) -> list[str]:
        return ["serve", "--state", self.state, "--range", self.range, "--ttl", str(self.ttl),
                "--log-level", "info"]

    def start(self, mode: str | None = None) -> None:
        self.n += 1
        mode = mode or self.modes[self.n % len(self.modes)]
        if mode != "fd" and self.held is not None:
            self.held.close()
            self.held = None
        log = open(self.log_path, "ab")  # noqa: SIM115
        log.write(f"---- start #{self.n} ({mode})\n".encode())
        log.flush()
        py = [PY, "-m", "portlease", *self._serve_args()]
        if mode == "serve":
            cmd = [*py[:4], "--socket", self.socket, *py[4:]]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        elif mode == "fd":
            if self.held is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(self.socket)
                s.listen(4096)
                self.held = s
            fd = self.held.fileno()

            def to_fd3() -> None:
                os.dup2(fd, 3)
                os.set_inheritable(3, True)

            cmd = ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", *py]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         preexec_fn=to_fd3, close_fds=False)
        else:
            assert SSA is not None
            env_flags = [f for var in ("PYTHONPATH", "VIRTUAL_ENV") if var in os.environ
                         for f in ("-E", var)]
            cmd = [SSA, "-l", self.socket, *env_flags, *py]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.mode = mode
        self.events("broker_start", mode=mode, pid=self.proc.pid)
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                c = Raw(self.socket, timeout=5)
                c.call({"op": "ping"})
                c.close()
                self.events("broker_ready", mode=self.mode)
                return
            except (OSError, ValueError):
                time.sleep(0.02)
        raise RuntimeError("the broker did not come up")

    def check_alive(self) -> None:
        """Start the broker again if it ended without being killed by us."""
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is None:
            return
        self.events("broker_died", mode=self.mode, rc=rc)
        if rc == 0:
            # It exits 0 only when told to stop (SIGTERM/SIGINT): someone else did that.
            self.stopped_outside += 1
        else:
            self.crashes.append(f"broker (mode {self.mode}) exited by itself with {rc}")
        self.start()

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            self.check_alive()
        self.events("broker_kill", mode=self.mode, pid=self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.held is not None:
            self.held.close()


class Events:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, ev: str, **fields: Any) -> float:
        t = time.monotonic()
        os.write(self.fd, (json.dumps({"t": t, "ev": ev, **fields}) + "\n").encode())
        return t


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for line in f:
            if line.strip():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out


# ---------------------------------------------------------------- the checker


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def say(self, text: str) -> None:
        self.lines.append(text)

    def fail(self, text: str) -> None:
        self.failures.append(text)


def check(out: Path, runners: list[str], ttl: float, settle: dict[str, Any], broker: BrokerCtl,
          started: float, ended: float, args: argparse.Namespace) -> Report:
    rep = Report()
    orch = read_jsonl(out / "orchestrator.jsonl")
    kids = [e for r in runners for e in read_jsonl(out / f"children-{r}.jsonl")]
    runs = [e for r in runners for e in read_jsonl(out / f"runner-{r}.jsonl")]
    squats = read_jsonl(out / "squatters.jsonl")

    sigkills = sum(1 for e in orch if e["ev"] == "broker_kill")
    # Every end of a broker process, ours or not, turns its leases into orphans.
    kills_of_broker = [e["t"] for e in orch if e["ev"] in ("broker_kill", "broker_died")]
    starts = Counter(e["mode"] for e in orch if e["ev"] == "broker_start")
    readies = [e["t"] for e in orch if e["ev"] == "broker_ready"]
    downtimes = []
    for k in kills_of_broker:
        after = [r for r in readies if r > k]
        if after:
            downtimes.append(min(after) - k)

    max_down = max(downtimes, default=0.0)
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in kids + runs:
        if "id" in e:
            by_id[e["id"]].append(e)
    for evs in by_id.values():
        evs.sort(key=lambda e: e["t"])

    # ---- leases and holder intervals
    granted = [e for e in kids if e["ev"] == "granted"]
    hows = Counter(e["how"] for e in granted)
    ports_granted = sum(len(e["ports"]) for e in granted)
    intervals: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    request_t: dict[str, float] = {}
    for ident, evs in by_id.items():
        spawn = [e["t"] for e in evs if e["ev"] == "spawn"]
        req = [e["t"] for e in evs if e["ev"] == "request"]
        if spawn or req:
            request_t[ident] = min(spawn + req)
        g = [e for e in evs if e["ev"] == "granted"]
        if not g:
            continue
        start = g[0]["t"]
        ends = [e["t"] for e in evs if e["t"] >= start and e["ev"] in (
            "release", "abandon", "lost", "lost_seen", "kill", "exit", "renew_error")]
        ends += [e["t"] for e in evs if e["ev"] == "verify" and e.get("lost")]
        end = min(ends) if ends else ended
        for port in g[0]["ports"]:
            intervals[port].append((start, end, ident))
    double = []
    for port, ivs in intervals.items():
        ivs.sort()
        active_end, active_id = -1.0, ""
        for s, e, ident in ivs:
            if s < active_end and ident != active_id:
                double.append((port, active_id, ident, active_end - s))
            if e > active_end:
                active_end, active_id = e, ident

    # ---- EADDRINUSE
    squat_spans: dict[int, list[tuple[float, float]]] = defaultdict(list)
    open_squats: dict[tuple[str, int], float] = {}
    for e in sorted(squats, key=lambda e: e["t"]):
        key = (e["who"], e["port"])
        if e["ev"] == "squat":
            open_squats[key] = e["t"]
        elif e["ev"] == "unsquat" and key in open_squats:
            squat_spans[e["port"]].append((open_squats.pop(key), e["t"]))
    for (_who, port), t0 in open_squats.items():
        squat_spans[port].append((t0, ended))
    inuse = [e for e in kids if e["ev"] == "bind_fail" and e.get("errname") == "EADDRINUSE"]
    other_bind_fail = [e for e in kids if e["ev"] == "bind_fail" and e.get("errname") != "EADDRINUSE"]
    raced, broker_fault = [], []
    for e in inuse:
        req = request_t.get(e["id"], 0.0)
        spans = [sp for sp in squat_spans.get(e["port"], []) if sp[0] <= e["t"] <= sp[1] + 0.001]
        if spans and all(sp[0] > req for sp in spans):
            raced.append(e)  # squatted after the client asked: no bind check could have seen it
        else:
            broker_fault.append(e)

    # ---- kills and abandons: time until the lease left status
    freed = [e for e in runs if e["ev"] == "freed"]
    not_freed = [e for e in runs if e["ev"] == "not_freed"]
    kills = [e for e in runs if e["ev"] == "kill"]
    attached, orphaned, abandoned = [], [], []
    late: list[tuple[str, float, float]] = []
    starts_t = [e["t"] for e in orch if e["ev"] == "broker_start"][1:]  # restarts only
    for e in freed:
        t0, t1 = e["since"], e["since"] + e["latency"]
        # A restart re-arms an orphan's TTL from the moment the new broker read the journal.
        restarted = [s for s in starts_t if t0 - (max_down + RECLAIM_GRACE) <= s <= t1]
        bound = ttl + SWEEP + args.slack + (max(0.0, max(restarted) + max_down - t0) if restarted else 0.0)
        if e["kind"] == "abandon":
            abandoned.append(e["latency"])
        else:
            (orphaned if restarted else attached).append(e["latency"])
            if not restarted:
                bound = args.slow_release + args.slack
        if e["latency"] > bound:
            late.append((e["id"], round(e["latency"], 3), round(bound, 3)))

    # ---- stops
    stops = [e for e in runs if e["ev"] == "stop"]
    conts = {e["id"]: e["t"] for e in runs if e["ev"] == "cont"}
    verifies = {e["id"]: e for e in kids if e["ev"] == "verify"}
    stop_restart, stop_lost_ok, stop_lost_bad, stop_unusable, stop_kept = 0, 0, [], [], 0
    for s in stops:
        c = conts.get(s["id"], ended)
        # Stopped before it could reclaim after an earlier restart counts too.
        spans_restart = any(s["t"] - (max_down + RECLAIM_GRACE) <= k <= c + 0.5 for k in kills_of_broker)
        stop_restart += spans_restart
        v = verifies.get(s["id"])
        if v is None:
            continue
        if not v["ok"]:
            stop_unusable.append((s["id"], v.get("problem")))
        if v.get("lost"):
            if spans_restart:
                stop_lost_ok += 1
            else:
                stop_lost_bad.append(s["id"])
        else:
            stop_kept += 1

    # ---- leases lost by running holders
    lost_events = [e for e in kids if e["ev"] == "lost"]
    lost_no_restart = []
    for e in lost_events:
        evs = by_id[e["id"]]
        g = [x["t"] for x in evs if x["ev"] == "granted"]
        if g and not any(g[0] - 1.0 <= k <= e["t"] for k in kills_of_broker):
            lost_no_restart.append(e["id"])

    detached = [e for e in granted if e.get("detached")]
    renews = sum(1 for e in kids if e["ev"] == "renewed")
    renew_errors = sum(1 for e in kids if e["ev"] == "renew_error")
    errors = Counter(
        "BrokerUnavailable" if "no portlease broker" in e["code"] else e["code"][:40]
        for e in kids if e["ev"] == "lease_error")
    exits = Counter(e["rc"] for e in runs if e["ev"] == "exit")
    cli_refused = sum(n for rc, n in exits.items() if rc == 69)
    tracebacks = broker.log_path.read_text(errors="replace").count("Traceback")

    collisions = len(broker_fault) + len(double)
    dur = ended - started
    rep.say(f"chaos run: {dur:.1f} s, {len(runners)} runners x {args.procs} procs, ttl {ttl:g} s, "
            f"range {args.range}, logs in {out}")
    rep.say(f"leases granted: {len(granted)} ({', '.join(f'{k} {v}' for k, v in sorted(hows.items()))}); "
            f"ports granted: {ports_granted}")
    rep.say(f"no lease (broker down and not socket-activated, exhausted, ...): {dict(errors) or 0}; "
            f"CLI wrappers that got none: {cli_refused}")
    rep.say(f"kills: {len(kills)} (SIGKILL of the process group; {sum(1 for k in kills if k.get('early'))} "
            "before the bind)")
    rep.say(f"  lease gone from status after SIGKILL (attached): n={len(attached)} "
            f"p50 {ms(pct(attached, 50))} p99 {ms(pct(attached, 99))} max {ms(max(attached, default=0))}")
    rep.say(f"  near a broker restart (may be orphans): n={len(orphaned)} max "
            f"{max(orphaned, default=0):.2f} s (bound: restart + downtime + ttl + {SWEEP:g} s)")
    rep.say(f"stops: {len(stops)} SIGSTOPs of {ttl + 1:g}-{ttl + 2:g} s (longer than the TTL); "
            f"{stop_restart} spanned a broker restart or came within {max_down + RECLAIM_GRACE:.1f} s "
            f"after one; lease kept {stop_kept}, lost across a restart "
            f"{stop_lost_ok}, lost without one {len(stop_lost_bad)}; ports unusable after SIGCONT "
            f"{len(stop_unusable)}")
    rep.say(f"detached: {len(detached)} leases, {renews} renewals ({renew_errors} failed: the CLI "
            "while the broker was down), "
            f"{len(abandoned)} abandoned and gone after p50 {pct(abandoned, 50):.2f} s "
            f"max {max(abandoned, default=0):.2f} s (ttl {ttl:g} s)")
    rep.say(f"leases lost by running holders: {len(lost_events)} "
            f"({len(lost_no_restart)} with no broker restart involved)")
    if broker.stopped_outside:
        rep.say(f"NOTE: the broker was stopped {broker.stopped_outside} times by a signal from outside "
                "this run (exit 0); restarted each time")
    rep.say(f"broker restarts (SIGKILL): {sigkills}; starts by mode {dict(starts)}; "
            f"downtime until it answered p50 {ms(pct(downtimes, 50))} max {ms(max(downtimes, default=0))}")
    rep.say(f"squatters: {sum(1 for e in squats if e['ev'] == 'squat')} binds; raced in between a grant "
            f"and the holder's bind: {len(raced)}; other bind errors: {len(other_bind_fail)}")
    rep.say(f"EADDRINUSE on a leased port: {len(broker_fault)}")
    rep.say(f"ports granted to two live holders: {len(double)}")
    rep.say(f"collisions: {collisions}")
    rep.say(f"leaked ports at settle: {settle['leaked']} (free {settle['free_start']} -> "
            f"{settle['free_end']}, leases left {settle['leases_end']}, settled in {settle['took']:.1f} s)")
    rep.say(f"child exit codes: {dict(sorted(exits.items()))}; broker tracebacks: {tracebacks}")

    if broker_fault:
        rep.fail(f"EADDRINUSE on leased ports: {broker_fault[:5]}")
    if double:
        rep.fail(f"ports held by two live holders: {double[:5]}")
    if not_freed:
        rep.fail(f"leases of dead holders never left status: {not_freed[:5]}")
    if late:
        rep.fail(f"{len(late)} leases of dead holders outlived their bound (id, took, bound): {late[:5]}")
    if stop_lost_bad:
        rep.fail(f"leases taken from SIGSTOPped holders with no restart: {stop_lost_bad[:5]}")
    if stop_unusable:
        rep.fail(f"ports unusable after SIGCONT: {stop_unusable[:5]}")
    if lost_no_restart:
        rep.fail(f"leases lost with no broker restart: {lost_no_restart[:5]}")
    if settle["leaked"]:
        rep.fail(f"{settle['leaked']} ports leaked")
    if broker.crashes:
        rep.fail(f"broker crashed: {broker.crashes}")
    if tracebacks:
        rep.fail(f"{tracebacks} tracebacks in {broker.log_path}")
    if not granted:
        rep.fail("no lease was granted at all")
    rep.figures = {
        "duration": dur, "leases": len(granted), "ports": ports_granted, "kills": len(kills),
        "stops": len(stops), "restarts": sigkills, "collisions": collisions,
        "leaked": settle["leaked"], "kill_free_p50": pct(attached, 50),
        "kill_free_p99": pct(attached, 99), "orphan_free_max": max(orphaned, default=0),
    }
    return rep


# ---------------------------------------------------------------- the run


def settle_broker(broker: BrokerCtl, free_start: int, ttl: float) -> dict[str, Any]:
    """Wait for every lease to end and the quarantines to lapse; count what is missing."""
    t0 = time.monotonic()
    deadline = t0 + 3 * ttl + QUARANTINE + 20
    summary: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            c = Raw(broker.socket)
            # A grant runs the allocator's quarantine expiry; then look.
            got = c.call({"op": "lease", "count": 1})
            if got.get("reply") == "granted":
                c.call({"op": "release", "token": got["token"]})
            summary = c.call({"op": "status"})["summary"]
            c.close()
        except (OSError, ValueError):
            time.sleep(0.2)
            continue
        if summary["leases"] == 0 and summary["ports_free"] == free_start:
            break
        time.sleep(0.5)
    free_end = summary.get("ports_free", -1)
    return {"free_start": free_start, "free_end": free_end, "leaked": max(0, free_start - free_end),
            "leases_end": summary.get("leases", -1), "took": time.monotonic() - t0}


def recheck(out: Path, args: argparse.Namespace) -> int:
    done = [e for e in read_jsonl(out / "orchestrator.jsonl") if e["ev"] == "settled"]
    if not done:
        print(f"{out}: the run did not finish")
        return 1
    e = done[-1]
    for key in ("procs", "range", "ttl", "slow_release", "slack"):
        setattr(args, key, e["args"].get(key, 0.0))
    names = sorted(f.name[len("runner-"):-len(".jsonl")] for f in out.glob("runner-*.jsonl"))
    broker = BrokerCtl(socket="", state="", range=args.range, ttl=args.ttl, log_path=out / "broker.log",
                       events=None, modes=[], crashes=e["crashes"], stopped_outside=e["stopped_outside"])
    return report(check(out, names, args.ttl, e["settle"], broker, e["started"], e["ended"], args), args)


def report(rep: Report, args: argparse.Namespace) -> int:
    for line in rep.lines:
        print(line)
    if args.json:
        print(json.dumps(rep.figures))
    if rep.failures:
        print("RESULT: FAIL")
        for f in rep.failures:
            print("  -", f)
        return 1
    print("RESULT: PASS")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of chaos")
    ap.add_argument("--runners", type=int, default=3)
    ap.add_argument("--procs", type=int, default=8, help="concurrent test processes per runner")
    ap.add_argument("--ttl", type=float, default=3.0)
    ap.add_argument("--range", default="18000-19999")
    ap.add_argument("--restart-every", type=float, default=12.0, help="mean seconds between broker kills")
    ap.add_argument("--squatters", type=int, default=2)
    ap.add_argument("--max-hold", type=float, default=3.0)
    ap.add_argument("--slow-release", type=float, default=1.0,
                    help="an attached lease of a killed holder must be gone within this (s)")
    ap.add_argument("--slack", type=float, default=0.0,
                    help="seconds added to every release bound (a busy shared CI machine)")
    ap.add_argument("--out", help="directory for logs (default: a new temporary one, kept)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--short", action="store_true",
                    help="CI preset: 40 s, 4 procs per runner, a restart every 8 s, 1 s of slack "
                    "(about a minute)")
    ap.add_argument("--recheck", metavar="DIR", help="only run the checker again on a run's logs")
    args = ap.parse_args()
    if args.recheck:
        return recheck(Path(args.recheck), args)
    if args.short:
        args.duration, args.procs, args.restart_every, args.max_hold = 40.0, 4, 8.0, 2.5
        args.slack = max(args.slack, 1.0)
    rng = random.Random(args.seed)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="portlease-chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    sockdir = tempfile.mkdtemp(prefix="plc-")  # short: AF_UNIX paths are limited to 108 bytes
    names = [chr(ord("a") + i) for i in range(args.runners)]
    events = Events(out / "orchestrator.jsonl")
    modes = ["serve", "fd", "ssa"] if SSA else ["serve", "fd"]
    broker = BrokerCtl(socket=os.path.join(sockdir, "broker.sock"), state=str(out / "state.jsonl"),
                       range=args.range, ttl=args.ttl, log_path=out / "broker.log", events=events,
                       modes=modes)
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        broker.start("serve")
        c = Raw(broker.socket)
        free_start = c.call({"op": "status"})["summary"]["ports_free"]
        c.close()
        until = time.monotonic() + args.duration
        for i in range(args.squatters):
            procs.append(subprocess.Popen(
                [PY, str(HERE / "chaos_squatter.py"), "--range", args.range, "--until", str(until),
                 "--log", str(out / "squatters.jsonl"), "--name", f"squatter{i}"],
                start_new_session=True))
        for name in names:
            procs.append(subprocess.Popen(
                [PY, str(HERE / "chaos_runner.py"), "--name", name, "--socket", broker.socket,
                 "--until", str(until), "--procs", str(args.procs), "--ttl", str(args.ttl),
                 "--max-hold", str(args.max_hold), "--out", str(out),
                 *(["--seed", str(rng.randrange(1 << 30))] if args.seed is not None else [])],
                env=dict(os.environ, RUNNER_NAME=name), start_new_session=True))
        next_kill = time.monotonic() + rng.uniform(0.5, 1.5) * args.restart_every
        while time.monotonic() < until:
            time.sleep(0.05)
            broker.check_alive()
            if time.monotonic() >= next_kill and time.monotonic() < until - 2:
                broker.kill()
                time.sleep(rng.uniform(0.05, 0.8))  # down for a while: clients queue or retry
                broker.start()
                next_kill = time.monotonic() + rng.uniform(0.5, 1.5) * args.restart_every
        runner_end = until + args.max_hold + 3 * args.ttl + 60
        for proc in procs:
            proc.wait(timeout=max(1.0, runner_end - time.monotonic()))
        broker.check_alive()
        ended = time.monotonic()
        settled = settle_broker(broker, free_start, args.ttl)
        events("settled", started=started, ended=ended, settle=settled, crashes=broker.crashes,
               stopped_outside=broker.stopped_outside, args=vars(args))
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        broker.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    return report(check(out, names, args.ttl, settled, broker, started, ended, args), args)


if __name__ == "__main__":
    sys.exit(main())
