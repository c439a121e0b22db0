"""One simulated test process of the chaos run (see bench/chaos.py).

It gets ports (from ``portlease lease -- …``'s environment, the sync client, a
detached lease, or the CLI's ``--detach``), binds every one of them for TCP
(listen) and UDP on 0.0.0.0, holds them for a while, and exits. Every step is a
JSON line with a CLOCK_MONOTONIC timestamp in the shared log (one ``write(2)``
per line on an O_APPEND file, so lines from many processes never interleave).

After a SIGSTOP/SIGCONT (seen as a jump of the clock), it checks that it can
still use its ports: a TCP connection to its own listener, a UDP datagram to
itself, and, for the sync client, that its lease was not lost.

Exit status: 0 done, 3 lease lost, 4 no lease (refused or no broker), 5 a bind failed.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

GAP = 0.7  # seconds of clock jump between two 50 ms naps that mean "we were stopped"


class Log:
    def __init__(self, path: str, ident: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.base = {"id": ident, "pid": os.getpid(), "runner": os.environ.get("RUNNER_NAME", "?")}

    def __call__(self, ev: str, **fields: Any) -> float:
        t = time.monotonic()
        os.write(self.fd, (json.dumps({"t": t, "ev": ev, **self.base, **fields}) + "\n").encode())
        return t


def bind_all(ports: list[int], log: Log) -> tuple[list[socket.socket], list[socket.socket], bool]:
    tcp: list[socket.socket] = []
    udp: list[socket.socket] = []
    ok = True
    for port in ports:
        for kind in ("tcp", "udp"):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
            try:
                if kind == "tcp":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
                s.bind(("0.0.0.0", port))
                if kind == "tcp":
                    s.listen(8)
            except OSError as exc:
                s.close()
                ok = False
                log("bind_fail", port=port, proto=kind, errno=exc.errno,
                    errname=errno.errorcode.get(exc.errno or 0, "?"))
                continue
            (tcp if kind == "tcp" else udp).append(s)
    log("bound", ports=ports, ok=ok)
    return tcp, udp, ok


def usable(tcp: list[socket.socket], udp: list[socket.socket]) -> str | None:
    """None when every bound port still works; else what failed."""
    for lst in tcp:
        port = lst.getsockname()[1]
        c = socket.socket()
        c.settimeout(2)
        try:
            c.connect(("127.0.0.1", port))
            lst.settimeout(2)
            conn, _ = lst.accept()
            conn.close()
        except OSError as exc:
            return f"tcp {port}: {exc}"
        finally:
            c.close()  # the client side closes: any TIME_WAIT is on its ephemeral port
    for u in udp:
        port = u.getsockname()[1]
        try:
            u.settimeout(2)
            u.sendto(b"x", ("127.0.0.1", port))
            u.recvfrom(16)
        except OSError as exc:
            return f"udp {port}: {exc}"
    return None


def cli(args: argparse.Namespace, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "portlease", *cmd, "--socket", args.socket],
                          capture_output=True, text=True, timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["cli", "sync", "detach", "clidetach"], required=True)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--hold", type=float, default=1.0)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--id", required=True)
    ap.add_argument("--ttl", type=float, default=3.0)
    ap.add_argument("--abandon", action="store_true", help="detached modes: exit without releasing")
    args = ap.parse_args()
    log = Log(args.log, args.id)

    conn: Any = None
    lease: Any = None
    token = ""
    if args.mode == "cli":
        ports = [int(x) for x in os.environ["PORTLEASE_PORTS"].split()]
        log("granted", ports=ports, holder=os.getppid(), how="cli")
    elif args.mode == "clidetach":
        log("request", count=args.count)
        out = cli(args, "lease", "-n", str(args.count), "--detach", "--ttl", str(args.ttl), "--json")
        if out.returncode != 0:
            log("lease_error", code=out.stderr.strip()[:200])
            return 4
        got = json.loads(out.stdout)
        ports, token = got["ports"], got["token"]
        # The CLI process that asked is the lease's recorded owner; it has exited.
        log("granted", ports=ports, holder=None, how="clidetach", detached=True)
    else:
        from portlease.client import Connection, LeaseError
        from portlease.client.protocol.errors import PortleaseError

        def on_lost(_lease: Any, exc: Exception) -> None:
            log("lost", why=str(exc)[:200])

        log("request", count=args.count)
        try:
            conn = Connection(args.socket, timeout=20, on_lost=on_lost, autostart=False)
            if args.mode == "detach":
                lease = conn.lease(args.count, ttl=args.ttl, note=f"chaos {args.id}", detach=True)
            else:
                lease = conn.lease(args.count, note=f"chaos {args.id}")
        except LeaseError as exc:
            log("lease_error", code=exc.code.value)
            return 4
        except PortleaseError as exc:
            log("lease_error", code=type(exc).__name__, why=str(exc)[:200])
            return 4
        ports = list(lease.ports)
        log("granted", ports=ports, holder=os.getpid(), how=args.mode, detached=args.mode == "detach")

    tcp, udp, ok = bind_all(ports, log)
    deadline = time.monotonic() + args.hold
    last = time.monotonic()
    next_renew = last + args.ttl / 3
    status = 0 if ok else 5
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = time.monotonic()
        if now - last > GAP:
            # We were stopped (SIGSTOP) for a while: are the ports still ours and usable?
            problem = usable(tcp, udp)
            lost = False
            if lease is not None and args.mode == "sync":
                try:
                    conn.ping()
                except Exception as exc:
                    log("ping_error", why=str(exc)[:200])
                lost = lease.lost is not None
            log("verify", gap=now - last, ok=problem is None, problem=problem, lost=lost)
        last = now
        if lease is not None and lease.lost is not None:
            log("lost_seen")
            status = 3
            break
        if args.mode in ("detach", "clidetach") and now >= next_renew:
            next_renew = now + args.ttl / 3
            try:
                if args.mode == "detach":
                    conn.renew(lease)
                elif cli(args, "renew", token).returncode != 0:
                    raise RuntimeError("portlease renew failed")
                log("renewed")
            except Exception as exc:
                log("renew_error", why=str(exc)[:200])
                status = 3
                break

    if args.mode in ("detach", "clidetach") and args.abandon and status == 0:
        log("abandon")
    else:
        log("release")
    for s in tcp + udp:
        s.close()
    if args.mode == "detach" and not args.abandon and status == 0:
        try:
            conn.release(lease)
        except Exception as exc:
            log("release_error", why=str(exc)[:200])
    elif args.mode == "clidetach" and not args.abandon and status == 0:
        out = cli(args, "release", token)
        if out.returncode != 0:
            log("release_error", why=out.stderr.strip()[:200])
    if conn is not None:
        conn.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
