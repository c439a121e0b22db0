"""Port blocks for tests, claimed host-wide like the broker claims its ports."""

from __future__ import annotations

import random
import socket
import time

from portlease.broker import kernel

# Test port ranges are claimed host-wide, the way the broker claims ports: an
# abstract Unix socket name per block of 100 ports, bound for as long as the test
# runs. Any number of xdist workers and of concurrent suites on one host (two CI
# jobs, two engineers' runs) then never share a block; the kernel frees a claim
# when its holder exits, also on SIGKILL.
#
# A block also has to be clean when claimed: an earlier test in it may have left
# a port in TIME_WAIT (the side that listened closed first), and for a minute the
# kernel refuses a bind of that port without SO_REUSEADDR. The broker rightly
# skips such a port, so a test that counts on every port of its block (a broker
# with two ports, a squatter at a fixed offset) would fail at random. Such a
# block is passed over until it is clean again.
_TEST_BLOCKS = range(22000, 32000, 100)


def claim_test_block(
    blocks: range | list[int] = _TEST_BLOCKS, rounds: int = 600
) -> tuple[int, socket.socket]:
    """Bind a free, clean block's claim name; return the block's first port and the claim."""
    order = list(blocks)
    random.shuffle(order)
    for _ in range(rounds):  # 600: about 60 s; every block busy means too many suites at once
        for base in order:
            claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                claim.bind(f"\0portlease-tests/block/{base}")
            except OSError:
                claim.close()
                continue
            if not all(kernel.bind_ok(port) for port in range(base, base + 100)):
                claim.close()
                continue
            return base, claim
        time.sleep(0.1)
    raise RuntimeError(
        "no test port block of 22000-31999 is free: claimed by other runs, or ports in TIME_WAIT"
    )
