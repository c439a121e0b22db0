from __future__ import annotations

import os
import random
import socket
import time
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

# Test port ranges are claimed host-wide, the way the broker claims ports: an
# abstract Unix socket name per block of 100 ports, bound for as long as the test
# runs. Any number of xdist workers and of concurrent suites on one host (two CI
# jobs, two engineers' runs) then never share a block; the kernel frees a claim
# when its holder exits, also on SIGKILL.
_TEST_BLOCKS = range(22000, 32000, 100)


def claim_test_block() -> tuple[int, socket.socket]:
    """Bind a free block's claim name; return the block's first port and the claim."""
    order = list(_TEST_BLOCKS)
    random.shuffle(order)
    for _ in range(600):  # about 60 s: every block busy means too many suites at once
        for base in order:
            claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                claim.bind(f"\0portlease-tests/block/{base}")
            except OSError:
                claim.close()
                continue
            return base, claim
        time.sleep(0.1)
    raise RuntimeError("every test port block of 22000-31999 is claimed by another run")


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
def broker(tmp_path: Path, port_range: str) -> Iterator[BrokerProc]:
    """A real broker process on a private socket and port range."""
    b = BrokerProc(tmp_path, range=port_range).start()
    try:
        yield b
    finally:
        b.stop()
