"""Exceptions only the broker raises: its own configuration and start-up.

Everything a client can see (error replies, an unreachable broker, a lost
lease) lives in :mod:`portlease.client.errors`; these two never cross the wire.
"""

from __future__ import annotations

from portlease.client.errors import PortleaseError


class ConfigError(PortleaseError):
    """The broker's configuration (file, flags, environment) is invalid."""


class StartupError(PortleaseError):
    """The broker cannot start: socket or state already in use, an unsafe directory, a bad inherited fd, …"""


__all__ = ["ConfigError", "StartupError"]
