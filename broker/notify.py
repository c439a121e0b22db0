"""Telling the service manager how the broker is doing (``sd_notify(3)``), via ``sdnotify``.

The ``sdnotify`` package does the sending but has three habits this wrapper
undoes: without ``NOTIFY_SOCKET`` it opens a socket anyway and swallows every
error with a bare ``except``; it never closes its socket; and it encodes
latin-1 while systemd reads UTF-8. Here nothing is opened without
``NOTIFY_SOCKET``, :meth:`Notifier.close` closes the socket, and a failed send
is logged at debug level instead of raised or hidden.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import time
from typing import Final

import sdnotify  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

SEND_TIMEOUT: Final = 1.0
"""Longest a send may block (seconds). The broker sends from its event loop, so a
manager that stops reading must not wedge it for longer than this."""


STORE_WAIT: Final = 0.05
"""Longest a file descriptor store message waits for room in the manager's queue (seconds)."""

STORE_BACKOFF: Final = 1.0
"""After a wait for room ran out, how long no store message waits at all (seconds)."""

SCM_MAX_FD: Final = 253
"""The most fds the kernel passes in one message (``SCM_MAX_FD`` in ``net/scm.h``)."""


class Notifier:
    """Sends ``READY=1``, ``STATUS=…``, ``WATCHDOG=1`` … to ``$NOTIFY_SOCKET``.

    Reads ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from the
    environment once, when constructed. Without ``NOTIFY_SOCKET`` (or when its
    address cannot be reached) :attr:`enabled` is false and every method does
    nothing. No method raises.
    """

    def __init__(self) -> None:
        self._watchdog_usec = os.environ.get("WATCHDOG_USEC")
        self._watchdog_pid = os.environ.get("WATCHDOG_PID")
        self._address = os.environ.get("NOTIFY_SOCKET") or None
        self._store_stalled_until = 0.0
        self._store_sock: socket.socket | None = None
        self._sd: _Sender | None = None
        if self._address is None:
            return
        # Connecting here rather than in sdnotify's constructor: it would leak
        # the socket when the connect fails, and it offers no send timeout.
        target = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(target)
        except OSError as exc:
            sock.close()
            log.debug("NOTIFY_SOCKET=%s unreachable, not notifying: %s", self._address, exc)
            return
        self._sd = _Sender(sock)

    @property
    def enabled(self) -> bool:
        """True while notifications have somewhere to go."""
        return self._sd is not None

    def _send(self, *assignments: str) -> None:
        sd = self._sd
        if sd is None:
            return
        message = "\n".join(assignments)
        # sdnotify encodes latin-1; handing it UTF-8 bytes spelled as latin-1
        # characters makes the datagram the UTF-8 systemd expects.
        wire = message.encode("utf-8", "backslashreplace").decode("latin-1")
        try:
            sd.notify(wire)
        except (OSError, ValueError) as exc:
            log.debug("sd_notify %r to %s failed: %s", message, self._address, exc)

    def ready(self, status: str | None = None) -> None:
        """``READY=1``: startup (or a reload) is complete and requests are being served."""
        if status is None:
            self._send("READY=1")
        else:
            self._send("READY=1", _status(status))

    def reloading(self) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC``, as systemd ≥ 253 needs; follow with ready()."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """``STOPPING=1``: shutdown has begun."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """``STATUS=text``, shown by ``systemctl status``. Newlines become spaces."""
        self._send(_status(text))

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the keep-alive ping; send it every :meth:`watchdog_interval`."""
        self._send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more before the start/stop timeout hits."""
        self._send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    @property
    def fd_store_capacity(self) -> int:
        """How many fds systemd keeps for the broker (``$FDSTORE``); 0: no store.

        systemd ≥ 254 sets ``$FDSTORE`` to ``FileDescriptorStoreMax=`` itself;
        portlease.service sets both, for older systemd.
        """
        if self._sd is None:
            return 0
        try:
            return max(0, int(os.environ.get("FDSTORE", "0")))
        except ValueError:
            return 0

    def store_fds(self, name: str, fds: list[int]) -> bool:
        """``FDSTORE=1``: keep ``fds`` in systemd under ``name``, passed back on the next start.

        ``FDPOLL=0``: systemd must not drop them when they poll as hung up (an
        unconnected stream socket does). Waits at most :data:`STORE_WAIT` for
        room: False when the fds could not all be sent now (and none stays
        stored under ``name``).
        """
        message = f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0"
        # The kernel passes at most SCM_MAX_FD fds per message; systemd joins the
        # arrays sent under one name.
        for first in range(0, len(fds), SCM_MAX_FD):
            if not self._send_with_fds(message, fds[first:first + SCM_MAX_FD]):
                if first:
                    self.remove_fds(name)
                return False
        return True

    def remove_fds(self, name: str) -> bool:
        """``FDSTOREREMOVE=1``: systemd closes every fd it keeps under ``name``.

        Waits at most :data:`STORE_WAIT` for room: False when the message could
        not be sent now.
        """
        return self._send_with_fds(f"FDSTOREREMOVE=1\nFDNAME={name}", [])

    def _send_with_fds(self, message: str, fds: list[int]) -> bool:
        sd = self._sd
        if sd is None:
            return False
        sock = self._store_sock
        if sock is None:
            # A socket object without a timeout on the same connection: one with
            # a timeout (the notifier's) waits for room inside sendmsg, up to
            # SEND_TIMEOUT, MSG_DONTWAIT or not.
            sock = self._store_sock = sd.socket.dup()
            sock.setblocking(False)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        data = [message.encode()]
        # This runs for grants and releases, on the event loop. The manager's
        # queue holds few datagrams (net.unix.max_dgram_qlen, often 10), so a
        # burst of grants fills it while PID 1 is reading: then wait for room,
        # briefly. A manager that does not make room in that time is left alone
        # for a while, and the caller retries later or goes without.
        for attempt in range(2):
            try:
                sock.sendmsg(data, ancillary)
            except BlockingIOError:
                now = time.monotonic()
                if attempt or now < self._store_stalled_until:
                    return False
                # poll, not select: the broker holds far more fds than FD_SETSIZE.
                waiter = select.poll()
                waiter.register(sock, select.POLLOUT)
                if not waiter.poll(STORE_WAIT * 1000):
                    self._store_stalled_until = now + STORE_BACKOFF
                    log.debug("sd_notify: %s does not read; not waiting again for %g s",
                              self._address, STORE_BACKOFF)
                    return False
            except OSError as exc:
                log.debug("sd_notify %r to %s failed: %s", message, self._address, exc)
                return False
            else:
                return True
        return False

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None for no pings.

        None when notifying is disabled, when ``WATCHDOG_USEC`` is unset, zero or
        malformed, or when ``WATCHDOG_PID`` names another process.
        """
        if self._sd is None or self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2_000_000

    def close(self) -> None:
        """Close the notification socket; later calls do nothing. Idempotent."""
        sd, self._sd = self._sd, None
        if sd is not None:
            sd.socket.close()
        store, self._store_sock = self._store_sock, None
        if store is not None:
            store.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Sender(sdnotify.SystemdNotifier):  # type: ignore[misc]
    """sdnotify's notifier around a socket already connected by :class:`Notifier`."""

    def __init__(self, sock: socket.socket) -> None:
        # debug=True: notify() raises, so Notifier can log what sdnotify would hide.
        self.debug = True
        self.socket = sock


def _status(text: str) -> str:
    # A newline would start a new assignment: text built from client data must
    # never be able to send, say, MAINPID= or WATCHDOG=trigger.
    return "STATUS=" + " ".join(text.splitlines())


__all__ = ["SEND_TIMEOUT", "Notifier"]
