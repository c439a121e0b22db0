"""What the kernel says about ports: the bind check and the ranges it keeps for itself.

The bind check binds each candidate port for TCP and for UDP on the wildcard
address. Where the host has IPv6, that is one dual-stack socket per protocol
(``::`` with ``IPV6_V6ONLY`` off): Linux then refuses the bind if *any* IPv4 or
IPv6 socket holds the port, on any address (0.0.0.0, 127.0.0.1, ::, ::1, a
container bridge), whether it is v6-only or not, listening or merely bound,
with SO_REUSEADDR or without. Without IPv6 it is one IPv4 wildcard socket per
protocol. Two probes per port instead of four (v4 and v6 apart) halve the cost
of the check, which dominates the cost of a grant; tests/test_kernel.py checks
every one of those squatter kinds against the real kernel.

SO_REUSEADDR is deliberately *not* set on the probe sockets. With it, Linux lets
a TCP bind succeed next to sockets in TIME_WAIT and next to other bound-but-not-
listening SO_REUSEADDR sockets; without it the probe fails in those cases too.
So a port passes only if a bind *without* SO_REUSEADDR would succeed, which is
the strictest thing a test's server may do. The cost is that a port in TIME_WAIT
(a server just stopped after serving connections) is passed over for a few
seconds (the allocator's quarantine) instead of handed out.
"""

from __future__ import annotations

import _socket
import errno
import logging
import socket
from functools import cache

log = logging.getLogger("portlease.kernel")

_EPHEMERAL = "/proc/sys/net/ipv4/ip_local_port_range"
_RESERVED = "/proc/sys/net/ipv4/ip_local_reserved_ports"


@cache
def has_ipv6() -> bool:
    """Whether an IPv6 socket can be bound on the wildcard here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
        return True
    except OSError:
        return False


_BUSY = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


_PROBES_V4 = ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET, socket.SOCK_DGRAM))
_PROBES_DUAL = ((socket.AF_INET6, socket.SOCK_STREAM), (socket.AF_INET6, socket.SOCK_DGRAM))


def bind_ok(port: int) -> bool:
    """True when TCP and UDP binds of ``port`` succeed on every wildcard address.

    TCP, then UDP (dual-stack where the host has IPv6), stopping at the first
    failure. On the bare C socket type, which makes the same system calls
    without the Python wrapper's bookkeeping: this runs twice for every port
    granted.
    """
    for family, kind in _PROBES_DUAL if has_ipv6() else _PROBES_V4:
        s = _socket.socket(family, kind)
        try:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(("::", port))
            else:
                s.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno not in _BUSY:
                log.warning("bind check of port %d: %s", port, exc)
            return False
        finally:
            s.close()
    return True


def ephemeral_range(path: str = _EPHEMERAL) -> tuple[int, int] | None:
    """The kernel's range for automatic (ephemeral) ports, if readable."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return None


def parse_port_list(text: str) -> list[tuple[int, int]]:
    """``"8080,9000-9010"`` → ``[(8080, 1), (9000, 11)]`` as (start, count) runs."""
    runs = []
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        start, end = int(lo), int(hi or lo)
        if 0 < start <= end <= 65535:
            runs.append((start, end - start + 1))
    return runs


def reserved_ports(path: str = _RESERVED) -> list[tuple[int, int]]:
    """The kernel's reserved ports (``ip_local_reserved_ports``) as (start, count) runs."""
    try:
        with open(path) as f:
            return parse_port_list(f.read())
    except (OSError, ValueError):
        return []


def excluded_runs(low: int, high: int) -> tuple[list[tuple[int, int]], list[str]]:
    """Runs inside ``[low, high]`` to keep out of the allocator, and warnings to log."""
    runs: list[tuple[int, int]] = []
    warnings: list[str] = []
    eph = ephemeral_range()
    if eph is not None:
        lo, hi = eph
        if lo <= high and hi >= low:
            warnings.append(
                f"the port range {low}-{high} overlaps the kernel's ephemeral range {lo}-{hi} "
                f"({_EPHEMERAL}); those ports are never granted, since the kernel hands them "
                "to any socket that binds port 0 or connects"
            )
            runs.append((lo, hi - lo + 1))
    reserved = [(s, c) for s, c in reserved_ports() if s <= high and s + c - 1 >= low]
    if reserved:
        warnings.append(
            f"the port range {low}-{high} overlaps ip_local_reserved_ports; those ports "
            "are never granted"
        )
        runs.extend(reserved)
    return runs, warnings
