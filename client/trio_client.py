"""Deprecated: the trio client is now :mod:`portlease.client.aio`, for asyncio and trio alike.

``TrioConnection`` is :class:`~portlease.client.aio.AsyncConnection`;
:func:`connect` and :func:`open_lease` are the same functions. Import them from
``portlease.client`` instead; this module goes away in a later release.
"""

from __future__ import annotations

import warnings

from .aio import AsyncConnection, connect, open_lease

warnings.warn(
    "portlease.client.trio_client is deprecated: import AsyncConnection, connect and "
    "open_lease from portlease.client",
    DeprecationWarning,
    stacklevel=2,
)

TrioConnection = AsyncConnection

__all__ = ["TrioConnection", "connect", "open_lease"]
