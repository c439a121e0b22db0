"""Port blocks for tests, claimed host-wide like the broker claims its ports."""

from __future__ import annotations

import random
import socket
import time

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
