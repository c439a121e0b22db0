"""Which sockets hold which ports, and which processes hold those sockets, read from the kernel.

Sockets come from ``/proc/net/{tcp,tcp6,udp,udp6}``. Those files list TCP
sockets that listen or are connected, and every UDP socket, but not a TCP
socket that is only *bound*: a server that has called ``bind()`` and not yet
``listen()``, or a test that binds a port to "reserve" it. Such a socket holds
its port as firmly as a listener does, so the kernel's socket-diagnostics
netlink interface (``NETLINK_SOCK_DIAG``, the one ``ss`` uses) is asked for
those as well; it lists them from Linux 6.5 on (``TCP_BOUND_INACTIVE``) and
older kernels simply return none.

Processes come from ``/proc/PID/fd``: each socket fd reads as
``socket:[INODE]``. Another user's fds can be read only by root (or with
CAP_SYS_PTRACE), so an unprivileged caller sees owners only among its own
processes; the sockets themselves are visible to everyone.

Everything here is synchronous and reads the current network namespace.
"""

from __future__ import annotations

import bisect
import os
import socket
import struct
import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "BROKER_PREFIX", "CLAIM_PREFIX", "AbstractName", "NetSocket", "abstract_names", "all_owners",
    "descendants", "holder", "listening", "live_brokers", "owners", "port_claims", "sockets",
    "squatters",
]

_PROC_NET = "/proc/net"

# Kernel TCP states (include/net/tcp_states.h) as /proc/net and sock_diag spell them.
_TCP_CLOSE = 0x07  # for UDP: an unconnected (receive-from-anyone) socket; for TCP: bound only
_TCP_LISTEN = 0x0A
_TCP_BOUND_INACTIVE = 13

_TABLES = (("tcp", 4, "tcp"), ("tcp", 6, "tcp6"), ("udp", 4, "udp"), ("udp", 6, "udp6"))


@dataclass(frozen=True)
class NetSocket:
    """One socket bound to a local port.

    ``listening`` means the socket takes traffic from anyone: a TCP socket in
    LISTEN, or a UDP socket that is bound and not connected. A TCP socket that
    is bound but neither listening nor connected has ``listening=False``, as
    does a connection. ``inode`` is 0 for a socket no process holds any more
    (TCP TIME_WAIT, for one).
    """

    proto: str
    """``"tcp"`` or ``"udp"``."""
    family: int
    """4 or 6."""
    address: str
    """The local address, e.g. ``"0.0.0.0"``, ``"127.0.0.1"``, ``"::"``, ``"::ffff:127.0.0.1"``."""
    port: int
    listening: bool
    inode: int
    uid: int


def _address(hexaddr: str) -> str:
    # The kernel prints each 32-bit word of the address in host byte order.
    raw = bytes.fromhex(hexaddr)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    packed = struct.pack(f"!{len(words)}I", *words)
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _read_table(proto: str, family: int, name: str, ports: range | None) -> Iterator[NetSocket]:
    try:
        with open(os.path.join(_PROC_NET, name)) as f:
            lines = f.read().splitlines()[1:]
    except FileNotFoundError:  # no IPv6 in this kernel or namespace
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 10:
            continue
        addr, _, porthex = fields[1].rpartition(":")
        port = int(porthex, 16)
        if ports is not None and port not in ports:
            continue
        state = int(fields[3], 16)
        listening = state == _TCP_LISTEN if proto == "tcp" else state == _TCP_CLOSE
        yield NetSocket(proto, family, _address(addr), port, listening, int(fields[9]), int(fields[7]))


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSG_HDR = struct.Struct("=IHHII")
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid (48 bytes).
_DIAG_REQ = struct.Struct("=BBBBI48x")
# struct inet_diag_msg: family, state, timer, retrans, sport, dport, src[16], dst[16], if, cookie[8],
# expires, rqueue, wqueue, uid, inode.
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")


def _bound_only_tcp(ports: range | None) -> Iterator[NetSocket]:
    """TCP sockets that are bound and neither listening nor connected (absent from /proc/net/tcp)."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    except OSError:
        return
    with nl:
        for af, family in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            req = _DIAG_REQ.pack(af, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_BOUND_INACTIVE)
            nl.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY,
                                    _NLM_F_REQUEST | _NLM_F_DUMP, family, 0) + req)
            yield from _diag_replies(nl, family, ports)


def _diag_replies(nl: socket.socket, family: int, ports: range | None) -> Iterator[NetSocket]:
    while True:
        data = nl.recv(1 << 16)
        off = 0
        while off + _NLMSG_HDR.size <= len(data):
            length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data, off)
            if kind in (_NLMSG_DONE, _NLMSG_ERROR) or length < _NLMSG_HDR.size:
                # An error here (EINVAL, ENOENT) is an older kernel or a family it lacks: nothing to add.
                return
            (fam, state, _, _, sport, _, src, _, _, _, _, _, _, uid, inode) = _DIAG_MSG.unpack_from(
                data, off + _NLMSG_HDR.size)
            off += (length + 3) & ~3
            port = int.from_bytes(sport, "big")
            if state != _TCP_CLOSE or (ports is not None and port not in ports):
                continue
            af = socket.AF_INET if fam == socket.AF_INET else socket.AF_INET6
            address = socket.inet_ntop(af, src[:4] if af == socket.AF_INET else src)
            yield NetSocket("tcp", family, address, port, False, inode, uid)
        if not data:
            return


def sockets(ports: range | None = None) -> list[NetSocket]:
    """Every TCP and UDP socket (IPv4 and IPv6) bound to a local port in ``ports`` (all if None).

    Listening, bound-only and connected TCP sockets, bound and connected UDP
    sockets, and TCP sockets in TIME_WAIT (``inode`` 0). A socket accepted from
    a listener shares the listener's port and is listed too.
    """
    found: list[NetSocket] = []
    for proto, family, name in _TABLES:
        found.extend(_read_table(proto, family, name, ports))
    found.extend(_bound_only_tcp(ports))
    return found


# ---------------------------------------------------------------- host-wide claims

CLAIM_PREFIX = "portlease/port/"
"""A broker holding a port binds the abstract stream socket ``"\\0" + CLAIM_PREFIX + str(port)``."""
BROKER_PREFIX = "portlease/broker/"
"""Every running broker binds ``"\\0" + BROKER_PREFIX + f"{uid}/{pid}"`` (its presence)."""

_UNIX_DIAG_REQ = struct.Struct("=BBHIII8x")  # family, protocol, pad, states, ino, show, cookie[2]
_UNIX_DIAG_MSG = struct.Struct("=BBBxI8x")  # family, type, state, pad, ino, cookie[2]
_RTATTR = struct.Struct("=HH")
_UDIAG_SHOW_NAME = 0x01
_UDIAG_SHOW_UID = 0x40
_UNIX_DIAG_NAME = 0
_UNIX_DIAG_UID = 7


@dataclass(frozen=True)
class AbstractName:
    """A bound abstract Unix stream socket: its name (no leading NUL), inode and owner's uid.

    ``uid`` is None where the kernel's socket-diagnostics interface could not be
    asked and the names came from ``/proc/net/unix``, which does not show it.
    """

    name: str
    inode: int
    uid: int | None


def _unix_diag() -> list[AbstractName] | None:
    """Every abstract stream socket, from NETLINK_SOCK_DIAG (with uids); None where it is refused."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    except OSError:
        return None
    found: list[AbstractName] = []
    with nl:
        req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, _UDIAG_SHOW_NAME | _UDIAG_SHOW_UID)
        try:
            nl.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY,
                                    _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + req)
        except OSError:
            return None
        while True:
            data = nl.recv(1 << 16)
            if not data:
                return found
            off = 0
            while off + _NLMSG_HDR.size <= len(data):
                length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data, off)
                if kind == _NLMSG_ERROR:
                    return None
                if kind == _NLMSG_DONE or length < _NLMSG_HDR.size:
                    return found
                _, kind_of_socket, _, inode = _UNIX_DIAG_MSG.unpack_from(data, off + _NLMSG_HDR.size)
                pos, end = off + _NLMSG_HDR.size + _UNIX_DIAG_MSG.size, off + length
                off += (length + 3) & ~3
                name: bytes | None = None
                uid: int | None = None
                while pos + _RTATTR.size <= end:
                    rta_len, rta_type = _RTATTR.unpack_from(data, pos)
                    if rta_len < _RTATTR.size:
                        break
                    value = data[pos + _RTATTR.size:pos + rta_len]
                    if rta_type == _UNIX_DIAG_NAME:
                        name = value
                    elif rta_type == _UNIX_DIAG_UID and len(value) >= 4:
                        uid = int.from_bytes(value[:4], sys.byteorder)
                    pos += (rta_len + 3) & ~3
                if kind_of_socket == socket.SOCK_STREAM and name and name[:1] == b"\0":
                    found.append(AbstractName(name[1:].decode("utf-8", "replace"), inode, uid))


def _proc_net_unix() -> list[AbstractName]:
    """Every abstract stream socket listed in /proc/net/unix (no uids there)."""
    found: list[AbstractName] = []
    try:
        with open(os.path.join(_PROC_NET, "unix"), "rb") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode Path; a name may itself hold spaces.
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[4] == b"0001" and fields[7].startswith(b"@"):
            found.append(AbstractName(fields[7][1:].decode("utf-8", "replace"), int(fields[6]), None))
    return found


def abstract_names(prefix: str) -> list[AbstractName]:
    """The bound abstract Unix *stream* sockets whose name starts with ``prefix``.

    Asked of the kernel's socket diagnostics (which give each socket's uid, and
    need no privilege), else read from ``/proc/net/unix``. Abstract names are
    kept apart per socket type, so only stream sockets, the kind the broker
    binds, are counted. Per network namespace, like ports.
    """
    names = _unix_diag()
    if names is None:
        names = _proc_net_unix()
    return [n for n in names if n.name.startswith(prefix)]


def port_claims(low: int, high: int) -> dict[int, AbstractName]:
    """port → the claim some broker on this host holds on it, for ports in ``[low, high]``."""
    claims: dict[int, AbstractName] = {}
    for n in abstract_names(CLAIM_PREFIX):
        tail = n.name[len(CLAIM_PREFIX):]
        if tail.isdigit() and tail.isascii() and low <= int(tail) <= high:
            claims[int(tail)] = n
    return claims


def live_brokers() -> list[tuple[int, int]]:
    """(uid, pid) of every broker on this host that announces itself (``BROKER_PREFIX``).

    The names are bound by the brokers themselves; anyone may bind such a name,
    so this is a hint for notices, never a basis for a grant.
    """
    found = []
    for n in abstract_names(BROKER_PREFIX):
        uid, _, pid = n.name[len(BROKER_PREFIX):].partition("/")
        if uid.isdigit() and pid.isdigit() and uid.isascii() and pid.isascii():
            found.append((int(uid), int(pid)))
    return sorted(found)


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def all_owners(inodes: Iterable[int]) -> dict[int, set[int]]:
    """inode → every pid that has the socket open (a socket inherited across fork has several)."""
    wanted = {f"socket:[{i}]": i for i in inodes if i}
    found: dict[int, set[int]] = {}
    if not wanted:
        return found
    for pid in _pids():
        fddir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fddir)
        except OSError:  # gone, or another user's process and we are not root
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fddir}/{fd}")
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None:
                found.setdefault(inode, set()).add(pid)
    return found


def owners(inodes: Iterable[int]) -> dict[int, int]:
    """inode → the pid that holds the socket, for the inodes some visible process holds.

    Where several processes share the socket (inherited across fork), the
    lowest pid is given, usually the one that created it; use
    :func:`all_owners` to see them all.
    """
    return {inode: holder(pids) for inode, pids in all_owners(inodes).items()}


def holder(pids: Iterable[int]) -> int:
    """The pid to name for a socket several processes hold: the lowest but PID 1.

    PID 1 holds copies it keeps for a service (systemd's file descriptor store
    keeps the system broker's claims across its restarts); the service's own
    process is the one to name while it runs.
    """
    found = set(pids)
    return min(found - {1} or found)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name in parentheses may itself contain spaces and ')'.
    rest = stat[stat.rindex(b")") + 2:].split()
    if rest[0] == b"Z":  # a zombie has no sockets and is not "live"
        return None
    return int(rest[1])


def descendants(pid: int) -> set[int]:
    """``pid`` and every live process below it (children, their children, …).

    Empty when ``pid`` itself is not running. A process whose parent died has
    been re-parented (to init or a subreaper) and is no longer counted, as the
    kernel no longer counts it either.
    """
    children: dict[int, list[int]] = {}
    alive: set[int] = set()
    for p in _pids():
        parent = _parent(p)
        if parent is not None:
            alive.add(p)
            children.setdefault(parent, []).append(p)
    if pid not in alive:
        return set()
    tree = {pid}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


def listening(ports: Collection[int], pid: int | None = None) -> set[int]:
    """The ports among ``ports`` that a TCP socket listens on.

    With ``pid``, only sockets that ``pid`` or one of its live descendants
    holds count; the process tree is read only when some port has a listener.
    """
    if not ports:
        return set()
    found = [s for s in sockets(range(min(ports), max(ports) + 1))
             if s.proto == "tcp" and s.listening and s.port in ports]
    if pid is None or not found:
        return {s.port for s in found}
    tree = descendants(pid)
    holders = all_owners(s.inode for s in found)
    return {s.port for s in found if holders.get(s.inode, set()) & tree}


def squatters(low: int, high: int, leased: Iterable[tuple[int, int]]) -> list[NetSocket]:
    """Sockets on ports in ``[low, high]`` that no lease covers.

    ``leased`` is the (start, count) runs currently granted. Sockets no process
    holds (TIME_WAIT, inode 0) are left out: they are the remains of a
    connection, not something that took the port. Sorted by port.
    """
    runs = sorted(leased)
    starts = [start for start, _ in runs]
    ends = [start + count for start, count in runs]
    found = []
    for s in sockets(range(low, high + 1)):
        if s.inode == 0 or _covered(s.port, starts, ends):
            continue
        found.append(s)
    found.sort(key=lambda s: (s.port, s.proto, s.family, s.address, s.inode))
    return found


def _covered(port: int, starts: list[int], ends: list[int]) -> bool:
    # Leases never overlap, so the one run that may cover a port is the last starting at or below it.
    i = bisect.bisect_right(starts, port) - 1
    return i >= 0 and port < ends[i]
