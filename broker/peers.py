"""Who is on the other end of a connection: the kernel's word, and /proc's.

``SO_PEERCRED`` gives the pid, uid and gid the kernel recorded at ``connect()``;
nothing the client says can change them. /proc adds the command line (for
``status``) and the process's start time.
"""

from __future__ import annotations

import socket
import struct

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
