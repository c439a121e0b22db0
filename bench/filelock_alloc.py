"""A file-lock + JSON port allocator: the fedimint-portalloc approach, written here in Python.

This is the baseline for "every process allocates for itself under a lock
file", following the algorithm and file format published by the
``fedimint-portalloc`` crate (0.13), so that the benchmark measures the
approach rather than a strawman:

- data directory: ``$FM_PORTALLOC_DATA_DIR`` (here: an explicit argument);
- ``lock``: an exclusive ``flock`` on it guards every access;
- ``fm-portalloc.json``: ``{"next": u16, "keys": {"<base>": {"size": u16,
  "expires": <unix seconds>}}}``; a missing ``next`` means 10000, ``keys`` is
  required, an entry is live while ``now < expires``;
- a call: lock, read the table, drop expired entries, start at ``next``
  (wrapping to 10000 past 32000), skip a candidate run that overlaps a live
  entry (jump to its end) or holds a port where a TCP or UDP bind on
  127.0.0.1 fails (jump past that port), store ``{size, expires: now+120}``,
  set ``next`` to the run's end, write ``fm-portalloc.tmp``, fdatasync it and
  rename it over the table.

Two deliberate differences, neither on the measured path: a full lap without
a fit raises instead of spinning with the lock held, and :func:`release`
exists (the crate has none; the benchmark uses it, untimed, to keep the number
of held ranges constant between measured calls).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

LOW = 10000
HIGH = 32000
TTL = 120
TABLE = "fm-portalloc.json"
TMP = "fm-portalloc.tmp"
LOCK = "lock"


class AllocError(Exception):
    pass


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _read(directory: str) -> dict[str, Any]:
    try:
        with open(os.path.join(directory, TABLE), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {"next": LOW, "keys": {}}
    table = json.loads(raw)  # corrupt or empty: the call fails, like the crate
    if not isinstance(table, dict) or not isinstance(table.get("keys"), dict):
        raise AllocError("fm-portalloc.json: 'keys' is required")
    table.setdefault("next", LOW)
    return table


def _write(directory: str, table: dict[str, Any]) -> None:
    tmp = os.path.join(directory, TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(table).encode())
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(directory, TABLE))


def _bindable(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def allocate(directory: str, size: int = 1, *, now: float | None = None) -> int:
    """Allocate ``size`` consecutive ports; return the first."""
    if not 1 <= size <= HIGH - LOW + 1:
        raise AllocError(f"bad size {size}")
    with _locked(directory):
        table = _read(directory)
        t = int(time.time() if now is None else now)
        keys: dict[str, dict[str, int]] = {
            k: v for k, v in table["keys"].items() if t < int(v["expires"])
        }
        bases = sorted(int(k) for k in keys)
        ends = [b + int(keys[str(b)]["size"]) for b in bases]
        candidate = int(table["next"])
        walked = 0
        while True:
            if candidate < LOW or candidate + size - 1 > HIGH:
                walked += max(0, HIGH + 1 - candidate)
                candidate = LOW
            if walked > HIGH - LOW + 1:
                raise AllocError("no free run of ports (the crate would spin here)")
            end = candidate + size
            # A live entry overlapping [candidate, end): the last one starting before end.
            i = bisect.bisect_left(bases, end) - 1
            if i >= 0 and ends[i] > candidate:
                walked += ends[i] - candidate
                candidate = ends[i]
                continue
            bad = next((p for p in range(candidate, end) if not _bindable(p)), None)
            if bad is not None:
                walked += bad + 1 - candidate
                candidate = bad + 1
                continue
            break
        keys[str(candidate)] = {"size": size, "expires": t + TTL}
        table["keys"] = keys
        table["next"] = end if end <= HIGH else LOW
        _write(directory, table)
        return candidate


def release(directory: str, base: int) -> None:
    """Drop the entry at ``base`` (a benchmark helper; the crate only expires entries)."""
    with _locked(directory):
        table = _read(directory)
        table["keys"].pop(str(base), None)
        _write(directory, table)


def seed(directory: str, held: int, *, start: int = LOW, ttl: float = 3600) -> None:
    """Write a table holding ``held`` single-port ranges from ``start`` on; ``next`` after them."""
    t = int(time.time())
    keys = {str(start + i): {"size": 1, "expires": int(t + ttl)} for i in range(held)}
    os.makedirs(directory, exist_ok=True)
    with _locked(directory):
        _write(directory, {"next": start + held, "keys": keys})


if __name__ == "__main__":
    import sys

    print(allocate(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1))
