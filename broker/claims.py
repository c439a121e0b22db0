"""Host-wide claims on ports: one bound abstract Unix socket name per leased port.

Two brokers on one host (two users' per-user brokers, or one beside the system
broker) each see only their own leases. Before this, both could probe a port
nobody had bound yet and both grant it. A claim closes that gap with the
kernel as the one registry every broker shares: while a broker leases port N
it holds a stream socket bound to the abstract name ``\\0portlease/port/N``.

- The name is one per network namespace, the same scope as the port itself,
  for every user: a second ``bind()`` fails with EADDRINUSE whatever the uid.
  No file, no permission bits, no trust between users.
- The kernel frees the name when the fd closes, also when the broker is
  killed: a dead broker's claims never outlive it.
- The names show in ``/proc/net/unix`` (``@portlease/port/N``) and in the
  socket diagnostics with their uid; ``portlease status`` reads them there.

Abstract names are kept apart per socket *type*: a datagram socket of the same
name does not conflict with a stream one. Every broker binds stream sockets,
so that is the one kind that counts (and the only one ``status`` reads).

The claim is taken in the bind-check path, before the bind probes: a claim
another broker holds is "in use", exactly like a port that fails to bind, so
the allocator passes the port over and goes on. The claims a grant attempt
took but did not keep (a run whose later port failed, a grant refused by the
journal) are *pending* until the shell settles them after the request.

Each held claim costs one file descriptor. When none is left (EMFILE, ENFILE)
:meth:`Claims.take` raises an :class:`OSError` that says so; the core turns
any OSError of the bind check into a ``busy`` refusal.

Under systemd, a claim need not die with the broker. With a file descriptor
store (``FileDescriptorStoreMax=``, announced to the broker as ``$FDSTORE``)
the claims of each lease are also kept in systemd, under the name
``claims-START-COUNT``; the kernel frees a name only when its last fd closes,
so a broker that crashes, is killed by the watchdog or is restarted leaves its
leases' ports claimed until its successor is passed them back
(:meth:`Claims.adopt`). Without the store another broker could grant those
ports in that gap. The store is a copy: the broker's own fds stay the
authority. What the manager cannot take now (its queue full) is sent again at
the next tick; a lease that no longer fits in a full store is claimed by the
broker alone, with the gap as before.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import resource
import socket
from collections.abc import Iterable, Mapping
from typing import Protocol

from portlease.client.host.procnet import BROKER_PREFIX, CLAIM_PREFIX

from .activation import CLAIMS_NAME_PREFIX
from .kernel import out_of_fds

log = logging.getLogger("portlease.claims")


class FdStore(Protocol):
    """Where claims are kept beyond this process: systemd's file descriptor store."""

    def store_fds(self, name: str, fds: list[int]) -> bool:
        """Keep ``fds`` under ``name``; False when it could not be sent now."""

    def remove_fds(self, name: str) -> bool:
        """Close every fd kept under ``name``; False when it could not be sent now."""


def store_name(start: int, count: int) -> str:
    """The name the claims of the lease of ``[start, start+count)`` are stored under."""
    return f"{CLAIMS_NAME_PREFIX}{start}-{count}"


def claim_name(port: int) -> str:
    """The abstract socket name (leading NUL included) that claims ``port`` host-wide."""
    return f"\0{CLAIM_PREFIX}{port}"


def presence_name(uid: int, pid: int) -> str:
    """The abstract socket name a running broker of ``uid`` and ``pid`` binds."""
    return f"\0{BROKER_PREFIX}{uid}/{pid}"


class Claims:
    """The port claims this broker holds, and those a grant attempt took but has not kept yet."""

    __slots__ = ("_adopted", "_capacity", "_held", "_pending", "_prefix", "_store", "_stored",
                 "_stored_fds", "_unremoved", "_unstored", "taken_elsewhere")

    def __init__(self, prefix: str = CLAIM_PREFIX, *, store: FdStore | None = None,
                 capacity: int = 0) -> None:
        self._prefix = "\0" + prefix
        self._held: dict[int, _socket.socket] = {}
        self._pending: list[int] = []
        self.taken_elsewhere = 0
        """How many times a claim was found held by someone else (another broker, or anyone)."""
        self._store = store
        self._capacity = capacity
        self._stored: dict[str, int] = {}
        """Stored name → how many fds it holds (systemd's count against FileDescriptorStoreMax)."""
        self._stored_fds = 0
        """The sum of :attr:`_stored`, kept as it changes: it is checked at every grant."""
        self._unremoved: set[str] = set()
        """Stored names whose removal could not be sent yet (retried by :meth:`retry`)."""
        self._unstored: set[tuple[int, int]] = set()
        """Leases ``(start, count)`` whose claims could not be sent to the store yet (retried)."""
        self._adopted: set[int] = set()

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, port: object) -> bool:
        return port in self._held

    def take(self, port: int) -> bool:
        """Hold the claim on ``port``; False when someone else on the host holds it.

        True also when this broker holds it already. Raises OSError when no
        file descriptor is left (with a message saying so) or on any other
        error than the name being taken.
        """
        if port in self._held:
            return True
        # The bare C socket type: the same system calls without the wrapper's
        # bookkeeping, as for the bind probes (this runs once per port granted).
        try:
            s = _socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            if out_of_fds(exc):
                raise self.fds_exhausted(exc) from None
            raise
        try:
            s.bind(f"{self._prefix}{port}")
        except OSError as exc:
            s.close()
            if exc.errno == errno.EADDRINUSE:
                self.taken_elsewhere += 1
                return False
            if out_of_fds(exc):
                raise self.fds_exhausted(exc) from None
            raise
        self._held[port] = s
        return True

    def fds_exhausted(self, exc: OSError) -> OSError:
        """The error to refuse a grant with when ``exc`` (EMFILE, ENFILE) met a claim or a bind probe."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return OSError(
            exc.errno,
            f"out of file descriptors ({os.strerror(exc.errno or 0)}): each leased port holds one "
            f"for its host-wide claim; {len(self._held)} held, open-file limit {soft} "
            "(raise LimitNOFILE or ulimit -n)",
        )

    def take_pending(self, port: int) -> bool:
        """:meth:`take`, remembering a claim newly taken until :meth:`settle`."""
        if port in self._held:
            return True
        if not self.take(port):
            return False
        self._pending.append(port)
        return True

    def settle(self, kept: Iterable[tuple[int, int]] = ()) -> None:
        """After a request: keep the pending claims of the ``kept`` runs ``(start, count)``
        (and store them), release the others."""
        keep: set[int] = set()
        for start, count in kept:
            keep.update(range(start, start + count))
            self._keep(start, count)
        if not self._pending:
            return
        self.release(p for p in self._pending if p not in keep)
        self._pending.clear()

    def take_run(self, start: int, count: int) -> int | None:
        """Hold every claim of ``[start, start+count)``; else release what this took and
        return the first port someone else holds. OSError as :meth:`take` (nothing kept)."""
        taken: list[int] = []
        try:
            for port in range(start, start + count):
                if port in self._held:
                    continue
                if not self.take(port):
                    self.release(taken)
                    return port
                taken.append(port)
        except OSError:
            self.release(taken)
            raise
        return None

    def release(self, ports: Iterable[int]) -> None:
        """Give back the claims on ``ports`` (those not held are skipped)."""
        held = self._held
        for port in ports:
            s = held.pop(port, None)
            if s is not None:
                s.close()

    def release_run(self, start: int, count: int) -> None:
        """Give back the claims of a lease that ended, stored ones included."""
        self.release(range(start, start + count))
        self._unstored.discard((start, count))
        name = store_name(start, count)
        if name in self._stored:
            self._remove(name)

    def close(self) -> None:
        """Close this process's claims: the broker stops. The stored ones stay with systemd
        for the next broker; without a store, they end here."""
        for s in self._held.values():
            s.close()
        self._held.clear()
        self._pending.clear()

    # -------------------------------------------------------- the fd store

    def adopt(self, stored: Mapping[str, list[socket.socket]]) -> None:
        """Take back the claims a predecessor stored (passed by systemd on this start).

        Each socket is kept as the claim of the port its name says; one that is
        not a claim (another name, a datagram socket) is closed. Call
        :meth:`restored` once the journal's leases are back.
        """
        for name, socks in stored.items():
            self._stored[name] = len(socks)
            self._stored_fds += len(socks)
            for sock in socks:
                port = self._port_of(sock)
                if port is None or port in self._held:
                    sock.close()
                    continue
                self._held[port] = sock
                self._adopted.add(port)
        if stored:
            log.info("took back %d claims of %d leases from systemd's fd store",
                     len(self._adopted), len(stored))

    def restored(self, runs: Iterable[tuple[int, int]]) -> None:
        """After the restore: the adopted claims no restored lease holds are closed and their
        stored names removed; each restored lease's claims are stored, if not stored whole."""
        wanted = {store_name(start, count): (start, count) for start, count in runs}
        held_by_leases = {p for start, count in wanted.values() for p in range(start, start + count)}
        unheld = [p for p in self._adopted if p not in held_by_leases]
        if unheld:
            log.info("released %d stored claims that no restored lease holds", len(unheld))
        self.release(unheld)
        self._adopted.clear()
        for name in [n for n in self._stored if n not in wanted]:
            self._remove(name)
        for name, (start, count) in wanted.items():
            if self._stored.get(name) == count:
                continue
            if name in self._stored:
                self._remove(name)  # some of its fds were lost: store the run again, whole
            self._keep(start, count)

    def retry(self) -> None:
        """Send again what could not be sent, removals first (the tick calls this)."""
        for name in list(self._unremoved):
            self._remove(name)
            if name in self._unremoved:
                return  # the manager takes nothing now: the next tick tries again
        for start, count in list(self._unstored):
            self._unstored.discard((start, count))
            self._keep(start, count)
            if (start, count) in self._unstored:
                return

    @property
    def stored(self) -> int:
        """How many claim fds are in the store now (by this broker's count)."""
        return self._stored_fds

    def _keep(self, start: int, count: int) -> None:
        store = self._store
        if store is None:
            return
        name = store_name(start, count)
        if name in self._stored:
            return
        if name in self._unremoved:
            # Its old copies are still in the store (the removal is not through):
            # the next retry removes them first, then stores these.
            self._unstored.add((start, count))
            return
        if self.stored + count > self._capacity:
            log.debug("fd store full (%d of %d): the claims of ports %d-%d are not stored",
                      self.stored, self._capacity, start, start + count - 1)
            return
        try:
            fds = [self._held[p].fileno() for p in range(start, start + count)]
        except KeyError:
            return  # a claim is missing (restored without one): nothing whole to store
        if store.store_fds(name, fds):
            self._stored[name] = count
            self._stored_fds += count
        else:
            self._unstored.add((start, count))

    def _remove(self, name: str) -> None:
        store = self._store
        if store is None or store.remove_fds(name):
            # (With no store to send to, nothing can be done about the name.)
            self._stored_fds -= self._stored.pop(name, 0)
            self._unremoved.discard(name)
        else:
            self._unremoved.add(name)

    def _port_of(self, sock: socket.socket) -> int | None:
        try:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                return None
            address = sock.getsockname()
        except OSError:
            return None
        if isinstance(address, bytes):
            address = address.decode("ascii", "replace")
        if not isinstance(address, str) or not address.startswith(self._prefix):
            return None
        digits = address[len(self._prefix):]
        return int(digits) if digits.isdigit() and len(digits) <= 5 else None


def announce(uid: int, pid: int) -> socket.socket | None:
    """Bind this broker's presence name; None (logged) when it cannot be bound.

    Clients read it to tell that another user's broker runs on the host. It is
    a hint only: anyone may bind such a name first.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(presence_name(uid, pid))
    except OSError as exc:
        s.close()
        log.warning("cannot announce this broker host-wide (%s): %s", presence_name(uid, pid)[1:], exc)
        return None
    return s


__all__ = ["Claims", "FdStore", "announce", "claim_name", "presence_name", "store_name"]
