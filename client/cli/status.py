"""``portlease status``: every lease, once, as JSON, watched, or with the squatters."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from portlease.client import protocol as p
from portlease.client.host import procnet
from portlease.client.host.procinfo import read_cmdline, user_name
from portlease.client.protocol.errors import BrokerUnavailable, ConfigError, ConnectionLost
from portlease.client.sync import Connection

from .dial import connect
from .status_view import ClaimRow, render_claims, render_squatters, render_status


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
        broker_pid = conn.broker_pid
    if args.squatters:
        print(_squatters_table(reply, broker_pid))
    elif args.json:
        print(json.dumps(p.to_builtins(reply), indent=2))
    else:
        print(_status_text(reply, broker_pid))
    sys.stdout.flush()
    return 0


def _status_text(reply: p.StatusReply, broker_pid: int | None) -> str:
    # One of the broker's clients was this command.
    text = render_status(reply, time.time(), self_clients=1)
    claims = _other_claims(reply, broker_pid)
    return f"{text}\n{render_claims(claims)}" if claims else text


def _other_claims(reply: p.StatusReply, broker_pid: int | None) -> list[ClaimRow]:
    """Runs of ports in the broker's range that other brokers on this host hold now.

    Read from the kernel's list of abstract socket names (see broker/claims.py):
    a claim on a port none of this broker's leases covers, and whose holder is
    not this broker, is another broker's lease. The holder's uid comes with the
    name; its pid only where /proc shows it (root, or the caller's own processes).
    """
    low, high = reply.summary.range
    claims = procnet.port_claims(low, high)
    ours = {port for info in reply.leases for port in info.ports}
    others = {port: c for port, c in claims.items() if port not in ours}
    pids = procnet.owners(c.inode for c in others.values())
    rows: list[ClaimRow] = []
    for port in sorted(others):
        claim = others[port]
        pid = pids.get(claim.inode)
        if pid is not None and pid == broker_pid:
            continue  # granted here since the status reply
        last = rows[-1] if rows else None
        if last is not None and last.ports[-1] == port - 1 and (last.uid, last.pid) == (claim.uid, pid):
            last.ports.append(port)
            continue
        user = user_name(claim.uid) if claim.uid is not None else None
        rows.append(ClaimRow([port], claim.uid, user, pid, read_cmdline(pid)))
    return rows


def _squatters_table(reply: p.StatusReply, broker_pid: int | None) -> str:
    low, high = reply.summary.range
    found = procnet.squatters(low, high, [(i.ports[0], len(i.ports)) for i in reply.leases])
    claims = _other_claims(reply, broker_pid)
    claimed = {port for row in claims for port in row.ports}
    owners = procnet.owners(s.inode for s in found)
    rows = []
    for s in found:
        if s.port in claimed:
            continue  # bound under another broker's lease: not a squatter
        pid = owners.get(s.inode)
        rows.append((s.proto + ("6" if s.family == 6 else ""), s.port, s.address, pid, s.uid,
                     read_cmdline(pid)))
    text = render_squatters(rows)
    return f"{text}\n{render_claims(claims)}" if claims else text


def _watch_status(args: argparse.Namespace) -> int:
    """Redraw the status every ``args.watch`` seconds; wait out broker restarts.

    On a terminal each refresh overwrites the last in place. Into a pipe or a
    file (``| tee watch.log``, a CI log) there is no screen to redraw: each
    refresh is a plain frame followed by a blank line, with no escape codes.
    With ``--json`` each refresh is one JSON object on its own line instead.
    """
    in_place = sys.stdout.isatty()
    conn: Connection | None = None
    try:
        while True:
            try:
                if conn is None:
                    conn = connect(args)
                reply = _full_status(conn)
                text = (json.dumps(p.to_builtins(reply)) if args.json
                        else _status_text(reply, conn.broker_pid))
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
            elif in_place:
                # Home the cursor and overwrite line by line (erasing each line's
                # tail and whatever is below) instead of clearing: no flicker.
                frame = "".join(f"{line}\x1b[K\n" for line in text.splitlines())
                sys.stdout.write("\x1b[H" + frame + "\x1b[J")
            else:
                sys.stdout.write(text + "\n\n")
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        if conn is not None:
            conn.close()
