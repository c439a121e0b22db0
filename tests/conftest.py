from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerproc import BrokerProc

# The client must never start a background broker during this project's tests
# unless a test asks for it explicitly.
os.environ.setdefault("PORTLEASE_AUTOSTART", "0")
# Nor may a system deployment on the host running the tests (/run/portlease,
# /etc/portlease/config.toml) switch every client to the system socket.
os.environ.setdefault("PORTLEASE_SYSTEM_DIR", "/nonexistent/portlease-test-system")
os.environ.setdefault("PORTLEASE_SYSTEM_CONFIG", "/nonexistent/portlease-test-system.toml")

_next_range = [0]


@pytest.fixture
def port_range(worker_id: str) -> str:
    """A range of 100 ports that no concurrent test (or xdist worker) of this run uses.

    Ranges are carved from 22000-31999, below the kernel's usual ephemeral range.
    """
    n = int(worker_id[2:]) % 4 if worker_id.startswith("gw") else 0
    _next_range[0] += 1
    base = 22000 + (n * 25 + _next_range[0] % 25) * 100
    return f"{base}-{base + 99}"


@pytest.fixture
def broker(tmp_path: Path, port_range: str) -> Iterator[BrokerProc]:
    """A real broker process on a private socket and port range."""
    b = BrokerProc(tmp_path, range=port_range).start()
    try:
        yield b
    finally:
        b.stop()
