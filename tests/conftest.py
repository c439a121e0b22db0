from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerproc import BrokerProc
from testblocks import claim_test_block

# The client must never start a background broker during this project's tests
# unless a test asks for it explicitly.
os.environ.setdefault("PORTLEASE_AUTOSTART", "0")
# Nor may a system deployment on the host running the tests (/run/portlease,
# /etc/portlease/config.toml) switch every client to the system socket.
os.environ.setdefault("PORTLEASE_SYSTEM_DIR", "/nonexistent/portlease-test-system")
os.environ.setdefault("PORTLEASE_SYSTEM_CONFIG", "/nonexistent/portlease-test-system.toml")

@pytest.fixture
def port_range() -> Iterator[str]:
    """A range of 100 ports that no concurrent test, xdist worker or other suite on this host uses.

    Ranges are carved from 22000-31999, below the kernel's usual ephemeral range.
    """
    base, claim = claim_test_block()
    try:
        yield f"{base}-{base + 99}"
    finally:
        claim.close()


@pytest.fixture
def ten_ports(port_range: str) -> str:
    """The first ten ports of a claimed block, for a broker whose range must be small."""
    low = int(port_range.split("-")[0])
    return f"{low}-{low + 9}"


@pytest.fixture
def broker(tmp_path: Path, port_range: str) -> Iterator[BrokerProc]:
    """A real broker process on a private socket and port range."""
    b = BrokerProc(tmp_path, range=port_range).start()
    try:
        yield b
    finally:
        b.stop()
