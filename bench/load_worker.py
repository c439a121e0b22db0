"""Client processes for bench/load.py: many held leases, a slow-loris, a connection flood.

    --role hold   open N connections (non-blocking, raw protocol), hello + lease 1 port on
                  each, report the grant latencies and ports as one JSON line, hold them until
                  a line arrives on stdin, then close them all
    --role loris  C connections that trickle one byte at a time and never send a newline
    --role flood  connect, hello, close (and connect-and-drop) as fast as possible
    --role status ask for status in a loop (the whole lease table each time)
    --role hostile  one uid at all its caps: connections, long-note leases, pipelined status
                  never read, slow-loris (run under another uid by ``load.py --hostile``)
    --role honest lease + release (and now and then a new connection) in a loop, latencies
    --role pipeline  N connections each keeping --depth requests in flight (``ping``, or
                  ``status`` with after=65535: cheap requests, many connections of one uid)
    --role pages  take --leases leases with long notes, then N connections each send one
                  ``status`` (a page of ~700 kB) and never read
    --role renew  one detached lease renewed --n times, pipelined in batches

Stdlib only: ``load.py --hostile`` runs it as other uids with the system python.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import selectors
import socket
import sys
import time
from typing import Any

HELLO = b'{"op":"hello","id":0,"version":1}\n'


def _hello(path: str, timeout: float) -> tuple[socket.socket, Any]:
    """A connection to the broker at ``path`` past ``hello``, and a reader of its replies."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile("rb")
    s.sendall(HELLO)
    f.readline()
    return s, f


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def hold(args: argparse.Namespace) -> int:
    raise_nofile()
    sel = selectors.DefaultSelector()
    sent: dict[int, float] = {}
    bufs: dict[int, bytes] = {}
    socks: dict[int, socket.socket] = {}
    latencies: list[float] = []
    ports: list[int] = []
    errors: dict[str, int] = {}
    lease = json.dumps({"op": "lease", "id": 1, "count": 1, "note": f"load {args.id}"}).encode() + b"\n"

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            fd = s.fileno()
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                errors["closed"] = errors.get("closed", 0) + 1
                sel.unregister(s)
                continue
            buf = bufs.get(fd, b"") + data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                reply = json.loads(line)
                if reply.get("id") != 1:
                    continue
                if reply.get("reply") == "granted":
                    latencies.append(time.monotonic() - sent[fd])
                    ports.extend(reply["ports"])
                else:
                    code = reply.get("code", "?")
                    errors[code] = errors.get(code, 0) + 1
                sel.unregister(s)  # nothing more is expected on it
                break
            bufs[fd] = buf

    t0 = time.monotonic()
    eagain = 0
    for i in range(args.n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        connected = False
        for _ in range(30_000):  # bounded: about 30 s of a full backlog
            try:
                s.connect(args.socket)
                connected = True
                break
            except BlockingIOError:
                # The broker's listen backlog is full: read replies meanwhile, then retry.
                eagain += 1
                pump(0.001)
            except OSError as exc:
                key = f"connect: {exc.strerror}"
                errors[key] = errors.get(key, 0) + 1
                break
        if not connected:
            s.close()
            continue
        s.setblocking(False)
        socks[s.fileno()] = s
        sent[s.fileno()] = time.monotonic()
        s.send(HELLO + lease)
        sel.register(s, selectors.EVENT_READ)
        if i % 32 == 31:
            pump(0)
    deadline = time.monotonic() + 120
    while len(latencies) + sum(v for k, v in errors.items() if not k.startswith("connect")) < len(socks) \
            and time.monotonic() < deadline:
        pump(0.1)
    took = time.monotonic() - t0
    print(json.dumps({"ready": True, "n": len(socks), "granted": len(latencies), "took": took,
                      "eagain": eagain,
                      "latencies": latencies, "ports": ports, "errors": errors}), flush=True)
    sys.stdin.readline()
    t1 = time.monotonic()
    for s in socks.values():
        s.close()
    print(json.dumps({"closed": time.monotonic() - t1}), flush=True)
    return 0


def loris(args: argparse.Namespace) -> int:
    socks = []
    for _ in range(args.n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(args.socket)
        s.sendall(HELLO)
        s.setblocking(False)
        socks.append(s)
    payload = b'{"op":"lease","id":1,"note":"' + b"z" * 100_000
    sent = 0
    end = time.monotonic() + args.seconds
    i = 0
    while time.monotonic() < end and i < len(payload):
        for s in socks:
            try:
                s.send(payload[i:i + 1])
                sent += 1
            except OSError:
                pass
        i += 1
        time.sleep(args.interval)
    print(json.dumps({"bytes_sent": sent, "connections": len(socks), "bytes_each": i}), flush=True)
    for s in socks:
        s.close()
    return 0


def flood(args: argparse.Namespace) -> int:
    end = time.monotonic() + args.seconds
    n = hello_ok = busy = failed = 0
    for _ in range(10_000_000):
        if time.monotonic() >= end:
            break
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(args.socket)
            n += 1
            if n % 2:
                s.sendall(HELLO)
                reply: dict[str, Any] = json.loads(s.recv(4096).split(b"\n")[0])
                if reply.get("reply") == "hello":
                    hello_ok += 1
                elif reply.get("code") == "busy":
                    busy += 1
        except (OSError, ValueError):
            failed += 1
        finally:
            s.close()
    print(json.dumps({"connections": n, "hello_ok": hello_ok, "busy": busy, "failed": failed,
                      "seconds": args.seconds}), flush=True)
    return 0


def status_loop(args: argparse.Namespace) -> int:
    s, f = _hello(args.socket, 30)
    end = time.monotonic() + args.seconds
    calls, size = 0, 0
    while time.monotonic() < end:
        s.sendall(b'{"op":"status","id":1}\n')
        size = len(f.readline())  # not parsed: this process only keeps the broker busy
        calls += 1
    print(json.dumps({"calls": calls, "bytes": size, "seconds": args.seconds}), flush=True)
    return 0


def _summary(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    if not v:
        return {"n": 0}

    def q(x: float) -> float:
        return v[min(len(v) - 1, int(x / 100 * len(v)))] * 1e3

    return {"n": len(v), "p50_ms": q(50), "p99_ms": q(99), "max_ms": v[-1] * 1e3}


def hostile(args: argparse.Namespace) -> int:
    """One uid at all its caps at once: connections, leases with long notes, pipelined
    ``status`` writes that are never read, and slow-loris partial lines.

    Opens connections until the broker refuses (``quota``) or ``--n`` is reached;
    the first ones take leases (up to the uid's port cap) with notes of
    ``--note`` bytes, so that every ``status`` reply is as large as this uid
    can make it; ``--status-conns`` of them then write 400 ``status`` requests at
    a time and never read; the rest trickle one byte of an endless line each
    ``--interval``. Prints one JSON line when ``--seconds`` are over.
    """
    raise_nofile()
    socks: list[socket.socket] = []
    refused: dict[str, int] = {}
    t0 = time.monotonic()
    for _ in range(args.n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(args.socket)
            s.sendall(HELLO)
            reply = json.loads(s.recv(65536).split(b"\n")[0])
        except (OSError, ValueError) as exc:
            s.close()
            key = type(exc).__name__
            refused[key] = refused.get(key, 0) + 1
            if sum(refused.values()) > 50:
                break
            continue
        if reply.get("reply") != "hello":
            s.close()
            code = str(reply.get("code", "?"))
            refused[code] = refused.get(code, 0) + 1
            if sum(refused.values()) > 50:
                break  # at the cap: the broker says so, no need to insist
            continue
        socks.append(s)
    opened = time.monotonic() - t0
    # Leases with long notes on the first connections, pipelined, until the uid's cap.
    note = "n" * args.note
    leases = 0
    lease_errors: dict[str, int] = {}
    for s in socks[: -(-args.leases // 1000)]:
        want = min(1000, args.leases - leases)
        if want <= 0:
            break
        s.sendall(b"".join(json.dumps({"op": "lease", "id": i + 1, "count": 1,
                                       "note": note}).encode() + b"\n" for i in range(want)))
        f = s.makefile("rb")
        for _ in range(want):
            reply = json.loads(f.readline())
            if reply.get("reply") == "granted":
                leases += 1
            else:
                code = str(reply.get("code", "?"))
                lease_errors[code] = lease_errors.get(code, 0) + 1
    status_socks = socks[: args.status_conns]
    loris_socks = socks[args.status_conns:]
    for s in socks:
        s.setblocking(False)
    burst = b"".join(b'{"op":"status","id":%d}\n' % i for i in range(400))
    status_bytes = loris_bytes = 0
    closed_by_broker = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        for s in list(status_socks):
            try:
                status_bytes += s.send(burst)
            except BlockingIOError:
                pass  # the broker stopped reading us: the backpressure we are testing
            except OSError:
                status_socks.remove(s)
                closed_by_broker += 1
        for s in list(loris_socks):
            try:
                loris_bytes += s.send(b"x" if loris_bytes else b'{"op":"status","note":"')
            except BlockingIOError:
                pass
            except OSError:
                loris_socks.remove(s)
                closed_by_broker += 1
        time.sleep(args.interval)
    print(json.dumps({
        "connections": len(socks), "refused": refused, "open_seconds": opened,
        "leases": leases, "lease_errors": lease_errors, "note_bytes": args.note,
        "status_conns": args.status_conns, "status_bytes_written": status_bytes,
        "loris_conns": len(socks) - args.status_conns, "loris_bytes": loris_bytes,
        "closed_by_broker": closed_by_broker,
    }), flush=True)
    for s in socks:
        s.close()
    return 0


def honest(args: argparse.Namespace) -> int:
    """A well-behaved client: ``lease`` + ``release`` on an open connection, and every
    tenth time ``with lease(1)`` on a new one, for ``--seconds``; latencies as JSON."""
    end = time.monotonic() + args.seconds
    open_ms: list[float] = []
    fresh_ms: list[float] = []
    errors: dict[str, int] = {}

    def call(f: Any, s: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
        s.sendall(json.dumps(msg).encode() + b"\n")
        out: dict[str, Any] = json.loads(f.readline())
        return out

    def cycle(s: socket.socket, f: Any) -> None:
        reply = call(f, s, {"op": "lease", "id": 2, "count": 1})
        if reply.get("reply") != "granted":
            code = str(reply.get("code", "?"))
            errors[code] = errors.get(code, 0) + 1
            return
        call(f, s, {"op": "release", "id": 3, "token": reply["token"]})

    s, f = _hello(args.socket, 30)
    i = 0
    while time.monotonic() < end:
        i += 1
        t0 = time.perf_counter()
        try:
            if i % 10:
                cycle(s, f)
                open_ms.append(time.perf_counter() - t0)
            else:
                s2, f2 = _hello(args.socket, 30)
                cycle(s2, f2)
                s2.close()
                fresh_ms.append(time.perf_counter() - t0)
        except (OSError, ValueError) as exc:
            key = type(exc).__name__
            errors[key] = errors.get(key, 0) + 1
            s.close()
            s, f = _hello(args.socket, 30)
        time.sleep(args.interval)
    s.close()
    print(json.dumps({"open": _summary(open_ms), "fresh": _summary(fresh_ms),
                      "all": _summary(open_ms + fresh_ms), "errors": errors}), flush=True)
    return 0


def _connect_many(path: str, n: int) -> tuple[list[socket.socket], dict[str, int]]:
    """Up to ``n`` connections that got ``hello``, and the refusals (by code) met on the way."""
    socks: list[socket.socket] = []
    refused: dict[str, int] = {}
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(path)
            s.sendall(HELLO)
            reply = json.loads(s.recv(65536).split(b"\n")[0])
        except (OSError, ValueError) as exc:
            s.close()
            refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
            continue
        if reply.get("reply") != "hello":
            s.close()
            code = str(reply.get("code", "?"))
            refused[code] = refused.get(code, 0) + 1
            continue
        socks.append(s)
    return socks, refused


def pipeline(args: argparse.Namespace) -> int:
    """Many connections of one uid, each keeping ``--depth`` cheap requests in flight.

    Prints ``{"ready": ...}`` once every connection is open and flooding, then
    floods until a line arrives on stdin (or ``--seconds`` pass), then prints
    the replies it got.
    """
    raise_nofile()
    socks, refused = _connect_many(args.socket, args.n)
    one = {"ping": b'{"op":"ping","id":1}\n',
           "status-after": b'{"op":"status","id":1,"after":65535}\n'}[args.request]
    burst = one * args.depth
    sel = selectors.DefaultSelector()
    owed: dict[int, int] = {}
    for s in socks:
        s.setblocking(False)
        s.sendall(burst)
        owed[s.fileno()] = args.depth
        sel.register(s, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    print(json.dumps({"ready": True, "connections": len(socks)}), flush=True)
    replies = 0
    end = time.monotonic() + args.seconds
    running = True
    while running and time.monotonic() < end:
        for key, _ in sel.select(0.5):
            if key.fileobj is sys.stdin:
                running = False
                break
            s = key.fileobj  # type: ignore[assignment]
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                continue
            got = data.count(b"\n")
            replies += got
            fd = s.fileno()
            owed[fd] -= got
            if owed[fd] <= 0:
                # The whole batch is answered: send the next one at once.
                with contextlib.suppress(OSError):
                    s.sendall(burst)
                owed[fd] += args.depth
    print(json.dumps({"connections": len(socks), "refused": refused, "replies": replies,
                      "request": args.request, "depth": args.depth}), flush=True)
    for s in socks:
        s.close()
    return 0


def pages(args: argparse.Namespace) -> int:
    """Leases with long escaped notes (so a ``status`` page is as large as it gets), then ``--n``
    connections each sending one ``status`` and never reading its reply."""
    raise_nofile()
    holders, _ = _connect_many(args.socket, -(-args.leases // 1000))
    # A control character is six bytes in a JSON reply (\u0001): the largest page a
    # small range of leases can make.
    note = "\x01" * args.note
    leases = 0
    for s in holders:
        want = min(1000, args.leases - leases)
        s.sendall(b"".join(json.dumps({"op": "lease", "id": i + 1, "count": 1,
                                       "note": note}).encode() + b"\n" for i in range(want)))
        f = s.makefile("rb")
        leases += sum(json.loads(f.readline()).get("reply") == "granted" for _ in range(want))
    socks, refused = _connect_many(args.socket, args.n)
    for s in socks:
        s.sendall(b'{"op":"status","id":1}\n')
    print(json.dumps({"ready": True, "connections": len(socks), "refused": refused,
                      "leases": leases}), flush=True)
    sys.stdin.readline()  # hold everything, unread, until told
    print(json.dumps({"connections": len(socks), "leases": leases}), flush=True)
    for s in socks + holders:
        s.close()
    return 0


def renew(args: argparse.Namespace) -> int:
    """One detached lease renewed ``--n`` times, ``--depth`` renews pipelined at a time."""
    s, f = _hello(args.socket, 60)
    s.sendall(b'{"op":"lease","id":1,"count":1,"detach":true,"ttl":86400}\n')
    token = json.loads(f.readline())["token"]
    burst = (json.dumps({"op": "renew", "id": 2, "token": token}).encode() + b"\n") * args.depth
    done, t0 = 0, time.monotonic()
    while done < args.n:
        s.sendall(burst)
        for _ in range(args.depth):
            f.readline()
        done += args.depth
    took = time.monotonic() - t0
    s.sendall(json.dumps({"op": "release", "id": 3, "token": token}).encode() + b"\n")
    f.readline()
    s.close()
    print(json.dumps({"renews": done, "seconds": took}), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["hold", "loris", "flood", "status", "hostile", "honest",
                                       "pipeline", "pages", "renew"], required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--id", default="0")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=0.005)
    ap.add_argument("--leases", type=int, default=4096, help="hostile: leases to hold")
    ap.add_argument("--note", type=int, default=1000, help="hostile: bytes of each lease's note")
    ap.add_argument("--status-conns", type=int, default=64, help="hostile: pipelined status writers")
    ap.add_argument("--pad", default="", help="ignored: makes the command line longer (pages)")
    ap.add_argument("--depth", type=int, default=64, help="pipeline, renew: requests in flight")
    ap.add_argument("--request", choices=["ping", "status-after"], default="ping", help="pipeline")
    args = ap.parse_args()
    roles = {"hold": hold, "loris": loris, "flood": flood, "status": status_loop, "hostile": hostile,
             "honest": honest, "pipeline": pipeline, "pages": pages, "renew": renew}
    return roles[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
