"""portlease clients: lease ports from the broker, blocking or async.

The sync API (:func:`lease`, :class:`Connection`) imports only msgspec. The
async API (:func:`open_lease`, :func:`connect`, :class:`AsyncConnection`) runs
under asyncio and trio alike and imports anyio. Every name here is loaded on
first use, so ``import portlease.client`` costs nothing and never pulls anyio,
trio or asyncio in. ``TrioConnection`` is the old name of ``AsyncConnection``.
"""

from __future__ import annotations

from importlib import import_module

# Not `from typing import TYPE_CHECKING`: typing (with re, enum, collections) is
# most of what importing this package would cost; type checkers know this spelling.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .aio import AsyncConnection, connect, open_lease
    from .grant import Lease
    from .protocol.codes import ErrorCode
    from .protocol.errors import (
        BadRequest,
        BrokerUnavailable,
        Busy,
        ConnectionLost,
        Exhausted,
        InUse,
        LeaseError,
        LeaseLost,
        NotFound,
        PortleaseError,
        QuotaExceeded,
        TooLarge,
        UnsafeSocket,
    )
    from .sync import Connection, lease

    TrioConnection = AsyncConnection

__all__ = [
    "AsyncConnection",
    "BadRequest",
    "BrokerUnavailable",
    "Busy",
    "Connection",
    "ConnectionLost",
    "ErrorCode",
    "Exhausted",
    "InUse",
    "Lease",
    "LeaseError",
    "LeaseLost",
    "NotFound",
    "PortleaseError",
    "QuotaExceeded",
    "TooLarge",
    "TrioConnection",
    "UnsafeSocket",
    "connect",
    "lease",
    "open_lease",
]

# Every name is loaded on first use: the pytest plugin lives in this package
# and is imported by every pytest run of everyone who installed portlease, so
# importing the package itself must cost nothing (msgspec alone takes milliseconds).
_HOME = {
    "Lease": "grant",
    "ErrorCode": "protocol.codes",
    "Connection": "sync",
    "lease": "sync",
    "AsyncConnection": "aio",
    "connect": "aio",
    "open_lease": "aio",
    "TrioConnection": "aio",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'portlease.client' has no attribute {name!r}")
    module = import_module(f".{_HOME.get(name, 'protocol.errors')}", __name__)
    value = getattr(module, "AsyncConnection" if name == "TrioConnection" else name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
