"""The :class:`Lease` object every client hands out: sync, trio and pytest alike."""

from __future__ import annotations

from collections.abc import Iterator

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
