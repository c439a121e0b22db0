"""The portpicker endpoint's trio shell: sockets, the pid check, and a pidfd per holder.

A portpicker request names a pid; the port is leased to that process and ends
the moment it exits. The lease is an ordinary one, granted through the broker's
core (so the range, the bind check, the exclusions, the per-uid quotas, the
fedimint-portalloc share and the journal all apply), bound to a stand-in
"connection": one per requesting process, kept open by a pidfd
(``pidfd_open(2)``). The kernel makes a pidfd readable when its process
exits, and a trio task waits for exactly that; nothing polls. Its exit then
ends every lease of that process, as a closed connection does.

What a request must be (the parsing is :mod:`.portserver`, pure):

- the pid is the connecting process (``SO_PEERCRED``) or one of its ancestors
  (``python -m portpicker`` asks for its parent's pid), read from /proc after
  the pidfd is open, and that process still runs after the walk: so the pidfd
  is the very process the walk found, not a later one with its pid;
- the quota is the connecting uid's, as on the main socket: its ports count
  against ``max_ports_per_uid``, and each process holding portpicker leases
  counts as one of its connections (``max_connections_per_uid``: it costs the
  broker an fd);
- anything else gets the empty reply, and a rate-limited warning in the log.

A broker restart cannot keep a pidfd; the leases come back from the journal as
orphans, and :meth:`PortServer.adopt` binds each to a new pidfd when the very
process that took it (pid and start time) still runs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from portlease.client import protocol as p
from portlease.client.host.procinfo import parent_pid, process_started

from . import kernel
from .core import Session
from .leases import LeaseRecord, Peer
from .peers import peer_of
from .portserver import NEED_MORE, Refused, format_reply, is_ancestor, parse_request

log = logging.getLogger("portlease.broker")

REQUEST_TIMEOUT = 5.0
"""Seconds a client has to send its pid line; portpicker sends it right after connect()."""
ACCEPT_PAUSE = 0.1
"""Seconds accept() rests after EMFILE/ENFILE."""
NOTE = "portpicker"
"""The note of every lease granted here: ``status`` shows it, and a restart finds them by it."""


class Host(Protocol):
    """What the endpoint needs from the broker (:class:`.handler.Broker`)."""

    def opened(self, session: Session) -> bytes | None:
        """Admit a connection (per-uid limit), or say why not."""

    def closed(self, session: Session) -> None:
        """The connection is gone: its count drops, its leases end."""

    async def portserver_lease(self, session: Session, note: str) -> p.Reply:
        """Grant one port to ``session``, through the same path as every lease."""

    def portserver_adopt(self, session: Session, record: LeaseRecord) -> bool:
        """Bind a restored orphan to ``session``; False when that is no longer possible."""

    def portserver_refused(self, detail: str) -> None:
        """Log a refusal (rate-limited)."""


@dataclass(slots=True, eq=False)
class _Holder:
    """A process holding portpicker leases, and the pidfd that tells of its exit."""

    session: Session
    pidfd: int
    started: str
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)


class PortServer:
    """Answers portpicker on one listening socket; :meth:`run` until cancelled."""

    def __init__(self, host: Host, listener: socket.socket) -> None:
        self.host = host
        self.listener = listener
        self.holders: dict[int, _Holder] = {}
        """By pid; each watched by a task until its process exits."""
        # Negative ids: never a main-socket connection's (those count up from 1).
        self._ids: Callable[[], int] = itertools.count(-1, -1).__next__
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and answer until cancelled. Leases stay with the broker when it stops."""
        self.listener.setblocking(False)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._accept_forever(nursery)
        finally:
            for holder in self.holders.values():
                with contextlib.suppress(OSError):
                    os.close(holder.pidfd)
            self.holders.clear()

    async def _accept_forever(self, nursery: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.listener)
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if kernel.out_of_fds(exc):
                    log.error("portserver: cannot accept connections: %s; pausing %g s",
                              exc.strerror, ACCEPT_PAUSE)
                    await trio.sleep(ACCEPT_PAUSE)
                continue
            conn.setblocking(False)
            nursery.start_soon(self._serve, conn)

    # -------------------------------------------------------- one request

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            peer = peer_of(conn)
            session = Session(id=self._ids(), peer=peer)
            refusal = self.host.opened(session)
            if refusal is not None:
                self.host.portserver_refused(f"pid {peer.pid} uid {peer.uid}: too many connections")
                return
            try:
                port: int | None = None
                request = await self._read(conn)
                if isinstance(request, Refused):
                    self.host.portserver_refused(f"pid {peer.pid} uid {peer.uid}: {request.why}")
                else:
                    port = await self._grant(peer, request)
                with contextlib.suppress(OSError):
                    # A few bytes into a fresh connection's empty send buffer: never blocks.
                    conn.send(format_reply(port))
            finally:
                self.host.closed(session)

    async def _read(self, conn: socket.socket) -> int | Refused:
        data = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while True:
                await trio.lowlevel.wait_readable(conn)
                try:
                    chunk = conn.recv(256)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    return Refused(f"cannot read the request ({exc.strerror})")
                data += chunk
                parsed = parse_request(data, eof=not chunk)
                if parsed is not NEED_MORE:
                    return parsed
        return Refused(f"no complete request within {REQUEST_TIMEOUT:g} s")

    async def _grant(self, peer: Peer, pid: int) -> int | None:
        """The port leased to ``pid`` for ``peer``, or None (refused, and logged)."""
        who = f"pid {peer.pid} uid {peer.uid}"
        if peer.pid is None:
            self.host.portserver_refused(f"uid {peer.uid}: the kernel gave no pid for the connection")
            return None
        holder, why = self._holder_for(peer, pid)
        if holder is None:
            self.host.portserver_refused(f"{who} asked for pid {pid}: {why}")
            return None
        note = NOTE if pid == peer.pid else f"{NOTE} (asked by pid {peer.pid})"
        reply = await self.host.portserver_lease(holder.session, note)
        if isinstance(reply, p.Granted):
            return reply.ports[0]
        detail = reply.message if isinstance(reply, p.Error) else type(reply).__name__
        self.host.portserver_refused(f"{who} asked for pid {pid}: {detail}")
        return None

    def _holder_for(self, peer: Peer, pid: int) -> tuple[_Holder | None, str]:
        """The holder for ``pid`` (found or made, watched), or None and why not."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None, "no such process"
        except OSError as exc:
            return None, f"pidfd_open failed ({exc.strerror})"
        keep = False
        try:
            assert peer.pid is not None
            if not is_ancestor(pid, peer.pid, parent_pid):
                return None, "not the connecting process nor one of its ancestors"
            started = process_started(pid)
            # Still running after the walk: the pidfd is the process the walk
            # found, not one that took its pid in between.
            if started is None or _exited(pidfd):
                return None, "the process exited"
            holder = self.holders.get(pid)
            if holder is not None and holder.started == started and not _exited(holder.pidfd):
                return holder, ""
            if holder is not None:
                # A previous process with this pid exited; its task ends its leases.
                self._forget(pid, holder)
            holder = self._watch(pidfd, Peer(pid=pid, uid=peer.uid, gid=peer.gid, started=started))
            if holder is None:
                return None, f"uid {peer.uid} has too many connections (max_connections_per_uid)"
            keep = True
            return holder, ""
        finally:
            if not keep:
                os.close(pidfd)

    def _watch(self, pidfd: int, peer: Peer) -> _Holder | None:
        """Open a stand-in connection for ``peer`` and watch its pidfd; None when refused."""
        assert self._nursery is not None and peer.pid is not None and peer.started is not None
        session = Session(id=self._ids(), peer=peer, hello=True)
        if self.host.opened(session) is not None:
            return None
        holder = _Holder(session=session, pidfd=pidfd, started=peer.started)
        self.holders[peer.pid] = holder
        self._nursery.start_soon(self._until_exit, holder)
        return holder

    def _forget(self, pid: int, holder: _Holder) -> None:
        if self.holders.get(pid) is holder:
            del self.holders[pid]

    async def _until_exit(self, holder: _Holder) -> None:
        pid = holder.session.peer.pid
        assert pid is not None
        with holder.cancel:
            await trio.lowlevel.wait_readable(holder.pidfd)
            # The process exited: its ports are free now, as after a closed connection.
            self._forget(pid, holder)
            self.host.closed(holder.session)
            with contextlib.suppress(OSError):
                os.close(holder.pidfd)
            holder.pidfd = -1
            log.debug("portserver: pid %d exited; its leases ended", pid)

    # -------------------------------------------------------- after a restart

    def adopt(self, records: list[LeaseRecord]) -> int:
        """Bind restored portpicker orphans to their processes again; return how many.

        A lease whose process (pid and start time) still runs is held by it
        again and ends at its exit; any other stays an orphan and expires.
        """
        adopted = 0
        for record in records:
            peer = record.peer
            if not record.orphaned or peer.pid is None or peer.started is None:
                continue
            if not (record.note or "").startswith(NOTE):
                continue
            holder = self.holders.get(peer.pid)
            if holder is None or holder.started != peer.started:
                try:
                    pidfd = os.pidfd_open(peer.pid)
                except OSError:
                    continue
                if process_started(peer.pid) != peer.started or _exited(pidfd):
                    os.close(pidfd)
                    continue
                holder = self._watch(pidfd, peer)
                if holder is None:
                    os.close(pidfd)
                    continue
            if self.host.portserver_adopt(holder.session, record):
                adopted += 1
        return adopted


def _exited(pidfd: int) -> bool:
    """Whether the pidfd's process has exited (its pidfd is readable), without waiting."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


__all__ = ["NOTE", "REQUEST_TIMEOUT", "Host", "PortServer"]
