#!/usr/bin/env python3
"""What host-wide claims cost: µs per grant, fds per held port, and the fd limit.

    python bench/claims.py            # about half a minute; writes bench/results/claims.{md,json}
    python bench/claims.py --quick    # a few seconds, to check that it runs

1. Cost per grant: three in-process brokers (the real shell, core, journal and
   bind checks; no socket between client and broker, so the difference is not
   buried in I/O): without claims, with claims, and with claims also kept in a
   file descriptor store (the real ``sd_notify`` datagrams with ``SCM_RIGHTS``,
   to bench/fdstore.py's stand-in for systemd, reading in a process of its
   own), on the same range: the kernel's bind cost differs from port to port,
   so all probe the same ports. A round is a burst no client could send (no
   socket in between), longer than the manager's queue (often 10 datagrams),
   and the stand-in is Python: the store's figure is a worst case, set by how
   fast the manager reads.
   Rounds alternate between them (interleaved in one run); each round leases
   ``--batch`` single ports on one session, then releases them all, so the
   brokers never hold a port at the same time. Reported: median µs per lease
   and per release over the rounds (with the quartiles of the lease), and a
   bare claim's take + release alone.
2. fds per held port: the process's open fds with ``--hold`` one-port leases
   held, with claims and without.
3. The fd limit: a real ``portlease serve`` under ``prlimit --nofile=N:N``
   leases single ports until it refuses; the number held then, and the reply.

Ports: ``--range`` (default 30200-30399).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from portlease.broker.claims import Claims
from portlease.broker.config import Config
from portlease.broker.core import Session
from portlease.broker.handler import Broker
from portlease.broker.leases import Peer
from portlease.broker.notify import Notifier
from portlease.broker.state import Journal
from rawproto import Raw

HERE = Path(__file__).resolve().parent


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi)


def make_broker(directory: Path, low: int, high: int, *, claims: bool,
                store: Notifier | None = None) -> tuple[Broker, Session]:
    config = Config(port_min=low, port_max=high, ttl=60.0)
    broker = Broker(config=config, journal=Journal(str(directory / "state.jsonl")),
                    host_claims=claims, fd_store=store, fd_store_capacity=1 << 20)
    broker.restore()
    session = Session(id=1, peer=Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid()))
    broker.answer(session, b'{"op":"hello","id":0,"version":1}')
    return broker, session


def one_round(broker: Broker, session: Session, batch: int) -> tuple[float, float]:
    """Lease ``batch`` single ports, then release them; seconds per lease and per release."""
    lease = b'{"op":"lease","id":1,"count":1,"detach":true}'
    answer = broker.answer
    t0 = time.perf_counter()
    replies = [answer(session, lease) for _ in range(batch)]
    t1 = time.perf_counter()
    tokens = [json.loads(r)["token"] for r in replies]
    releases = [b'{"op":"release","id":2,"token":"%s"}' % t.encode() for t in tokens]
    t2 = time.perf_counter()
    for line in releases:
        answer(session, line)
    t3 = time.perf_counter()
    return (t1 - t0) / batch, (t3 - t2) / batch


def grant_cost(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    a_lo, a_hi = _range(args.range)
    batch = min(args.batch, a_hi - a_lo + 1)
    for name in ("with", "without", "stored"):
        (tmp / name).mkdir()
    # The manager reads in a process of its own, as PID 1 does.
    manager = subprocess.Popen([sys.executable, str(HERE / "fdstore.py"), str(tmp / "stored")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert manager.stdout is not None
    os.environ["NOTIFY_SOCKET"] = manager.stdout.readline().strip()
    notifier = Notifier()
    del os.environ["NOTIFY_SOCKET"]
    brokers = {
        "with claims": make_broker(tmp / "with", a_lo, a_hi, claims=True),
        "without claims": make_broker(tmp / "without", a_lo, a_hi, claims=False),
        "with claims in the fd store": make_broker(tmp / "stored", a_lo, a_hi, claims=True,
                                                   store=notifier),
    }
    samples: dict[str, dict[str, list[float]]] = {k: {"lease": [], "release": []} for k in brokers}
    for pair in brokers.values():  # warm-up, not counted
        one_round(*pair, batch)
    for i in range(args.rounds):
        # Interleaved, and the order flips every round so neither always goes first.
        order = list(brokers) if i % 2 == 0 else list(reversed(brokers))
        for name in order:
            lease_s, release_s = one_round(*brokers[name], batch)
            samples[name]["lease"].append(lease_s)
            samples[name]["release"].append(release_s)
    for broker, _ in brokers.values():
        if broker.claims is not None:
            broker.claims.retry()  # what the tick would send
        broker.shutdown()
    notifier.close()
    stored_after = int(manager.communicate()[0])
    # A bare claim: take + release of one name, many times.
    claims = Claims()
    bare = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for port in range(a_lo, a_lo + batch):
            claims.take(port)
        claims.release(range(a_lo, a_lo + batch))
        bare.append((time.perf_counter() - t0) / batch)
    out: dict[str, Any] = {"batch": batch, "rounds": args.rounds, "left in the store": stored_after}
    for name, s in samples.items():
        out[name] = {k: round(statistics.median(v) * 1e6, 1) for k, v in s.items()}
        q1, _, q3 = statistics.quantiles(s["lease"], n=4)
        out[name]["lease quartiles"] = [round(q1 * 1e6, 1), round(q3 * 1e6, 1)]
    out["bare claim take+release"] = round(statistics.median(bare) * 1e6, 1)
    return out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fds_per_port(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    (lo, hi) = _range(args.range)
    hold = min(args.hold, hi - lo + 1)
    out: dict[str, Any] = {"held ports": hold}
    for name, claims in (("with claims", True), ("without claims", False)):
        d = tmp / f"fds-{claims}"
        d.mkdir()
        broker, session = make_broker(d, lo, hi, claims=claims)
        before = _open_fds()
        for _ in range(hold):
            broker.answer(session, b'{"op":"lease","id":1,"count":1,"detach":true}')
        out[name] = round((_open_fds() - before) / hold, 3)
        broker.shutdown()
    return out


def fd_limit(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if shutil.which("prlimit") is None:
        return {"skipped": "prlimit is missing"}
    lo, hi = _range(args.range)
    sock = str(tmp / "b.sock")
    limit = args.nofile
    cmd = ["prlimit", f"--nofile={limit}:{limit}", "--", sys.executable, "-m", "portlease", "serve",
           "--socket", sock, "--state", str(tmp / "b.state"), "--range", f"{lo}-{hi}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                return {"skipped": "the broker did not start"}
            time.sleep(0.02)
        time.sleep(0.2)
        raw = Raw(sock)
        held = 0
        while True:
            reply = raw.call({"op": "lease", "count": 1})
            if reply.get("reply") != "granted":
                break
            held += 1
        alive = raw.call({"op": "ping"}).get("reply") == "pong"
        return {"RLIMIT_NOFILE": limit, "ports held when refused": held, "reply": reply,
                "still serving": alive}
    finally:
        proc.kill()
        proc.wait()


def render(figures: dict[str, Any]) -> str:
    g, f, lim = figures["grant"], figures["fds"], figures["limit"]
    lines = [
        "# Host-wide claims (bench/claims.py)",
        "",
        f"In-process broker, {g['batch']} one-port detached leases then their releases per round, "
        f"{g['rounds']} rounds interleaved; median µs.",
        "",
        "| | lease µs (quartiles) | release µs |",
        "|---|---:|---:|",
    ]
    for name in ("without claims", "with claims", "with claims in the fd store"):
        q1, q3 = g[name]["lease quartiles"]
        lines.append(f"| {name} | {g[name]['lease']} ({q1}-{q3}) | {g[name]['release']} |")
    lines += [
        "",
        f"fds left in the stand-in store after every lease was released: {g['left in the store']}.",
        "",
        f"A bare claim (take + release of one abstract name): {g['bare claim take+release']} µs.",
        "",
        f"Open fds per held port ({f['held ports']} ports held): with claims {f['with claims']}, "
        f"without {f['without claims']}.",
        "",
    ]
    if "skipped" in lim:
        lines.append(f"fd limit: skipped ({lim['skipped']}).")
    else:
        lines.append(
            f"Under RLIMIT_NOFILE={lim['RLIMIT_NOFILE']}: {lim['ports held when refused']} ports held, "
            f"then `{lim['reply'].get('code')}`: {lim['reply'].get('message')!r}; "
            f"still serving: {lim['still serving']}."
        )
    lines.append(f"\nThis process's RLIMIT_NOFILE (soft/hard): {figures['rlimit']}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hold", type=int, default=100)
    parser.add_argument("--nofile", type=int, default=64)
    parser.add_argument("--range", default="30200-30399")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "claims")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch, args.hold = 3, 20, 20
    with tempfile.TemporaryDirectory(prefix="plclaims-") as d:
        tmp = Path(d)
        figures = {
            "grant": grant_cost(args, tmp),
            "fds": fds_per_port(args, tmp),
            "limit": fd_limit(args, tmp),
            "rlimit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            "host": socket.gethostname(),
        }
    text = render(figures)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
