"""One simulated CI runner of the chaos run (see bench/chaos.py).

Keeps ``--procs`` test processes (bench/chaos_child.py) going until the
deadline, each in its own process group like a CI job, and does to them what
CI hosts do: SIGKILL mid-lease, SIGSTOP for longer than the TTL and SIGCONT.
After each kill (and each abandoned detached lease) it watches ``status`` until
the dead holder's lease is gone and logs how long that took.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rawproto import Raw

HERE = Path(__file__).resolve().parent
PY = sys.executable


class Events:
    def __init__(self, path: str, runner: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.runner = runner

    def __call__(self, ev: str, **fields: Any) -> float:
        t = time.monotonic()
        line = json.dumps({"t": t, "ev": ev, "runner": self.runner, **fields}) + "\n"
        os.write(self.fd, line.encode())
        return t


class Tail:
    """New complete lines of a file that other processes append to."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pos = 0
        self.rest = b""

    def lines(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        data = self.rest + data
        *complete, self.rest = data.split(b"\n")
        return [json.loads(x) for x in complete if x.strip()]


class StatusClient:
    """Raw protocol connection for ``status``; reconnects across broker restarts."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: Raw | None = None

    def holders(self) -> set[int] | None:
        """Pids that hold a lease now; None when the broker cannot be asked."""
        try:
            if self.conn is None:
                self.conn = Raw(self.path, timeout=3)
            reply = self.conn.call({"op": "status"})
        except (OSError, ValueError):
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return None
        return {info.get("pid") for info in reply.get("leases", [])}


@dataclass
class Child:
    ident: str
    proc: subprocess.Popen[bytes]
    mode: str
    action: str
    hold: float
    spawned: float
    holder: int | None = None
    bound_at: float | None = None
    act_at: float | None = None
    stopped: bool = False
    cont_at: float = 0.0
    done: bool = False


@dataclass
class Pending:
    ident: str
    holder: int
    since: float
    kind: str  # "kill" or "abandon"
    give_up: float


@dataclass
class Runner:
    args: argparse.Namespace
    ev: Events
    rng: random.Random
    children: dict[str, Child] = field(default_factory=dict)
    pending: list[Pending] = field(default_factory=list)
    n: int = 0

    def spawn(self) -> None:
        a, rng = self.args, self.rng
        self.n += 1
        ident = f"{a.name}{self.n}"
        mode = rng.choices(["cli", "sync", "detach", "clidetach"], weights=[35, 40, 17, 8])[0]
        count = rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12])
        hold = rng.uniform(0.2, a.max_hold)
        action = "none"
        r = rng.random()
        if mode in ("cli", "sync"):
            if r < a.kill_p:
                action = "kill"
            elif r < a.kill_p + a.stop_p:
                action = "stop"
                hold = max(hold, 1.0)
            elif r < a.kill_p + a.stop_p + 0.04:
                action = "early-kill"
        elif r < 0.4:
            action = "abandon"
        child_args = ["--mode", mode, "--count", str(count), "--hold", f"{hold:.3f}",
                      "--socket", a.socket, "--log", a.child_log, "--id", ident, "--ttl", str(a.ttl)]
        if action == "abandon":
            child_args.append("--abandon")
        child = [PY, str(HERE / "chaos_child.py"), *child_args]
        if mode == "cli":
            cmd = [PY, "-m", "portlease", "lease", "--socket", a.socket, "-n", str(count),
                   "--note", f"chaos {ident}", "--", *child]
        else:
            cmd = child
        env = dict(os.environ, RUNNER_NAME=a.name, PORTLEASE_AUTOSTART="0")
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=self.args.stderr)
        now = self.ev("spawn", id=ident, pid=proc.pid, mode=mode, action=action, count=count, hold=hold)
        c = Child(ident, proc, mode, action, hold, now)
        if mode == "cli":
            c.holder = proc.pid
        if action == "early-kill":
            c.act_at = now + rng.uniform(0.0, 0.3)
        self.children[ident] = c

    def on_child_event(self, e: dict[str, Any]) -> None:
        c = self.children.get(e.get("id", ""))
        if c is None:
            return
        if e["ev"] == "granted" and e.get("holder"):
            c.holder = e["holder"]
        elif e["ev"] == "bound":
            c.bound_at = e["t"]
            if c.action == "kill":
                c.act_at = e["t"] + self.rng.uniform(0.0, c.hold * 0.9)
            elif c.action == "stop":
                c.act_at = e["t"] + self.rng.uniform(0.0, min(0.5, c.hold / 2))
        elif e["ev"] == "abandon" and c.holder:
            self.pending.append(Pending(c.ident, c.holder, e["t"], "abandon",
                                        e["t"] + 3 * self.args.ttl + 20))

    def act(self, now: float) -> None:
        for c in self.children.values():
            if c.done:
                continue
            if c.stopped and now >= c.cont_at:
                self.ev("cont", id=c.ident, pid=c.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGCONT)
                c.stopped = False
            if c.act_at is None or now < c.act_at:
                continue
            c.act_at = None
            if c.action in ("kill", "early-kill"):
                t = self.ev("kill", id=c.ident, pid=c.proc.pid, early=c.action == "early-kill")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                if c.holder and c.bound_at is not None:
                    self.pending.append(Pending(c.ident, c.holder, t, "kill",
                                                t + 3 * self.args.ttl + 20))
            elif c.action == "stop":
                self.ev("stop", id=c.ident, pid=c.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGSTOP)
                c.stopped = True
                c.cont_at = now + self.args.ttl + self.rng.uniform(1.0, 2.0)

    def reap(self) -> None:
        for c in self.children.values():
            if not c.done and c.proc.poll() is not None:
                c.done = True
                self.ev("exit", id=c.ident, pid=c.proc.pid, rc=c.proc.returncode)

    def check_pending(self, status: StatusClient) -> None:
        if not self.pending:
            return
        holders = status.holders()
        now = time.monotonic()
        if holders is None:
            return
        left = []
        for pnd in self.pending:
            if pnd.holder not in holders:
                self.ev("freed", id=pnd.ident, holder=pnd.holder, kind=pnd.kind, since=pnd.since,
                        latency=now - pnd.since)
            elif now > pnd.give_up:
                self.ev("not_freed", id=pnd.ident, holder=pnd.holder, kind=pnd.kind, since=pnd.since)
            else:
                left.append(pnd)
        self.pending = left

    def live(self) -> int:
        return sum(1 for c in self.children.values() if not c.done)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--until", type=float, required=True, help="CLOCK_MONOTONIC end of spawning")
    ap.add_argument("--procs", type=int, default=6)
    ap.add_argument("--ttl", type=float, default=3.0)
    ap.add_argument("--max-hold", type=float, default=3.0)
    ap.add_argument("--kill-p", type=float, default=0.15)
    ap.add_argument("--stop-p", type=float, default=0.06)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    out = Path(args.out)
    args.child_log = str(out / f"children-{args.name}.jsonl")
    args.stderr = open(out / f"children-{args.name}.stderr", "ab")  # noqa: SIM115
    ev = Events(str(out / f"runner-{args.name}.jsonl"), args.name)
    runner = Runner(args, ev, random.Random(args.seed))
    tail = Tail(args.child_log)
    status = StatusClient(args.socket)
    ev("start", procs=args.procs)
    # Bounded: spawning ends at the deadline; the rest at the latest when holds,
    # stops and the TTL backstop have run out.
    hard_end = args.until + args.max_hold + 3 * args.ttl + 40
    last_status = 0.0
    while True:
        now = time.monotonic()
        if now >= hard_end:
            break
        for e in tail.lines():
            runner.on_child_event(e)
        runner.act(now)
        runner.reap()
        if now < args.until:
            while runner.live() < args.procs:
                runner.spawn()
        elif runner.live() == 0 and not runner.pending:
            break
        if runner.pending and now - last_status >= 0.002:
            last_status = now
            runner.check_pending(status)
        time.sleep(0.002)
    for c in runner.children.values():
        if not c.done:
            ev("leftover", id=c.ident, pid=c.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, signal.SIGCONT)
                os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait()
    for pnd in runner.pending:
        ev("not_freed", id=pnd.ident, holder=pnd.holder, kind=pnd.kind, since=pnd.since)
    ev("end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
