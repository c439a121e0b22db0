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
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import resource
import socket
from collections.abc import Iterable

from portlease.client.host.procnet import BROKER_PREFIX, CLAIM_PREFIX

from .kernel import out_of_fds

log = logging.getLogger("portlease.claims")

def claim_name(port: int) -> str:
    """The abstract socket name (leading NUL included) that claims ``port`` host-wide."""
    return f"\0{CLAIM_PREFIX}{port}"


def presence_name(uid: int, pid: int) -> str:
    """The abstract socket name a running broker of ``uid`` and ``pid`` binds."""
    return f"\0{BROKER_PREFIX}{uid}/{pid}"


class Claims:
    """The port claims this broker holds, and those a grant attempt took but has not kept yet."""

    __slots__ = ("_held", "_pending", "_prefix", "taken_elsewhere")

    def __init__(self, prefix: str = CLAIM_PREFIX) -> None:
        self._prefix = "\0" + prefix
        self._held: dict[int, _socket.socket] = {}
        self._pending: list[int] = []
        self.taken_elsewhere = 0
        """How many times a claim was found held by someone else (another broker, or anyone)."""

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

    def settle(self, kept: Iterable[int] = ()) -> None:
        """After a request: keep the pending claims of ``kept`` ports, release the others."""
        if not self._pending:
            return
        keep = set(kept)
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

    def close(self) -> None:
        """Give back every claim (the broker stops serving its leases)."""
        for s in self._held.values():
            s.close()
        self._held.clear()
        self._pending.clear()


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


__all__ = ["Claims", "announce", "claim_name", "presence_name"]
