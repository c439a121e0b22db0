"""Where the broker's socket is: one rule shared by the broker, the clients and the CLI."""

from __future__ import annotations

import os
from typing import Final

SYSTEM_SOCKET: Final = "/run/portlease/portlease.sock"
"""The socket systemd (``portlease.socket``) and the NixOS module provide."""


def user_socket() -> str:
    """The per-user socket: under ``$XDG_RUNTIME_DIR``, else ``/tmp/portlease-$UID/``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "portlease", "portlease.sock")
    return os.path.join("/tmp", f"portlease-{os.getuid()}", "portlease.sock")


def explicit_socket(cli_value: str | None = None) -> str | None:
    """The socket the caller configured (flag, then ``$PORTLEASE_SOCKET``), if any."""
    if cli_value:
        return cli_value
    env = os.environ.get("PORTLEASE_SOCKET")
    return env or None


def resolve_socket(cli_value: str | None = None) -> tuple[str, bool]:
    """Pick the socket path and say whether it was configured explicitly.

    Order: ``--socket``, ``$PORTLEASE_SOCKET``, the system socket when it
    exists, else the per-user socket. Only the per-user socket (not configured
    explicitly) may be started on demand by the client.
    """
    explicit = explicit_socket(cli_value)
    if explicit:
        return explicit, True
    if os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET, False
    return user_socket(), False
