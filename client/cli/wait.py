"""``portlease wait PORT...``: return once each port has a listener."""

from __future__ import annotations

import argparse
import math
import sys
import time

from portlease.client.host import procnet
from portlease.client.protocol.errors import ConfigError

WAIT_POLL = 0.05
"""Seconds between looks at the kernel's socket tables."""


def run(args: argparse.Namespace) -> int:
    """Exit 0 once every port has a TCP listener (of ``--pid``'s tree, if given); 1 on timeout."""
    for port in args.ports:
        if not 1 <= port <= 65535:
            raise ConfigError(f"PORT {port}: must be 1 to 65535")
    if not (math.isfinite(args.timeout) and args.timeout >= 0):
        raise ConfigError("--timeout must be a non-negative number of seconds")
    if args.pid is not None and args.pid < 1:
        raise ConfigError("--pid must be a process id")
    wanted = set(args.ports)
    deadline = time.monotonic() + args.timeout
    while True:
        missing = wanted - procnet.listening(wanted, args.pid)
        if not missing:
            return 0
        if args.pid is not None and not procnet.descendants(args.pid):
            print(f"portlease: process {args.pid} is not running; port "
                  f"{', '.join(map(str, sorted(missing)))} never got its listener", file=sys.stderr)
            return 1
        if time.monotonic() >= deadline:
            whose = f" by process {args.pid} or its descendants" if args.pid is not None else ""
            print(f"portlease: timed out after {args.timeout:g} s: nothing listens{whose} on "
                  f"port {', '.join(map(str, sorted(missing)))}", file=sys.stderr)
            return 1
        time.sleep(WAIT_POLL)
