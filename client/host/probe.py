"""Whether something serves a Unix socket path: the probe the broker and the autostart share."""

from __future__ import annotations

import socket

__all__ = ["answers"]


def answers(path: str, timeout: float = 1.0) -> bool:
    """True when something accepts connections on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
