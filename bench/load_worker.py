"""Client processes for bench/load.py: many held leases, a slow-loris, a connection flood.

    --role hold   open N connections (non-blocking, raw protocol), hello + lease 1 port on
                  each, report the grant latencies and ports as one JSON line, hold them until
                  a line arrives on stdin, then close them all
    --role loris  C connections that trickle one byte at a time and never send a newline
    --role flood  connect, hello, close (and connect-and-drop) as fast as possible
    --role status ask for status in a loop (the whole lease table each time)
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import socket
import sys
import time
from typing import Any

HELLO = b'{"op":"hello","id":0,"version":1}\n'


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
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(args.socket)
    f = s.makefile("rb")
    s.sendall(HELLO)
    f.readline()
    end = time.monotonic() + args.seconds
    calls, size = 0, 0
    while time.monotonic() < end:
        s.sendall(b'{"op":"status","id":1}\n')
        size = len(f.readline())  # not parsed: this process only keeps the broker busy
        calls += 1
    print(json.dumps({"calls": calls, "bytes": size, "seconds": args.seconds}), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["hold", "loris", "flood", "status"], required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--id", default="0")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=0.005)
    args = ap.parse_args()
    return {"hold": hold, "loris": loris, "flood": flood, "status": status_loop}[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
