"""Who is on the other end of a connection: the kernel's word, and /proc's.

``SO_PEERCRED`` gives the pid, uid and gid the kernel recorded at ``connect()``;
nothing the client says can change them. /proc adds the command line (for
``status``) and the process's start time.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Mapping

from portlease.client.host import procnet
from portlease.client.host.procinfo import process_started, read_cmdline

from .leases import Peer

_PEERCRED = struct.Struct("3i")


def peer_of(sock: socket.socket) -> Peer:
    """The connecting process's pid/uid/gid, as the kernel recorded them at connect()."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return Peer()
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid)


def owner_alive(peer: Peer) -> bool:
    """Whether the very process that took a lease still runs."""
    return peer.started is not None and process_started(peer.pid) == peer.started


def identify(peer: Peer) -> Peer:
    """``peer`` with its command line read from /proc, and its start time unless known.

    The start time read at the first grant is kept: read again later, it could
    be a later process's that got the pid, or gone with a holder that exited.
    """
    started = peer.started if peer.started is not None else process_started(peer.pid)
    return Peer(pid=peer.pid, uid=peer.uid, gid=peer.gid, cmdline=read_cmdline(peer.pid), started=started)


# NETLINK_SOCK_DIAG, asked for one Unix socket by inode (linux/unix_diag.h).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLMSG_HDR = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_UNIX_DIAG_MSG = struct.Struct("=BBBxIII")  # family, type, state, pad, ino, cookie[2]
_RTATTR = struct.Struct("=HH")
_UDIAG_SHOW_PEER = 0x04
_UNIX_DIAG_PEER = 2
_NO_COOKIE = 0xFFFFFFFF  # an exact lookup by inode alone


def unix_peers(inodes: list[int]) -> dict[int, int]:
    """For each connected Unix socket (by its inode), the inode of its other end.

    Asked of the kernel's socket diagnostics, which answer any user for sockets
    in its network namespace; a socket the kernel no longer knows is left out.
    """
    peers: dict[int, int] = {}
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    except OSError:
        return peers
    with nl:
        nl.settimeout(1.0)
        for seq, inode in enumerate(inodes, 1):
            req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, _UDIAG_SHOW_PEER,
                                      _NO_COOKIE, _NO_COOKIE)
            try:
                nl.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY,
                                        _NLM_F_REQUEST, seq, 0) + req)
                data = nl.recv(1 << 14)
            except OSError:
                continue
            if len(data) < _NLMSG_HDR.size + _UNIX_DIAG_MSG.size:
                continue
            length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data)
            if kind != _SOCK_DIAG_BY_FAMILY:
                continue  # an error: the socket is gone
            pos, end = _NLMSG_HDR.size + _UNIX_DIAG_MSG.size, min(length, len(data))
            while pos + _RTATTR.size <= end:
                rta_len, rta_type = _RTATTR.unpack_from(data, pos)
                if rta_len < _RTATTR.size:
                    break
                if rta_type == _UNIX_DIAG_PEER and rta_len >= _RTATTR.size + 4:
                    peers[inode] = int.from_bytes(data[pos + 4:pos + 8], sys.byteorder)
                pos += (rta_len + 3) & ~3
    return peers


def holders_now(ends: Mapping[int, int]) -> dict[int, int]:
    """Which process holds the client's end of each connection now.

    ``ends`` maps a key (the broker's connection id) to the inode of the broker's
    own end. The answer maps each key to the pid of a process with the client's
    end open, where /proc shows one (every process's fds for root or the
    broker's own uid; for another uid, none). A lease's holder is gone but the
    connection lives on when a child inherited it (``portlease lease -- sh -c
    'server &'``): that child is who holds the lease now.
    """
    peers = unix_peers(list(ends.values()))
    if not peers:
        return {}
    pids = procnet.owners(peers.values())
    found: dict[int, int] = {}
    for key, ours in ends.items():
        pid = pids.get(peers.get(ours, -1))
        if pid is not None:
            found[key] = pid
    return found
