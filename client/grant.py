"""The :class:`Lease` object every client hands out: sync, trio and pytest alike."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

from .errors import LeaseLost


class Lease:
    """Ports granted by the broker.

    ``lease.ports`` is the tuple of consecutive ports, ``lease.port`` the first,
    ``lease[i]`` the i-th. ``token`` proves ownership (keep it secret: whoever
    has it can release the lease). ``expires`` is None while the lease is bound
    to a live connection. ``lost`` is set when the lease could not be reclaimed
    after a broker restart; its ports must not be used any more.
    """

    __slots__ = ("expires", "lost", "ports", "released", "token", "ttl")

    def __init__(
        self, ports: tuple[int, ...], token: str, ttl: float, expires: float | None = None
    ) -> None:
        self.ports = ports
        self.token = token
        self.ttl = ttl
        self.expires = expires
        self.lost: LeaseLost | None = None
        self.released = False

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

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease was lost across a broker restart."""
        if self.lost is not None:
            raise self.lost


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
