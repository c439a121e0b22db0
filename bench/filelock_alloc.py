"""The fedimint-portalloc crate's call, as the benchmarks time it: ``tests/portalloc_crate.py``.

The crate is Rust; the stand-in is its algorithm and file format in Python, and it
models what a call costs as well: the crate reads and writes the whole table
**unbuffered** (one ``read()`` per byte, one ``write()`` per token of serde's pretty
printer, about 30 per entry), so each call costs about 57 µs per entry in the table
and holds the lock that long (measured against the crate built from source,
December 2026: p50 3.3-4.8 ms at 0 entries, 31 ms at 500, 121 ms at 2,000). An
earlier version of this file read and wrote with buffered I/O and was 23-37x faster
than the real crate at 500-2,000 entries.

One implementation serves the tests and the benchmarks (this module loads the
stand-in from ``tests/``). Two helpers exist for the benchmark only: :func:`release`
(the crate has no release call; used, untimed, to keep the number of held ranges
constant between measured calls) and :func:`seed`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import portalloc_crate as crate

LOW = crate.LOW
HIGH = crate.HIGH
TTL = crate.RESERVATION
TABLE = crate.DATA


class AllocError(Exception):
    pass


def _args(low: int = LOW, high: int = HIGH) -> argparse.Namespace:
    return argparse.Namespace(low=low, high=high, reservation=TTL, max_wraps=2)


def allocate(directory: str, size: int = 1, *, low: int = LOW, high: int = HIGH) -> int:
    """One crate call: allocate ``size`` consecutive ports; return the first."""
    try:
        return crate.port_alloc(directory, size, _args(low, high))
    except (crate.Unreadable, SystemExit) as exc:
        raise AllocError(str(exc)) from None


def release(directory: str, base: int) -> None:
    """Drop the entry at ``base`` (a benchmark helper; the crate only expires entries)."""
    with crate.Locked(directory):
        nxt, table = crate.load(os.path.join(directory, TABLE))
        table.pop(base, None)
        crate.store(directory, nxt, table)


def seed(directory: str, held: int, *, start: int = LOW, ttl: float = 3600) -> None:
    """Write a table holding ``held`` single-port ranges from ``start`` on; ``next`` after them."""
    t = int(time.time())
    os.makedirs(directory, exist_ok=True)
    with crate.Locked(directory):
        crate.store(directory, start + held, {start + i: (1, int(t + ttl)) for i in range(held)})


if __name__ == "__main__":
    print(allocate(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1))
