"""portlease clients: lease ports from the broker, sync or with trio.

The sync API (:func:`lease`, :class:`Connection`) imports only msgspec. The
trio API (:func:`open_lease`, :func:`connect`) imports trio. Every name here
is loaded on first use, so ``import portlease.client`` costs nothing and never
pulls trio in.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import (
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
    )
    from .grant import Lease
    from .protocol import ErrorCode
    from .sync import Connection, lease
    from .trio_client import TrioConnection, connect, open_lease

__all__ = [
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
    "connect",
    "lease",
    "open_lease",
]

# Every name is loaded on first use: the pytest plugin lives in this package
# and is imported by every pytest run of everyone who installed portlease, so
# importing the package itself must cost nothing (msgspec alone is ~15 ms).
_HOME = {
    "Lease": "grant",
    "ErrorCode": "protocol",
    "Connection": "sync",
    "lease": "sync",
    "TrioConnection": "trio_client",
    "connect": "trio_client",
    "open_lease": "trio_client",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'portlease.client' has no attribute {name!r}")
    value = getattr(import_module(f".{_HOME.get(name, 'errors')}", __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
