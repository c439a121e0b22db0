"""The test suite's own port blocks: claimed host-wide, and never handed out dirty."""

from __future__ import annotations

import socket

import pytest

from testblocks import claim_test_block


def _time_wait(port: int) -> None:
    """Leave ``port`` in TIME_WAIT: the side that listened on it closes first."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()
    client.close()
    listener.close()


def test_a_claimed_block_is_not_claimed_twice() -> None:
    base, claim = claim_test_block()
    try:
        with pytest.raises(RuntimeError, match="no test port block"):
            claim_test_block([base], rounds=2)
    finally:
        claim.close()


def test_a_block_with_a_port_in_time_wait_is_passed_over() -> None:
    base, claim = claim_test_block()
    _time_wait(base + 37)
    claim.close()
    # Released but dirty: it must not be handed to the next test (another run may
    # also have claimed it meanwhile, which refuses it too).
    with pytest.raises(RuntimeError, match="no test port block"):
        claim_test_block([base], rounds=2)
