"""portlease clients: lease ports from the broker, sync or with trio.

The sync API (:func:`lease`, :class:`Connection`) imports only msgspec. The
trio API (:func:`open_lease`, :func:`connect`) is loaded on first use, so
``import portlease.client`` never pulls trio in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
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

_TRIO_NAMES = {"open_lease", "connect", "TrioConnection"}


def __getattr__(name: str) -> Any:
    if name in _TRIO_NAMES:
        from . import trio_client

        return getattr(trio_client, name)
    raise AttributeError(f"module 'portlease.client' has no attribute {name!r}")
