"""``portlease status``: every lease, once, as JSON, watched, or with the squatters."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from portlease.client import protocol as p
from portlease.client.host import procnet
from portlease.client.host.procinfo import read_cmdline
from portlease.client.protocol.errors import BrokerUnavailable, ConfigError, ConnectionLost
from portlease.client.sync import Connection

from .dial import connect
from .status_view import render_squatters, render_status


def _full_status(conn: Connection) -> p.StatusReply:
    """Every lease, following the broker's pages (``more``/``after``) when it has many."""
    reply = conn.status()
    while reply.more and reply.leases:
        after = reply.leases[-1].ports[-1]
        page = conn.status(after=after)
        if not page.leases or page.leases[0].ports[0] <= after:
            break  # a broker that does not page: never loop on the same leases
        reply.leases.extend(page.leases)
        reply.more = page.more
        reply.summary = page.summary
    return reply


def run(args: argparse.Namespace) -> int:
    if args.squatters and (args.json or args.watch is not None):
        raise ConfigError("--squatters shows a table once; leave out --json and --watch")
    if args.watch is not None:
        if not (math.isfinite(args.watch) and args.watch > 0):
            raise ConfigError("--watch SECONDS must be a positive number")
        return _watch_status(args)
    with connect(args) as conn:
        reply = _full_status(conn)
    if args.squatters:
        print(_squatters_table(reply))
    elif args.json:
        print(json.dumps(p.to_builtins(reply), indent=2))
    else:
        # One of the broker's clients was this command.
        print(render_status(reply, time.time(), self_clients=1))
    sys.stdout.flush()
    return 0


def _squatters_table(reply: p.StatusReply) -> str:
    low, high = reply.summary.range
    found = procnet.squatters(low, high, [(i.ports[0], len(i.ports)) for i in reply.leases])
    owners = procnet.owners(s.inode for s in found)
    rows = []
    for s in found:
        pid = owners.get(s.inode)
        rows.append((s.proto + ("6" if s.family == 6 else ""), s.port, s.address, pid, s.uid,
                     read_cmdline(pid)))
    return render_squatters(rows)


def _watch_status(args: argparse.Namespace) -> int:
    """Redraw the status every ``args.watch`` seconds; wait out broker restarts.

    With ``--json`` each refresh is one JSON object on its own line instead.
    """
    conn: Connection | None = None
    try:
        while True:
            try:
                if conn is None:
                    conn = connect(args)
                reply = _full_status(conn)
                text = (json.dumps(p.to_builtins(reply)) if args.json
                        else render_status(reply, time.time(), self_clients=1))
            except (BrokerUnavailable, ConnectionLost) as exc:
                # Watching is most useful exactly while the broker restarts.
                if conn is not None:
                    conn.close()
                    conn = None
                if args.json:
                    print(f"portlease: {exc}", file=sys.stderr)
                    text = ""
                else:
                    text = f"portlease: {exc}\n(retrying every {args.watch:g} s)"
            if args.json:
                if text:
                    sys.stdout.write(text + "\n")
            else:
                # Home the cursor and overwrite line by line (erasing each line's
                # tail and whatever is below) instead of clearing: no flicker.
                frame = "".join(f"{line}\x1b[K\n" for line in text.splitlines())
                sys.stdout.write("\x1b[H" + frame + "\x1b[J")
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        if conn is not None:
            conn.close()
