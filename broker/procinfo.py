"""Who is on the other end of a connection: the kernel's word, and /proc's.

``SO_PEERCRED`` gives the pid, uid and gid the kernel recorded at ``connect()``;
nothing the client says can change them. /proc adds the command line (for
``status``) and the process's start time, which together with the boot id names
one process for good where a pid alone is reused.
"""

from __future__ import annotations

import functools
import os
import pwd
import socket
import struct

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


@functools.cache
def boot_id() -> str:
    """This boot's id; a monotonic time or a start time means nothing under another."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "?"


def process_started(pid: int | None) -> str | None:
    """``"<boot id>:<start time>"`` of a live process, None if it is gone or unreadable.

    The start time is field 22 of /proc/PID/stat (clock ticks after boot).
    """
    if not pid:
        return None
    # os.open/os.read, not open(): this runs on the path of a connection's first
    # grant, and the buffered file object costs more than the three system calls.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = raw[raw.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None  # a zombie holds no sockets
    return f"{boot_id()}:{fields[19].decode()}"


def owner_alive(peer: Peer) -> bool:
    """Whether the very process that took a lease still runs."""
    return peer.started is not None and process_started(peer.pid) == peer.started


def read_cmdline(pid: int | None, limit: int = 4096) -> str | None:
    """The process's command line, arguments joined by spaces, at most ``limit`` bytes read."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(limit)
    except OSError:
        return None
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    return text or None


def identify(peer: Peer) -> Peer:
    """``peer`` with its command line read from /proc, and its start time unless known.

    The start time read at the first grant is kept: read again later, it could
    be a later process's that got the pid, or gone with a holder that exited.
    """
    started = peer.started if peer.started is not None else process_started(peer.pid)
    return Peer(pid=peer.pid, uid=peer.uid, gid=peer.gid, cmdline=read_cmdline(peer.pid), started=started)


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str | None:
    """The account name of ``uid``, None when it has none (a DynamicUser, a container)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


__all__ = ["boot_id", "identify", "owner_alive", "peer_of", "process_started", "read_cmdline", "user_name"]
