"""``portlease renew TOKEN`` and ``portlease release TOKEN``."""

from __future__ import annotations

import argparse
import time

from portlease.client import protocol as p
from portlease.client.protocol.errors import ConfigError

from .dial import connect


def run(args: argparse.Namespace) -> int:
    if not 1 <= len(args.token) <= p.MAX_TOKEN or not args.token.isprintable():
        raise ConfigError(f"TOKEN {args.token[:40]!r}: not a lease token (32 hex digits, as "
                          "`portlease lease --detach` prints it)")
    with connect(args) as conn:
        if args.command == "renew":
            expires = conn.renew(args.token)
            if expires is not None:
                print(f"expires in {expires - time.time():.0f} s")
        else:
            conn.release(args.token)
    return 0
