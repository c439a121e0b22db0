#!/usr/bin/env python3
"""Play fedimint-portalloc's part: allocate ports through its table, as the crate does.

Stdlib only, so the test suite can run it as a separate process without the
portlease package. It follows the crate (0.13) step by step:

- the directory is ``--dir``, else ``$FM_PORTALLOC_DATA_DIR``; it is created if missing;
- ``lock`` is opened create+append+read and locked with an exclusive, blocking
  ``flock`` for the whole call;
- ``fm-portalloc.json`` is read strictly, the way serde reads it: any fault (not
  JSON, no ``keys``, a float ``expires``, a key that is not a u16, a duplicate
  field …) fails the call with exit status 1; a missing file is an empty table;
  a missing ``next`` is 10000;
- expired entries are dropped (live while ``now < expires``, whole seconds);
- the search starts at ``next``; past 32000 it drops expired entries again and
  wraps to 10000; a run overlapping a live entry jumps to that entry's end; a
  run holding a port where a TCP (SO_REUSEADDR, as Rust's std sets it) or UDP
  bind on 127.0.0.1 fails jumps past that port;
- the run is stored as ``{"size": n, "expires": now + 120}``, ``next`` becomes
  the run's end, and the table is written pretty-printed to
  ``fm-portalloc.tmp``, fdatasync'd and renamed over ``fm-portalloc.json``;
- the table is read and written **unbuffered**, as the crate does
  (``serde_json::from_reader`` and ``to_writer_pretty`` on a bare ``File``): one
  ``read()`` per byte, and one ``write()`` per token of the pretty printer (about 30
  per entry). That is what a crate call costs (about 57 µs per entry in the table,
  measured against the real crate), and what it holds the lock for; a buffered
  stand-in is 23-37x faster than the real thing at 500-2,000 entries.

Deviations, for tests only: ``--low/--high/--reservation`` change the constants
(defaults are the crate's), and where the crate would spin forever holding the
lock (every run taken) this gives up after ``--max-wraps`` wraps with status 3.

Commands::

    portalloc_crate.py alloc N [--repeat K] [--use S] [--log FILE]   # print each base port
    portalloc_crate.py hold SECONDS        # take the lock, print "locked", sleep, release
    portalloc_crate.py corrupt [TEXT]      # replace the table with TEXT (default: broken JSON)
    portalloc_crate.py check               # exit 0 if the crate could read the table, else 1
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

LOW = 10000
HIGH = 32000
RESERVATION = 120
DATA = "fm-portalloc.json"


class Unreadable(Exception):
    """serde_json would refuse the table: the crate's call fails."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out and k in ("next", "keys", "size", "expires"):
            raise Unreadable(f"duplicate field `{k}`")  # serde rejects these; map keys overwrite
        out[k] = v
    return out


def _const(name: str) -> Any:
    raise Unreadable(f"invalid value {name}")


def _u(value: Any, bits: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
        raise Unreadable(f"invalid type or value for {what}: {value!r}, expected u{bits}")
    return value


def _key(name: str) -> int:
    # serde_json parses integer map keys from the string; only plain digits pass here.
    if not name.isascii() or not name.isdigit():
        raise Unreadable(f"invalid key {name!r}, expected u16")
    return _u(int(name), 16, "key")


def load(path: str, low: int = LOW) -> tuple[int, dict[int, tuple[int, int]]]:
    """(next, {base: (size, expires)}), read with serde's strictness."""
    try:
        data = read_unbuffered(path)
    except FileNotFoundError:
        return low, {}
    try:
        root = json.loads(data.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_const)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Unreadable(str(exc)) from None
    if not isinstance(root, dict):
        raise Unreadable("expected struct RootData")
    nxt = _u(root["next"], 16, "next") if "next" in root else low
    keys = root.get("keys")
    if not isinstance(keys, dict):
        raise Unreadable("missing field `keys`" if keys is None else "invalid type for keys")
    table: dict[int, tuple[int, int]] = {}
    for name, value in keys.items():
        if not isinstance(value, dict) or "size" not in value or "expires" not in value:
            raise Unreadable(f"entry {name}: expected struct RangeData")
        table[_key(name)] = (_u(value["size"], 16, "size"), _u(value["expires"], 64, "expires"))
    return nxt, table


def read_unbuffered(path: str) -> bytes:
    """The whole file, one read() per byte: serde_json's reader on an unbuffered File."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = bytearray()
        read = os.read
        while byte := read(fd, 1):
            out += byte
        return bytes(out)
    finally:
        os.close(fd)


def pretty_tokens(nxt: int, table: dict[int, tuple[int, int]]) -> list[bytes]:
    """The writes serde_json's PrettyFormatter makes for the table, one item per write()."""
    ind = b"  "
    out = [b"{", b"\n", ind, b'"', b"next", b'"', b": ", str(nxt).encode(), b",\n", ind,
           b'"', b"keys", b'"', b": ", b"{"]
    for i, (base, (size, expires)) in enumerate(sorted(table.items())):
        out += [b"\n" if i == 0 else b",\n", ind, ind, b'"', str(base).encode(), b'"', b": ",
                b"{", b"\n", ind, ind, ind, b'"', b"size", b'"', b": ", str(size).encode(),
                b",\n", ind, ind, ind, b'"', b"expires", b'"', b": ", str(expires).encode(),
                b"\n", ind, ind, b"}"]
    out += [b"\n", ind, b"}"] if table else [b"}"]
    out += [b"\n", b"}"]
    return out


def store(directory: str, nxt: int, table: dict[int, tuple[int, int]]) -> None:
    write_raw(directory, pretty_tokens(nxt, table))


def write_raw(directory: str, data: bytes | list[bytes]) -> None:
    """Write ``fm-portalloc.tmp`` (one write() per item of ``data``), fdatasync, rename."""
    tmp = os.path.join(directory, "fm-portalloc.tmp")
    # create + truncate + write, like OpenOptions in util.rs (no O_EXCL, follows links)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        for item in [data] if isinstance(data, bytes) else data:
            os.write(fd, item)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(directory, DATA))


def bindable(port: int) -> bool:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", port))
        tcp.listen(128)
        udp.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        tcp.close()
        udp.close()


class Locked:
    """The crate's DataDir + LockedRoot: open ``lock`` and hold an exclusive flock."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.fd = os.open(
            os.path.join(directory, "lock"), os.O_CREAT | os.O_APPEND | os.O_RDWR, 0o666
        )

    def __enter__(self) -> Locked:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("Lock taken, waiting...", file=sys.stderr)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def port_alloc(directory: str, n: int, a: argparse.Namespace) -> int:
    if n == 0:
        raise ValueError("Can't allocate range of 0 ports")
    with Locked(directory):
        nxt, table = load(os.path.join(directory, DATA), a.low)
        now = int(time.time())
        table = {b: v for b, v in table.items() if now < v[1]}
        base = nxt
        wraps = 0
        while True:
            if base > a.high:
                now = int(time.time())
                table = {b: v for b, v in table.items() if now < v[1]}
                base = a.low
                wraps += 1
                if wraps > a.max_wraps:
                    raise SystemExit(3)  # the crate would spin here forever, holding the lock
            if base + n > 65535:
                raise OverflowError(f"attempt to add with overflow: {base} + {n}")
            hit = next(
                (b + s for b, (s, _) in table.items() if b < base + n and base < b + s), None
            )
            if hit is not None:
                base = hit
                continue
            bad = next((p for p in range(base, base + n) if not bindable(p)), None)
            if bad is not None:
                base = bad + 1
                continue
            break
        table[base] = (n, int(time.time()) + a.reservation)
        store(directory, base + n, table)
        a.last_expires = table[base][1]
        return base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dir", default=os.environ.get("FM_PORTALLOC_DATA_DIR"))
    ap.add_argument("--low", type=int, default=LOW)
    ap.add_argument("--high", type=int, default=HIGH)
    ap.add_argument("--reservation", type=int, default=RESERVATION)
    ap.add_argument("--max-wraps", type=int, default=2)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("alloc")
    p.add_argument("n", type=int)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument(
        "--use", type=float, default=0.0, help="seconds each run is 'in use' after it is returned"
    )
    p.add_argument("--log", help="append one JSON line per run: ports and monotonic use interval")
    p.add_argument("--wall", action="store_true",
                   help="log wall times instead: written (the call returned), expires, done")
    p = sub.add_parser("hold")
    p.add_argument("seconds", type=float)
    p = sub.add_parser("corrupt")
    p.add_argument("text", nargs="?", default='{"next": 10000, "keys": {"10000": {"size": 3,')
    sub.add_parser("check")
    a = ap.parse_args(argv)
    if not a.dir:
        ap.error("give --dir or set FM_PORTALLOC_DATA_DIR")
    if a.cmd == "alloc":
        for _ in range(a.repeat):
            try:
                base = port_alloc(a.dir, a.n, a)
            except Unreadable as exc:
                print(f"Error: {exc}", file=sys.stderr)
                return 1
            t0 = time.monotonic()
            written = time.time()
            print(base, flush=True)
            time.sleep(a.use)
            if a.log:
                record: dict[str, Any] = {"who": f"crate-{os.getpid()}", "start": base, "count": a.n}
                if a.wall:
                    record.update(written=written, expires=a.last_expires, done=time.time())
                else:
                    record.update(t0=t0, t1=time.monotonic())
                line = json.dumps(record)
                with open(a.log, "a") as f:
                    f.write(line + "\n")
        return 0
    if a.cmd == "hold":
        with Locked(a.dir):
            print("locked", flush=True)
            time.sleep(a.seconds)
        return 0
    if a.cmd == "corrupt":
        with Locked(a.dir):
            write_raw(a.dir, a.text.encode())
        return 0
    with Locked(a.dir):
        try:
            load(os.path.join(a.dir, DATA))
        except Unreadable as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
