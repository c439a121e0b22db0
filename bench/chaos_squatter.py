"""An outside process that squats on random ports of the chaos run's range.

It binds (no SO_REUSEADDR) TCP or UDP, on 127.0.0.1, 0.0.0.0 or ::1, one port at
a time, holds it a while and lets go. Each successful bind is logged with its
CLOCK_MONOTONIC time, so the checker can tell a port the broker should have
skipped (squatted before the client asked) from one grabbed in the
milliseconds between a grant and the holder's own bind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time

KINDS = [
    ("tcp4-lo", socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", True),
    ("tcp4-any", socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", True),
    ("udp4-any", socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", False),
    ("udp4-lo", socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", False),
    ("tcp6-lo", socket.AF_INET6, socket.SOCK_STREAM, "::1", True),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--range", required=True)
    ap.add_argument("--until", type=float, required=True, help="CLOCK_MONOTONIC deadline")
    ap.add_argument("--log", required=True)
    ap.add_argument("--name", default="squatter")
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.range.split("-"))
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(ev: str, **fields: object) -> None:
        line = json.dumps({"t": time.monotonic(), "ev": ev, "who": args.name, **fields}) + "\n"
        os.write(fd, line.encode())

    rng = random.Random()
    for _ in range(100_000):  # bounded; the deadline ends it long before
        if time.monotonic() >= args.until:
            break
        port = rng.randint(lo, hi)
        name, family, kind, addr, listen = rng.choice(KINDS)
        s = socket.socket(family, kind)
        try:
            s.bind((addr, port))
            if listen:
                s.listen(1)
        except OSError:
            s.close()
            time.sleep(rng.uniform(0.01, 0.05))
            continue
        log("squat", port=port, kind=name)
        time.sleep(rng.uniform(0.2, 1.5))
        s.close()
        log("unsquat", port=port, kind=name)  # after the close: the logged span covers the hold
        time.sleep(rng.uniform(0.05, 0.3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
