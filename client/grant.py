"""The :class:`Lease` object every client hands out: sync, async and pytest alike."""

from __future__ import annotations

import socket as _socket
import sys
from collections.abc import Callable, Iterator

from .protocol.errors import LeaseLost


class Lease:
    """Ports granted by the broker.

    ``lease.ports`` is the tuple of consecutive ports, ``lease.port`` the first,
    ``lease[i]`` the i-th. ``token`` proves ownership (keep it secret: whoever
    has it can release the lease). ``expires`` is None while the lease is bound
    to a live connection. ``lost`` is set when the lease could not be reclaimed
    after a broker restart; its ports must not be used any more.
    """

    __slots__ = ("_sockets", "expires", "lost", "ports", "released", "token", "ttl")

    def __init__(
        self, ports: tuple[int, ...], token: str, ttl: float, expires: float | None = None
    ) -> None:
        self.ports = ports
        self.token = token
        self.ttl = ttl
        self.expires = expires
        self.lost: LeaseLost | None = None
        self.released = False
        self._sockets: dict[tuple[int, bool, str | None], _socket.socket] = {}

    @property
    def port(self) -> int:
        """The first port of the run."""
        return self.ports[0]

    def __getitem__(self, index: int) -> int:
        return self.ports[index]

    def __len__(self) -> int:
        return len(self.ports)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ports)

    def __repr__(self) -> str:
        span = str(self.port) if len(self.ports) == 1 else f"{self.ports[0]}-{self.ports[-1]}"
        state = " lost" if self.lost else " released" if self.released else ""
        return f"<Lease {span}{state}>"

    def socket(self, offset: int = 0, *, udp: bool = False, host: str | None = None) -> _socket.socket:
        """A socket bound to ``self[offset]``, owned by the lease: no window before the bind.

        TCP sockets come back listening; UDP ones bound. ``host`` None binds
        the dual-stack wildcard (``::`` accepting IPv4 too), or ``0.0.0.0``
        where the host has no IPv6. The socket is made once per (offset,
        protocol, host) and closed when the lease is released or its
        connection closed: hand it to a server (``fileno()``, aiohttp's
        ``SockSite``, uvicorn's ``Config(fd=...)``) rather than closing it.
        """
        if self.released:
            raise ValueError(f"{self!r} is released: its ports are no longer yours to bind")
        key = (offset, udp, host)
        sock = self._sockets.get(key)
        if sock is None:
            sock = _bind(self.ports[offset], udp, host)
            self._sockets[key] = sock
        return sock

    def end(self) -> None:
        """Mark the lease released and close the sockets it owns (no message sent)."""
        self.released = True
        sockets, self._sockets = list(self._sockets.values()), {}
        for sock in sockets:
            sock.close()

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease was lost across a broker restart."""
        if self.lost is not None:
            raise self.lost


def _bind(port: int, udp: bool, host: str | None) -> _socket.socket:
    kind = _socket.SOCK_DGRAM if udp else _socket.SOCK_STREAM
    if host is None:
        try:
            sock = _socket.socket(_socket.AF_INET6, kind)
        except OSError:  # a kernel without IPv6
            family, address = _socket.AF_INET, ("0.0.0.0", port)
        else:
            try:
                sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0)
                _setup_and_bind(sock, ("::", port), udp)
                return sock
            except OSError:
                sock.close()
                # IPv6 present but unusable (disabled by sysctl): IPv4 alone.
                family, address = _socket.AF_INET, ("0.0.0.0", port)
    else:
        info = _socket.getaddrinfo(host, port, type=kind, flags=_socket.AI_NUMERICSERV)
        family, _, _, _, sockaddr = info[0]
        address = sockaddr  # type: ignore[assignment]
    sock = _socket.socket(family, kind)
    try:
        _setup_and_bind(sock, address, udp)
    except BaseException:
        sock.close()
        raise
    return sock


def _setup_and_bind(sock: _socket.socket, address: tuple[str, int] | tuple[str, int, int, int],
                    udp: bool) -> None:
    if not udp:
        # Lets the next holder of the port bind it while an old connection of
        # ours lingers in TIME_WAIT; it never lets anyone bind a port that is
        # listening, and it is not set on UDP, where it would allow a second bind.
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    sock.bind(address)
    if not udp:
        sock.listen(128)


LostCallback = Callable[[Lease, LeaseLost], None]
"""``on_lost(lease, exc)``: told when a lease could not be kept across a broker restart."""


def report_lost(lease: Lease, why: str, on_lost: LostCallback | None) -> LeaseLost:
    """Mark ``lease`` lost, say so on stderr and to ``on_lost``; return the exception.

    Loud on purpose: a lost lease means its ports may now be someone else's, and
    a test that goes on using them must not pass quietly.
    """
    exc = LeaseLost(f"lease of ports {list(lease.ports)} lost after a broker restart: {why}",
                    ports=lease.ports)
    lease.lost = exc
    print(f"portlease: ERROR: {exc}; stop using these ports", file=sys.stderr, flush=True)
    if on_lost is not None:
        try:
            on_lost(lease, exc)
        except Exception as cb_exc:  # a faulty callback must not end the caller's thread or task
            print(f"portlease: on_lost callback failed: {cb_exc!r}", file=sys.stderr)
    return exc
