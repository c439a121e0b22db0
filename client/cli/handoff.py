"""Sockets the wrapper binds on leased ports before CMD starts: ``--listen`` and ``--hold``.

``--listen`` closes the window between "the broker granted the port" and "the
server bound it" completely: the wrapper binds the port itself and CMD inherits
the bound socket, the way systemd socket activation hands sockets over (fds
from 3, ``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``LISTEN_PID``).

``--hold`` is for servers that cannot take a socket. The wrapper keeps a
*placeholder* on the port: a TCP socket that is bound but not listening, with
``SO_REUSEADDR`` set, until a process of CMD's own tree listens there. On Linux
(checked by ``tests/process/test_nogap.py`` against the running kernel):

* a bind without ``SO_REUSEADDR``, to the wildcard or to any one address,
  fails with ``EADDRINUSE`` while the placeholder is there;
* a bind *with* ``SO_REUSEADDR`` succeeds, and so does ``listen()`` on it.
  That is what lets CMD's own server start (nearly every TCP server sets
  ``SO_REUSEADDR``), and it is also the hole: a foreign server that sets it
  can take the port as well. A placeholder without ``SO_REUSEADDR`` would
  keep those out too, but it also refuses CMD's own bind, whatever CMD sets.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
from typing import NamedTuple

from portlease.client.protocol.errors import ConfigError

_LISTEN_SPEC = re.compile(r"^(?P<offset>\d+)(?:/(?P<proto>tcp|udp))?(?:=(?P<name>.+))?$")
# sd_listen_fds_with_names(3): a name is at most 255 characters and holds no ':'
# (the separator of LISTEN_FDNAMES) and no control characters.
_FDNAME = re.compile(r"^[!-9;-~]{1,255}$")


class ListenSpec(NamedTuple):
    """One ``--listen OFFSET[/udp][=NAME]``."""

    offset: int
    udp: bool
    name: str


def check_offset(option: str, spec: str, offset: int, count: int) -> int:
    """``offset`` when it names a port of an ``-n count`` lease; ConfigError (exit 2) otherwise."""
    if not 0 <= offset < count:
        raise ConfigError(f"{option} {spec!r}: OFFSET must be in 0..{count - 1} for -n {count}")
    return offset


def parse_listen(specs: list[str], count: int) -> list[ListenSpec]:
    """Check ``--listen`` values against the lease's size; ConfigError (exit 2) on bad ones."""
    out = []
    seen: set[tuple[int, bool]] = set()
    for i, spec in enumerate(specs):
        m = _LISTEN_SPEC.match(spec)
        if not m:
            raise ConfigError(f"--listen {spec!r}: expected OFFSET[/udp][=NAME], e.g. 0, 1/udp, 0=http")
        offset = check_offset("--listen", spec, int(m["offset"]), count)
        udp = m["proto"] == "udp"
        if (offset, udp) in seen:
            raise ConfigError(f"--listen {spec!r}: that port and protocol are already listed")
        seen.add((offset, udp))
        name = m["name"] if m["name"] is not None else f"port{i}"
        if not _FDNAME.match(name):
            raise ConfigError(f"--listen {spec!r}: NAME must be printable, without ':' or spaces")
        out.append(ListenSpec(offset, udp, name))
    return out


def parse_hold(specs: list[str], count: int) -> list[int]:
    """Check ``--hold OFFSET`` values; ConfigError (exit 2) on bad ones."""
    out: list[int] = []
    for spec in specs:
        if not spec.isdigit():
            raise ConfigError(f"--hold {spec!r}: expected an OFFSET, e.g. 0")
        offset = check_offset("--hold", spec, int(spec), count)
        if offset not in out:
            out.append(offset)
    return out


def _wildcard_socket(kind: int) -> tuple[socket.socket, str]:
    """A socket for the dual-stack wildcard ``::`` (IPv4 too), or ``0.0.0.0`` without IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
    except OSError:
        return socket.socket(socket.AF_INET, kind), "0.0.0.0"
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except OSError:
        sock.close()
        return socket.socket(socket.AF_INET, kind), "0.0.0.0"
    return sock, "::"


def _numeric_host(host: str, kind: int) -> tuple[int, str]:
    try:
        info = socket.getaddrinfo(host, None, type=kind, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        raise ConfigError(f"--listen-host {host!r}: not an IPv4 or IPv6 address") from None
    family, _, _, _, sockaddr = info[0]
    return family, str(sockaddr[0])


def check_host(host: str) -> None:
    """ConfigError (exit 2) unless ``host`` is a numeric IPv4 or IPv6 address (``--listen-host``)."""
    _numeric_host(host, socket.SOCK_STREAM)


class BindError(OSError):
    """A leased port could not be bound (something outside portlease took it)."""


def _bind_error(port: int, proto: str, exc: OSError) -> BindError:
    hint = ("; a process outside portlease holds it (see `portlease status --squatters`)"
            if exc.errno == errno.EADDRINUSE else "")
    return BindError(exc.errno, f"cannot bind leased port {port}/{proto}: {exc.strerror}{hint}")


def bind_listener(port: int, *, udp: bool, host: str | None) -> socket.socket:
    """A bound socket on ``port``: listening for TCP, bound for UDP.

    ``host`` None means the dual-stack wildcard. The socket is close-on-exec;
    the wrapper places it at its fd number in CMD.
    """
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    proto = "udp" if udp else "tcp"
    if host is None:
        sock, addr = _wildcard_socket(kind)
    else:
        family, addr = _numeric_host(host, kind)
        sock = socket.socket(family, kind)
    try:
        if not udp:
            # What servers set on their own listeners: a restart of CMD's server
            # on the same port is not refused by the old connections' TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        if not udp:
            sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise _bind_error(port, proto, exc) from None
    return sock


def bind_placeholder(port: int) -> socket.socket:
    """A TCP placeholder on ``port``: bound to the dual-stack wildcard, ``SO_REUSEADDR``, not listening."""
    sock, addr = _wildcard_socket(socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
    except OSError as exc:
        sock.close()
        raise _bind_error(port, "tcp", exc) from None
    return sock


def close_all(socks: list[socket.socket]) -> None:
    """Close every socket, ignoring ones already closed."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
