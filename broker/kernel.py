"""What the kernel says about ports: the bind check and the ranges it keeps for itself.

The bind check binds each candidate port for TCP and for UDP on the wildcard
address. Where the host has IPv6, that is one dual-stack socket per protocol
(``::`` with ``IPV6_V6ONLY`` off): Linux then refuses the bind if *any* IPv4 or
IPv6 socket holds the port, on any address (0.0.0.0, 127.0.0.1, ::, ::1, a
container bridge), whether it is v6-only or not, listening or merely bound,
with SO_REUSEADDR or without. Without IPv6 it is one IPv4 wildcard socket per
protocol. Two probes per port instead of four (v4 and v6 apart) halve the cost
of the check, which dominates the cost of a grant; tests/unit/test_kernel.py checks
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
from collections.abc import Iterable
from functools import cache

from . import badports

OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
"""The errnos of a socket call that met a limit of this process or the system (file
descriptors, buffers), not a fault of the port or the peer."""


def out_of_fds(exc: OSError) -> bool:
    """Whether ``exc`` says the process (or the system) has no file descriptor (or buffer) left."""
    return exc.errno in OUT_OF_RESOURCES

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


# (proto label, family, type) in the order probed; TCP first, as a TCP squatter is the usual one.
_PROBES_V4 = (("tcp", socket.AF_INET, socket.SOCK_STREAM), ("udp", socket.AF_INET, socket.SOCK_DGRAM))
_PROBES_DUAL = (("tcp", socket.AF_INET6, socket.SOCK_STREAM), ("udp", socket.AF_INET6, socket.SOCK_DGRAM))


def _failed_probe(port: int) -> tuple[str, int, int] | None:
    # On the bare C socket type, which makes the same system calls without the
    # Python wrapper's bookkeeping: this runs twice for every port granted.
    for proto, family, kind in _PROBES_DUAL if has_ipv6() else _PROBES_V4:
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
            return proto, family, kind
        finally:
            s.close()
    return None


def bind_ok(port: int) -> bool:
    """True when TCP and UDP binds of ``port`` succeed on every wildcard address.

    TCP, then UDP (dual-stack where the host has IPv6), stopping at the first
    failure: two binds for a port that passes. :func:`bind_failure` also says
    which probe failed.
    """
    return _failed_probe(port) is None


def bind_failure(port: int) -> tuple[str, str] | None:
    """None when :func:`bind_ok` would be True, else which probe failed: ``(proto, family)``.

    ``proto`` is ``"tcp"`` or ``"udp"``, the first probe that failed (TCP is
    probed first). ``family`` is ``"ipv4"`` when the holder covers IPv4 (an IPv4
    socket, or a dual-stack IPv6 one), else ``"ipv6"`` (an IPv6-only holder).
    Telling the two apart costs one more bind, made only after the dual-stack
    probe has failed, so a port that passes costs what it does in bind_ok.
    """
    failed = _failed_probe(port)
    if failed is None:
        return None
    proto, family, kind = failed
    if family == socket.AF_INET or not _v4_bind_ok(kind, port):
        return proto, "ipv4"
    return proto, "ipv6"


def _v4_bind_ok(kind: int, port: int) -> bool:
    s = _socket.socket(socket.AF_INET, kind)
    try:
        s.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


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


def parse_exclude(items: Iterable[int | str]) -> list[tuple[int, int]]:
    """The ``exclude`` config key (ports, and ``"LO-HI"`` strings) as (start, count) runs.

    Raises ValueError naming the first entry that is not a port 1-65535 or a
    range of them with LO <= HI.
    """
    runs = []
    for item in items:
        lo: int | None = None
        hi: int | None = None
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str):
            a, sep, b = item.strip().partition("-")
            if a.strip().isdigit() and (not sep or b.strip().isdigit()):
                lo = int(a)
                hi = int(b) if sep else lo
        if lo is None or hi is None or not (1 <= lo <= hi <= 65535):
            raise ValueError(f"exclude entry {item!r} is not a port 1-65535 or a range \"LO-HI\" of them")
        runs.append((lo, hi - lo + 1))
    return runs


def merge_runs(runs: Iterable[tuple[int, int]], low: int, high: int) -> list[tuple[int, int]]:
    """(start, count) runs cut to ``[low, high]``, sorted, overlapping and adjacent ones merged."""
    spans = sorted((max(s, low), min(s + c - 1, high)) for s, c in runs if c > 0)
    merged: list[list[int]] = []
    for lo, hi in spans:
        if lo > hi:
            continue
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi - lo + 1) for lo, hi in merged]


def _spell(runs: list[tuple[int, int]]) -> str:
    return ", ".join(str(s) if c == 1 else f"{s}-{s + c - 1}" for s, c in runs)


def range_hint(
    low: int, high: int, *, ephemeral_path: str = _EPHEMERAL, reserved_path: str = _RESERVED
) -> str | None:
    """The sentence to add to an ``exhausted`` error or to ``status`` when the kernel keeps part of the range.

    None when the range ``[low, high]`` overlaps neither the kernel's ephemeral
    range (``net.ipv4.ip_local_port_range``) nor its reserved ports
    (``net.ipv4.ip_local_reserved_ports``). Read from /proc at each call, so it
    follows a ``sysctl`` change; both are per network namespace.
    """
    parts = []
    eph = ephemeral_range(ephemeral_path)
    eph_runs = merge_runs([(eph[0], eph[1] - eph[0] + 1)], low, high) if eph else []
    if eph_runs:
        parts.append(f"{_which(eph_runs, low, high)} in the kernel's ephemeral range "
                     "(net.ipv4.ip_local_port_range)")
    res_runs = merge_runs(reserved_ports(reserved_path), low, high)
    if res_runs:
        parts.append(f"{_which(res_runs, low, high)} reserved by the kernel "
                     "(net.ipv4.ip_local_reserved_ports)")
    if not parts:
        return None
    return "; ".join(parts) + ", so they are never granted"


def _which(runs: list[tuple[int, int]], low: int, high: int) -> str:
    if runs == [(low, high - low + 1)]:
        return f"all ports of the range {low}-{high} are"
    return f"ports {_spell(runs)} of the range {low}-{high} are"


def excluded_runs(
    low: int, high: int, extra: Iterable[int | str] = (), *, bad_ports: bool = True
) -> tuple[list[tuple[int, int]], list[str]]:
    """Runs inside ``[low, high]`` to keep out of the allocator, and warnings to log.

    The runs are the kernel's ephemeral range and reserved ports, the ports
    browsers refuse (:mod:`.badports`, unless ``bad_ports`` is False) and
    ``extra``, the operator's ``exclude`` config key as it is written (ports
    and ``"LO-HI"`` strings; ValueError if one is neither). They come back cut
    to the range, sorted and merged, so their counts add up to the number of
    ports excluded.
    """
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
    if bad_ports:
        runs.extend(badports.bad_port_runs(low, high))
    operator = parse_exclude(extra)
    outside = [(s, c) for s, c in operator if s > high or s + c - 1 < low]
    if outside:
        warnings.append(f"exclude entries {_spell(outside)} lie outside the port range {low}-{high}")
    runs.extend(operator)
    merged = merge_runs(runs, low, high)
    if merged and merged == [(low, high - low + 1)]:
        warnings.append(f"every port of the range {low}-{high} is excluded: nothing can be granted")
    return merged, warnings
